"""The lead's checkpoints: safetensors + a ``latest`` pointer, pruning, and refusal of a
checkpoint that is tampered with, truncated, a pickle, or for another model; disk full;
and the initial model a new run may start from."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import save as safetensors_save

from tplr.comms.errors import InsufficientSpace, NotFound
from tplr.comms.stores.local import LocalStore
from tplr.comms.transfer_config import TransferConfig
from tplr.errors import ConfigError
from tplr.node.network.checkpoints import (
    LATEST_KEY,
    CheckpointPublisher,
    GlobalCheckpointError,
    checkpoint_key,
    fetch_checkpoint,
    load_init_model,
    model_digest,
    read_latest_pointer,
    write_checkpoint_file,
)

SHAPES = {"embed.weight": (16, 4), "norm.weight": (4,)}


def params(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


async def publish(store, scratch, window: int, seed: int, keep: int = 2):
    publisher = CheckpointPublisher(store, scratch, transfer=TransferConfig(), keep=keep)
    values = params(seed)
    return await publisher.publish(
        values, run_id="ck-run", window=window, digest=model_digest(values)
    )


async def test_publish_point_fetch_and_prune(tmp_path):
    store = LocalStore(tmp_path / "lead")
    scratch = tmp_path / "scratch"
    with pytest.raises(NotFound):
        await read_latest_pointer(store)
    for window in (0, 2, 4):
        await publish(store, scratch, window, seed=window)
    pointer = await read_latest_pointer(store)
    assert (pointer.window, pointer.key, pointer.run_id) == (4, checkpoint_key(4), "ck-run")
    loaded = await fetch_checkpoint(store, pointer, SHAPES, scratch, transfer=TransferConfig())
    assert all(torch.equal(loaded[name], params(4)[name]) for name in SHAPES)
    assert model_digest(loaded) == pointer.model_digest
    kept = sorted([info.key async for info in store.list("checkpoints/")])
    assert kept == [checkpoint_key(2), checkpoint_key(4), LATEST_KEY]  # keep=2
    assert not [p for p in scratch.rglob("*") if p.is_file()]  # scratch files removed


def test_the_digest_sees_every_bit():
    values = params(1)
    flipped = {name: tensor.clone() for name, tensor in values.items()}
    flipped["norm.weight"].view(torch.int32)[0] ^= 1
    assert model_digest(values) != model_digest(flipped)
    assert model_digest(values) == model_digest({k: v.clone() for k, v in values.items()})


def pickled(values) -> bytes:
    buffer = io.BytesIO()
    torch.save(values, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("forge", "expected"),
    [
        (lambda: safetensors_save(params(99)), "has digest"),  # tampered weights
        (lambda: safetensors_save({"embed.weight": torch.zeros(16, 4)}), "missing"),
        (lambda: safetensors_save({**params(4), "norm.weight": torch.zeros(5)}), "shape"),
        (lambda: pickled(params(4)), "not a readable safetensors"),
        (lambda: safetensors_save(params(4))[:-10], "not a readable safetensors"),
    ],
)
async def test_a_bad_checkpoint_is_refused(tmp_path, forge, expected):
    store = LocalStore(tmp_path / "lead")
    await publish(store, tmp_path / "scratch", 4, seed=4)
    pointer = await read_latest_pointer(store)
    forged = forge()
    await store.put(pointer.key, forged)
    pointer = pointer.model_copy(update={"size_bytes": len(forged)})
    with pytest.raises(GlobalCheckpointError, match=expected):
        await fetch_checkpoint(
            store, pointer, SHAPES, tmp_path / "scratch", transfer=TransferConfig()
        )


async def test_a_pointer_to_a_deleted_checkpoint_is_a_clear_error(tmp_path):
    store = LocalStore(tmp_path / "lead")
    await publish(store, tmp_path / "scratch", 4, seed=4)
    pointer = await read_latest_pointer(store)
    await store.delete(pointer.key)
    with pytest.raises(GlobalCheckpointError, match=r"named by latest\.json is gone"):
        await fetch_checkpoint(
            store, pointer, SHAPES, tmp_path / "scratch", transfer=TransferConfig()
        )


def test_disk_full_during_a_checkpoint_is_insufficient_space(small_disk):
    """Issue 10, item 8: a full disk during the lead's checkpoint gave a raw SafetensorError
    ("unexpected pos"); now it names the folder and the bytes, and leaves no temp file."""
    big = {"w": torch.zeros(1024, 1024)}  # 4 MiB on a 2 MiB disk
    path = small_disk.folder / "publish-1.safetensors"
    with pytest.raises(InsufficientSpace) as info:
        write_checkpoint_file(
            big, path, run_id="r", window=1, digest="d", free_space_probe=small_disk.probe
        )
    assert info.value.needed_bytes >= 4 * 1024 * 1024 and str(small_disk.folder) in str(info.value)
    assert list(small_disk.folder.iterdir()) == []
    if small_disk.real:  # a probe that lies: the write itself runs out of space
        with pytest.raises(InsufficientSpace):
            write_checkpoint_file(
                big, path, run_id="r", window=1, digest="d", free_space_probe=lambda _: 1 << 40
            )
        assert list(small_disk.folder.iterdir()) == []


def test_an_init_model_must_fit_the_model(tmp_path):
    path = tmp_path / "init.safetensors"
    values = params(5)
    write_checkpoint_file(values, path, run_id="old", window=40, digest=model_digest(values))
    loaded = load_init_model(path, SHAPES)
    assert model_digest(loaded) == model_digest(values)
    with pytest.raises(GlobalCheckpointError, match="does not match the model"):
        load_init_model(path, {**SHAPES, "head.weight": (4, 16)})
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="TPLR_VALIDATOR_INIT_MODEL"):
        load_init_model(tmp_path / "junk.safetensors", SHAPES)
