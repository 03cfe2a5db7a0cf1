"""Dataset keys from a bucket listing or a manifest never reach outside the local folder.

The moto S3 server stores and lists keys such as ``remote/tokenized/../../x`` and
``remote/tokenized//abs`` as they are (so does a hostile R2 bucket); the manager must refuse
them before it writes or deletes anything, and retirement deletes only the files it made.
``tplr shards upload`` uploads only files under its folder, named by checked keys.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from conftest import moto_bucket_config
from shard_fixtures import publish_folder, small_manager, write_llmc_dataset

from tplr.comms.errors import MalformedResponse
from tplr.comms.manifest import MANIFEST_NAME, ManifestError, build_manifest, write_manifest_atomic
from tplr.comms.stores.local import LocalStore
from tplr.comms.stores.s3 import S3Store
from tplr.data.layout import DatasetLayoutError
from tplr.data.shard_state import ShardState
from tplr.data.tools.upload_shards import upload_dataset
from tplr.errors import ConfigError, TplrError

PREFIX = "remote/tokenized/"
TOKENS = 4_000


def files_outside(root: Path, local: Path, bucket_dir: Path | None = None) -> list[Path]:
    """Every file under ``root`` that is neither in ``local`` nor the test's sources."""
    allowed = [local, root / "src"] + ([bucket_dir] if bucket_dir else [])
    return sorted(
        p for p in root.rglob("*") if p.is_file() and not any(p.is_relative_to(a) for a in allowed)
    )


@pytest.mark.parametrize(
    "hostile", ["../../evil_train_000001.bin", "/ABS/evil_train_000001.bin"], ids=["dotdot", "abs"]
)
async def test_listing_keys_that_escape_the_folder_are_refused(
    hostile, s3_server, bucket, tmp_path
):
    """No manifest: the shards come from a LIST, which names a key outside the prefix."""
    write_llmc_dataset(tmp_path / "src", 3, TOKENS)
    (tmp_path / "src" / MANIFEST_NAME).unlink()
    hostile = hostile.replace("/ABS", str(tmp_path / "abs"))  # an absolute key inside tmp_path
    local = tmp_path / "deep" / "er" / "local"
    async with S3Store(moto_bucket_config(s3_server, bucket), max_connections=4) as s3:
        await publish_folder(s3, tmp_path / "src", PREFIX)
        await s3.delete(PREFIX + "fineweb_train_000001.bin")
        await s3.put(PREFIX + hostile, (tmp_path / "src" / "fineweb_train_000001.bin").read_bytes())
        # S3Store refuses the listing itself (MalformedResponse); other stores reach the
        # dataset layer's own check (DatasetLayoutError, below). Either names the key.
        refused = (DatasetLayoutError, MalformedResponse)
        with pytest.raises(refused, match=r"evil_train_000001\.bin") as info:
            async with small_manager(s3, local) as manager:
                await manager.dataset_for(0)
                await wait_ready(manager, 1)
    assert "relative" in str(info.value)
    assert files_outside(tmp_path, local) == []


async def test_listing_key_outside_the_prefix_is_refused(tmp_path):
    """A store that answers a LIST with keys that do not start with the prefix."""

    class WrongPrefixStore(LocalStore):
        async def list(self, prefix: str = ""):
            async for info in super().list(""):
                yield info

    store = WrongPrefixStore(tmp_path / "bucket")
    write_llmc_dataset(tmp_path / "src", 2, TOKENS)
    (tmp_path / "src" / MANIFEST_NAME).unlink()
    await publish_folder(store, tmp_path / "src", PREFIX)
    await store.put("elsewhere/fineweb_train_000005.bin", b"x" * 1026)
    with pytest.raises(DatasetLayoutError, match=r"elsewhere/fineweb_train_000005\.bin"):
        async with small_manager(store, tmp_path / "local"):
            pass


async def wait_ready(manager, index: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while manager.slots[index].state is not ShardState.READY:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_hostile_manifest_key_is_refused_on_moto(s3_server, bucket, tmp_path):
    write_llmc_dataset(tmp_path / "src", 3, TOKENS)
    manifest = json.loads((tmp_path / "src" / MANIFEST_NAME).read_text())
    files = manifest["files"]
    files["../../evil_train_000001.bin"] = files.pop("fineweb_train_000001.bin")
    local = tmp_path / "a" / "b" / "local"
    async with S3Store(moto_bucket_config(s3_server, bucket), max_connections=4) as s3:
        await publish_folder(s3, tmp_path / "src", PREFIX)
        shard = (tmp_path / "src" / "fineweb_train_000001.bin").read_bytes()
        await s3.put(PREFIX + "../../evil_train_000001.bin", shard)
        await s3.put(PREFIX + MANIFEST_NAME, json.dumps(manifest).encode())
        with pytest.raises(ManifestError, match=r"evil_train_000001\.bin") as info:
            async with small_manager(s3, local) as manager:
                await manager.dataset_for(0)
                await wait_ready(manager, 1)
    assert MANIFEST_NAME in str(info.value) and info.value.hint
    assert files_outside(tmp_path, local) == []


async def test_retirement_deletes_only_the_files_it_created(tmp_path):
    """A file beside a shard that merely starts with its name (``name.*``) is not the
    manager's: retiring the shard leaves it alone."""
    write_llmc_dataset(tmp_path / "src", 4, TOKENS)  # 3 train shards: 0 is not prefetched
    store = LocalStore(tmp_path / "bucket")
    await publish_folder(store, tmp_path / "src", PREFIX)
    local = tmp_path / "local"
    local.mkdir()
    keep = [local / "fineweb_train_000000.bin.notes", local / "fineweb_train_000000.bin.d.txt"]
    for path in keep:
        path.write_text("the operator's own file")
    async with small_manager(store, local) as manager:
        await manager.dataset_for(0)
        await wait_ready(manager, 1)
        await manager.dataset_for(1)  # shard 0 retires and is deleted
        deadline = time.monotonic() + 10
        while (local / "fineweb_train_000000.bin").exists():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    assert all(path.read_text() == "the operator's own file" for path in keep)


# --- tplr shards upload ------------------------------------------------------------------


def dataset_naming(folder: Path, extra: dict[str, Path]) -> None:
    """Rewrite ``folder``'s manifest so that it also names ``extra`` (key -> real file)."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for key, path in extra.items():
        entry = build_manifest(path.parent, [path]).files[path.name]
        manifest["files"][key] = entry.model_dump()
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


async def assert_upload_refused(folder: Path, s3_server: str, bucket: str, s3_client) -> TplrError:
    async with S3Store(moto_bucket_config(s3_server, bucket), max_connections=4) as s3:
        with pytest.raises(TplrError) as info:
            await upload_dataset(s3, folder, PREFIX)
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0, "something uploaded"
    assert isinstance(info.value, ConfigError | ManifestError)
    return info.value


async def test_upload_refuses_a_manifest_naming_dotdot_env(tmp_path, s3_server, bucket, s3_client):
    folder = tmp_path / "dataset"
    write_llmc_dataset(folder, 2, TOKENS)
    secrets = tmp_path / ".env"
    secrets.write_text("R2_GRADIENTS_WRITE_SECRET_ACCESS_KEY=hunter2\n")
    dataset_naming(folder, {"../.env": secrets})
    error = await assert_upload_refused(folder, s3_server, bucket, s3_client)
    assert "../.env" in str(error) and "nothing was uploaded" in str(error)


async def test_upload_refuses_a_symlink_out_of_the_folder(tmp_path, s3_server, bucket, s3_client):
    folder = tmp_path / "dataset"
    write_llmc_dataset(folder, 2, TOKENS)
    secrets = tmp_path / ".env"
    secrets.write_text("R2_GRADIENTS_WRITE_SECRET_ACCESS_KEY=hunter2\n")
    (folder / "notes.txt").symlink_to(secrets)
    dataset_naming(folder, {"notes.txt": secrets})
    error = await assert_upload_refused(folder, s3_server, bucket, s3_client)
    assert "notes.txt" in str(error) and "outside" in str(error)


async def test_upload_of_a_good_folder_still_works(tmp_path, s3_server, bucket, s3_client):
    folder = tmp_path / "dataset"
    paths = write_llmc_dataset(folder, 2, TOKENS)
    (folder / "sub").mkdir()
    nested = folder / "sub" / "readme.txt"
    nested.write_text("nested files keep their key")
    write_manifest_atomic(build_manifest(folder), folder / MANIFEST_NAME)
    async with S3Store(moto_bucket_config(s3_server, bucket), max_connections=4) as s3:
        await upload_dataset(s3, folder, PREFIX)
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {PREFIX + p.name for p in paths} | {
        PREFIX + "sub/readme.txt",
        PREFIX + MANIFEST_NAME,
    }
