"""LocalStore specifics on real directories: key safety (traversal, symlink escapes),
internal files never listed, the ETag index, atomic publishing, R2 part-size rules.
The shared ObjectStore contract runs on LocalStore too, in test_s3_store.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from tplr.comms.errors import InsufficientSpace, InvalidRequest, NotFound
from tplr.comms.stores.base import CompletedPart
from tplr.comms.stores.local import INTERNAL_DIR, LocalStore, multipart_etag

BAD_KEYS = [
    "../x",
    "/etc/passwd",
    "a/../../b",
    "a/./b",
    "..",
    "a//b",
    "a/",
    "",
    "a\\..\\b",
    "a\x00b",
    f"{INTERNAL_DIR}/meta/x.json",
    "k" * 1025,
]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_unsafe_keys_are_refused_everywhere(root: Path, key: str):
    store = LocalStore(root)
    attempts = [
        store.put(key, b"x"),
        store.get(key),
        store.head(key),
        store.delete(key),
        store.get_range(key, 0, memoryview(bytearray(1))),
        store.create_multipart(key),
    ]
    for attempt in attempts:
        with pytest.raises(InvalidRequest, match="invalid key") as err:
            await attempt
        assert err.value.hint
    assert not (root.parent / "x").exists() and not (root.parent / "b").exists()


@pytest.mark.parametrize("prefix", ["../", "/etc/", "a/../", "a//"])
async def test_unsafe_list_prefixes_are_refused(root: Path, prefix: str):
    with pytest.raises(InvalidRequest, match="invalid prefix"):
        [info async for info in LocalStore(root).list(prefix)]


async def test_symlink_escapes_are_refused_and_not_listed(root: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"top secret")
    store = LocalStore(root)
    await store.put("inside/ok", b"fine")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    (root / "inside" / "filelink").symlink_to(outside / "secret")
    (root / "inside" / "goodlink").symlink_to(root / "inside" / "ok")
    for key in ("dirlink/secret", "inside/filelink"):
        with pytest.raises(InvalidRequest, match="outside the store root"):
            await store.get(key)
        with pytest.raises(InvalidRequest, match="outside the store root"):
            await store.put(key, b"overwrite")
    assert (outside / "secret").read_bytes() == b"top secret"
    assert await store.get("inside/goodlink") == b"fine"  # a link within the root is fine
    assert [i.key async for i in store.list()] == ["inside/goodlink", "inside/ok"]


async def test_internal_files_are_never_listed_or_left_behind(root: Path):
    store = LocalStore(root)
    await store.put("a", b"1")
    upload_id = await store.create_multipart("b")
    await store.upload_part("b", upload_id, 1, b"part")
    assert [i.key async for i in store.list()] == ["a"]
    assert [i.key async for i in store.list(".tplr")] == []
    await store.abort_multipart("b", upload_id)
    assert list((root / INTERNAL_DIR / "tmp").iterdir()) == []  # no temp file outlives a write


async def test_put_replaces_atomically_and_failed_put_keeps_old(root: Path):
    store = LocalStore(root)
    await store.put("a", b"old")
    with pytest.raises(InvalidRequest, match="conflicts"):
        await store.put("a/b", b"cannot live under a file")
    assert await store.get("a") == b"old"
    await store.put("dir/x", b"1")
    with pytest.raises(InvalidRequest, match="conflicts"):
        await store.put("dir", b"cannot replace a folder")
    assert list((root / INTERNAL_DIR / "tmp").iterdir()) == []
    await store.delete("dir")  # a folder is not an object: nothing happens
    await store.delete("a/b")  # under a file: there is no such object
    assert await store.get("dir/x") == b"1"


async def test_etag_of_files_placed_by_hand_and_changed_later(root: Path):
    root.mkdir()
    (root / "hand.bin").write_bytes(b"placed without the store")
    store = LocalStore(root)
    info = await store.head("hand.bin")
    assert info.etag == hashlib.md5(b"placed without the store").hexdigest()
    assert (root / INTERNAL_DIR / "meta" / "hand.bin.json").exists()  # cached for next time
    time.sleep(0.01)
    (root / "hand.bin").write_bytes(b"changed behind the store's back")
    again = await store.head("hand.bin")
    assert again.etag == hashlib.md5(b"changed behind the store's back").hexdigest()
    assert [i.etag async for i in store.list()] == [again.etag]


async def test_multipart_etag_survives_a_new_store_instance(root: Path):
    store = LocalStore(root)
    upload_id = await store.create_multipart("m")
    etags = [await store.upload_part("m", upload_id, n, bytes([n]) * 10) for n in (1, 2)]
    info = await store.complete_multipart(
        "m", upload_id, [CompletedPart(n, e) for n, e in enumerate(etags, 1)]
    )
    assert (await LocalStore(root).head("m")).etag == info.etag == multipart_etag(etags)
    assert not (root / INTERNAL_DIR / "uploads" / upload_id).exists()


async def test_complete_enforces_r2_part_rules(root: Path):
    store = LocalStore(root)
    upload_id = await store.create_multipart("m")
    small = await store.upload_part("m", upload_id, 1, b"x" * 10)
    big = await store.upload_part("m", upload_id, 2, b"y" * 20)
    with pytest.raises(InvalidRequest, match="same size"):
        await store.complete_multipart(
            "m", upload_id, [CompletedPart(1, small), CompletedPart(2, big)]
        )
    with pytest.raises(InvalidRequest, match="ascending"):
        await store.complete_multipart(
            "m", upload_id, [CompletedPart(2, big), CompletedPart(1, small)]
        )
    with pytest.raises(InvalidRequest, match="not uploaded or have another ETag"):
        await store.complete_multipart("m", upload_id, [CompletedPart(1, "0" * 32)])
    with pytest.raises(InvalidRequest, match=r"outside 1\.\.10000"):
        await store.upload_part("m", upload_id, 0, b"x")
    with pytest.raises(NotFound, match="does not exist"):  # an upload id of another key
        await store.upload_part("other", upload_id, 1, b"x")
    with pytest.raises(NotFound):
        await store.head("m")  # nothing was published by the failed completions


async def test_large_reads_leave_the_event_loop_free(root: Path):
    """get_range of 64 MiB runs in a thread: a ticker on the loop keeps ticking."""
    root.mkdir()
    with open(root / "big", "wb") as fh:
        fh.truncate(64 * 1024 * 1024)
    store = LocalStore(root)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.create_task(ticker())
    buf = bytearray(64 * 1024 * 1024)
    for _ in range(3):
        await store.get_range("big", 0, memoryview(buf))
    task.cancel()
    assert ticks > 100


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
async def test_unreadable_file_is_access_denied(root: Path):
    from tplr.comms.errors import AccessDenied

    store = LocalStore(root)
    await store.put("locked", b"x")
    (root / "locked").chmod(0)
    with pytest.raises(AccessDenied, match="permission denied"):
        await store.get("locked")


# -- a full disk (issue 10, item 8) ------------------------------------------------------

DISK_BYTES = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs when this machine lets us mount one (root), else None: the tests
    then fill the disk with the free-space probe instead (they skip nothing)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
    )
    if done.returncode != 0:
        yield None, mount
        return
    try:
        yield mount, mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def leftovers(root: Path) -> list[Path]:
    tmp = root / INTERNAL_DIR / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


@pytest.mark.parametrize("how", ["preflight", "write"])
async def test_a_full_disk_is_insufficient_space_naming_path_and_bytes(small_disk, how):
    """``preflight``: the free-space probe refuses before a byte is written. ``write``: the
    probe is told there is room, and the real tmpfs runs out mid-write (ENOSPC). Without
    tmpfs, both use a probe that sees a small disk."""
    tmpfs, folder = small_disk
    root = folder / "store"
    if tmpfs is None:
        probe = lambda _path: DISK_BYTES // 2  # noqa: E731  (the probe's view of a small disk)
    else:
        probe = None if how == "preflight" else (lambda _path: 1 << 40)
    store = LocalStore(root, free_space_probe=probe)
    await store.put("keep.bin", b"old")
    big = os.urandom(2 * DISK_BYTES)
    for key in ("new.bin", "keep.bin"):
        with pytest.raises(InsufficientSpace) as caught:
            await store.put(key, big)
        error = caught.value
        assert error.needed_bytes == len(big) and error.path == str(store.root / key)
        assert f"need {len(big)} bytes" in str(error) and "need 1 bytes" not in str(error)
        assert leftovers(store.root) == []  # no orphaned temp file
    assert not (store.root / "new.bin").exists()
    assert await store.get("keep.bin") == b"old"  # nothing torn under a final name


@pytest.mark.parametrize("how", ["preflight", "write"])
async def test_a_full_disk_during_multipart_completion(small_disk, how):
    tmpfs, folder = small_disk
    if tmpfs is None:
        probe = lambda _path: 300 * 1024  # noqa: E731
    else:
        probe = None if how == "preflight" else (lambda _path: 1 << 40)
    store = LocalStore(folder / "store", free_space_probe=probe)
    upload = await store.create_multipart("mp.bin")
    parts = [os.urandom(300 * 1024), os.urandom(300 * 1024)]
    etags = [await store.upload_part("mp.bin", upload, n, d) for n, d in enumerate(parts, 1)]
    with pytest.raises(InsufficientSpace) as caught:
        await store.complete_multipart(
            "mp.bin", upload, [CompletedPart(n, e) for n, e in enumerate(etags, 1)]
        )
    assert caught.value.needed_bytes == sum(map(len, parts))
    assert leftovers(store.root) == [] and not (store.root / "mp.bin").exists()
