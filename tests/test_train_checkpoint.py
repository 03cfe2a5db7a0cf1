"""Checkpoints: resume is exact, files are atomic, loading never unpickles code."""

from __future__ import annotations

import itertools
import random
import subprocess

import numpy as np
import pytest
import torch

from tplr.comms.errors import InsufficientSpace
from tplr.train.config import ModelConfig, TrainConfig
from tplr.train.errors import CheckpointError
from tplr.train.synthetic import progression_batches
from tplr.train.worker import TrainWorker

VOCAB, SEQ, MICRO = 64, 32, 4


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # robust on a loaded 2-core box (no OpenMP barriers)


def make_worker(optimizer: str = "muon", seed: int = 1, **model_overrides) -> TrainWorker:
    model_config = ModelConfig.preset("tiny", vocab_size=VOCAB, max_seq_len=SEQ, **model_overrides)
    config = TrainConfig(
        optimizer=optimizer,
        lr=3e-3,
        micro_batch_size=MICRO,
        global_batch_size=2 * MICRO,
        seq_len=SEQ,
        warmup_steps=2,
        total_steps=20,
        seed=seed,
        device="cpu",
    )
    return TrainWorker(model_config, config)


def batch_list(count: int, seed: int) -> list:
    return list(itertools.islice(progression_batches(VOCAB, MICRO, SEQ, seed=seed), count))


def test_resume_gives_the_same_next_losses_as_not_stopping(tmp_path):
    path = tmp_path / "ckpt" / "step3.pt"
    first = make_worker()
    first.train_steps(batch_list(6, seed=0), 3)
    first.save_checkpoint(path)
    rng_after_save = (torch.rand(3), random.random(), np.random.rand())
    go_on = [first.train_steps(batch_list(2, seed=s), 1).loss for s in (10, 11)]

    resumed = make_worker(seed=999)  # a different init: the checkpoint must overwrite it
    resumed.load_checkpoint(path)
    assert resumed.step == 3
    assert torch.equal(torch.rand(3), rng_after_save[0])
    assert (random.random(), np.random.rand()) == rng_after_save[1:]
    again = [resumed.train_steps(batch_list(2, seed=s), 1).loss for s in (10, 11)]
    assert again == go_on  # bit-exact on CPU: model, both optimizers, schedule and step
    for (name, a), b in zip(
        first.model.named_parameters(), resumed.model.parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in path.parent.iterdir()) == ["step3.pt"]  # no tmp left


def test_rng_state_restored(tmp_path):
    worker = make_worker(optimizer="adamw")
    worker.save_checkpoint(tmp_path / "c.pt")
    expected = torch.rand(4)
    torch.manual_seed(12345)
    worker.load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(torch.rand(4), expected)


def test_weights_only_refuses_pickled_objects(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would have run",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "tplr-train-checkpoint", "version": 1, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="outside the safe set"):
        make_worker().load_checkpoint(path)


def test_unreadable_and_foreign_files(tmp_path):
    worker = make_worker()
    with pytest.raises(CheckpointError, match="does not exist"):
        worker.load_checkpoint(tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    worker.save_checkpoint(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        worker.load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a tplr training checkpoint"):
        worker.load_checkpoint(foreign)
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    with pytest.raises(CheckpointError, match="cannot create checkpoint folder"):
        worker.save_checkpoint(blocked / "c.pt")


def test_mismatched_model_or_optimizer_named(tmp_path):
    path = tmp_path / "c.pt"
    make_worker().save_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"different model \(activation") as info:
        make_worker(activation="gelu").load_checkpoint(path)
    assert "--model" in info.value.hint
    with pytest.raises(CheckpointError, match=r"optimizers \['adamw', 'muon'\]"):
        make_worker(optimizer="adamw").load_checkpoint(path)


def test_optimizer_state_loads_its_data_not_its_implementation_flags(tmp_path):
    """A checkpoint written elsewhere (say, fused AdamW on a GPU, or foreach off) must not
    switch this run's optimizer implementation: only moments and step counts are data."""
    path = tmp_path / "c.pt"
    writer = make_worker(optimizer="adamw")
    writer.train_steps(batch_list(2, seed=0), 1)
    writer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)
    for group in state["optimizers"]["adamw"]["param_groups"]:
        group.update(foreach=False, fused=True, capturable=True)
    torch.save(state, path)

    reader = make_worker(optimizer="adamw")
    wanted = [
        {k: g[k] for k in ("foreach", "fused", "capturable")}
        for opt in reader._optimizers
        for g in opt.param_groups
    ]
    reader.load_checkpoint(path)
    loaded = [
        {k: g[k] for k in ("foreach", "fused", "capturable")}
        for opt in reader._optimizers
        for g in opt.param_groups
    ]
    assert loaded == wanted and wanted[0]["foreach"] is True
    moments = next(iter(reader._optimizers[0].state.values()))
    saved_moments = state["optimizers"]["adamw"]["state"][0]
    assert torch.equal(moments["exp_avg"], saved_moments["exp_avg"])  # the data did load
    reader.train_steps(batch_list(2, seed=1), 1)  # and the run goes on with its own flags


# -- disk full ---------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 512 KiB tmpfs (needs root and mount rights; skipped where they are missing)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def big_worker() -> TrainWorker:
    """~1.6 MB of parameters and AdamW moments: more than the 512 KiB tmpfs holds."""
    return make_worker(optimizer="adamw", d_model=128)


def test_disk_full_checkpoint_is_insufficient_space_and_keeps_the_old_file(small_tmpfs):
    path = small_tmpfs / "c.pt"
    small = make_worker(optimizer="adamw", n_layer=1, d_model=16, n_head=2)
    small.save_checkpoint(path)  # the previous checkpoint, which must survive
    before = path.read_bytes()
    with pytest.raises(InsufficientSpace) as info:
        big_worker().save_checkpoint(path)
    assert info.value.path == str(small_tmpfs) and info.value.needed_bytes > 1_000_000
    assert str(small_tmpfs) in str(info.value) and "bytes" in str(info.value)
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["c.pt"]  # no temp file left
    assert path.read_bytes() == before
    make_worker(optimizer="adamw", n_layer=1, d_model=16, n_head=2).load_checkpoint(path)


def test_disk_full_in_the_middle_of_the_write(small_tmpfs):
    """The free-space probe says yes (another writer filled the disk after the check):
    the failed write still ends as InsufficientSpace, with nothing left behind."""
    path = small_tmpfs / "c.pt"
    with pytest.raises(InsufficientSpace) as info:
        big_worker().save_checkpoint(path, free_space_probe=lambda _: 1 << 40)
    assert info.value.needed_bytes > 1_000_000
    assert list(small_tmpfs.iterdir()) == []


def test_disk_full_from_the_probe_before_writing(tmp_path):
    path = tmp_path / "ckpt" / "c.pt"
    with pytest.raises(InsufficientSpace, match=r"need [0-9]+ bytes, 1000 bytes free") as info:
        big_worker().save_checkpoint(path, free_space_probe=lambda _: 1000)
    assert info.value.path == str(path.parent)
    assert list(path.parent.iterdir()) == []
