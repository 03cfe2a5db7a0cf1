"""Resume after ``kill -9`` (a real ``tplr fetch`` subprocess, bytes counted by the
proxy), the journal's crash safety, and memory that does not grow with the file size."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from fault_proxy import Fault, FaultProxy
from test_download import PART, bucket_config, payload

from tplr.comms.download.engine import download
from tplr.comms.download.journal import (
    JournalHeader,
    JournalWriter,
    PartRecord,
    read_journal,
    read_journal_state,
)
from tplr.comms.download.sidecar import DestinationError, sidecar_paths
from tplr.comms.errors import AccessDenied
from tplr.comms.manifest import build_manifest
from tplr.comms.stores.local import LocalStore
from tplr.comms.stores.s3 import S3Store
from tplr.comms.transfer_config import TransferConfig

MiB = 1024 * 1024
SIZE = 24 * PART + 99
KEY = "data/shard.bin"


def fetch_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=TEST_SECRET_KEY)
    return env


def fetch_command(bucket: str, endpoint: str, dest: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tplr",
        "fetch",
        f"s3://{bucket}/{KEY}",
        str(dest),
        "--endpoint-url",
        endpoint,
        "--part-size",
        "64KiB",
        "--workers",
        "3",
        "--checkpoint-interval",
        "0.05",
        "--no-progress",
    ]


async def run_fetch(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, env=fetch_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def kill_when(proc: asyncio.subprocess.Process, done: Callable[[], bool]) -> None:
    """SIGKILL ``proc`` (no cleanup of any kind) as soon as ``done()`` holds."""
    async with asyncio.timeout(60):
        while not done():
            assert proc.returncode is None, await proc.stderr.read()  # type: ignore[union-attr]
            await asyncio.sleep(0.01)
    proc.kill()
    await proc.wait()


async def test_kill_9_then_resume_fetches_only_what_was_not_written(
    s3_server, s3_client, bucket, tmp_path
):
    data = payload(SIZE, seed=11)
    s3_client.put_object(Bucket=bucket, Key=KEY, Body=data)
    dest = tmp_path / "shard.bin"
    partial, journal = sidecar_paths(dest)
    header = JournalHeader(KEY, SIZE, hashlib.md5(data).hexdigest(), PART)
    async with FaultProxy(s3_server, rate_bytes_per_s=1_000_000) as proxy:
        proc = await asyncio.create_subprocess_exec(
            *fetch_command(bucket, proxy.url, dest),
            env=fetch_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await kill_when(proc, lambda: len(read_journal(journal, header)) >= 4)
        assert not dest.exists() and partial.stat().st_size == SIZE
        state = read_journal_state(journal, header)
        journaled = state.done
        assert 4 <= len(journaled) < 25
        kept = sum(min(PART, SIZE - i * PART) for i in journaled)
        kept += sum(p.length for i, p in state.prefixes.items() if i not in journaled)

        proxy.rate_bytes_per_s = None
        before = proxy.stats.body_bytes_sent
        gets_before = len(proxy.stats.gets())
        code, out, err = await run_fetch(*fetch_command(bucket, proxy.url, dest))
        assert code == 0, err
    assert dest.read_bytes() == data
    assert not partial.exists() and not journal.exists()
    assert f"{len(journaled)} parts resumed" in out
    assert proxy.stats.body_bytes_sent - before == SIZE - kept
    refetched = {start // PART for _, _, start in proxy.stats.gets()[gets_before:]}
    assert refetched == set(range(25)) - set(journaled)


BIG = 128 * MiB


async def test_kill_9_at_three_quarters_of_a_slow_object_keeps_the_written_prefixes(
    s3_server, s3_client, bucket, tmp_path
):
    """The acceptance bar of sub-part resume: 128 MiB served at 4 MB/s per connection,
    default settings, killed once 75 % was served: the rerun fetches at most 40 %."""
    data = np.random.default_rng(7).bytes(BIG)
    s3_client.put_object(Bucket=bucket, Key=KEY, Body=data)
    dest = tmp_path / "big.bin"
    command = [*fetch_command(bucket, "", dest)[:6], "--endpoint-url"]  # default tuning
    async with FaultProxy(s3_server, rate_bytes_per_s=4_000_000) as proxy:
        proc = await asyncio.create_subprocess_exec(
            *command,
            proxy.url,
            "--no-progress",
            env=fetch_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await kill_when(proc, lambda: proxy.stats.body_bytes_sent >= 0.75 * BIG)
        assert not dest.exists()
        proxy.rate_bytes_per_s = None
        before = proxy.stats.body_bytes_sent
        code, _, err = await run_fetch(*command, proxy.url, "--no-progress")
        assert code == 0, err
        refetched = proxy.stats.body_bytes_sent - before
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest()
    print(f"rerun fetched {refetched / BIG:.1%} of the object")
    assert refetched <= 0.40 * BIG, f"refetched {refetched / BIG:.0%} of the object"


def test_journal_ignores_torn_and_corrupt_records_and_foreign_headers(tmp_path):
    path = tmp_path / "x.partial.journal"
    header = JournalHeader("k", 10 * PART, "etag1", PART)
    writer = JournalWriter.create(path, header)
    writer.append([PartRecord(0, "aa" * 16), PartRecord(3, "bb" * 16, "cc" * 16)])
    writer.close()
    good = path.read_bytes()
    line = PartRecord(5, "dd" * 16).to_line()
    path.write_bytes(good + line[:-1].encode())  # torn: the last write stopped mid-line
    assert sorted(read_journal(path, header)) == [0, 3]
    assert read_journal(path, header)[3].md5 == "cc" * 16
    corrupt = line.replace("5 ", "6 ", 1)  # the CRC no longer matches
    path.write_bytes(good + corrupt.encode() + PartRecord(7, "ee" * 16).to_line().encode())
    assert sorted(read_journal(path, header)) == [0, 3, 7]
    path.write_bytes(good + PartRecord(99, "ff" * 16).to_line().encode())  # out of range
    assert sorted(read_journal(path, header)) == [0, 3]
    for other in (
        JournalHeader("k", 10 * PART, "etag2", PART),  # the object was replaced
        JournalHeader("k", 11 * PART, "etag1", PART),
        JournalHeader("k", 10 * PART, "etag1", 2 * PART),
        JournalHeader("other", 10 * PART, "etag1", PART),
    ):
        assert read_journal(path, other) == {}
    path.write_text("not a journal\n")
    assert read_journal(path, header) == {}
    assert read_journal(tmp_path / "absent", header) == {}


def crc_line(body: str) -> bytes:
    """A journal line with a valid CRC, whatever its body: what an attacker can write."""
    return f"{body} {zlib.crc32(body.encode('utf-8')):08x}\n".encode()


@pytest.mark.parametrize(
    "body",
    [
        "D \u00b2 " + "aa" * 16 + " -",  # superscript two: str.isdigit() says yes, int() no
        "D 1 " + "zz" * 16 + " -",  # not hex
        "D 1 " + "aa" * 16,  # a field short
        "P 1 0 " + "aa" * 16,  # an empty prefix
        f"P 1 {PART + 1} " + "aa" * 16,  # longer than the part
        f"S 1 {5 * PART} 10",  # a span outside its part
        "D -1 " + "aa" * 16 + " -",
        "D 99999999999999999999999 " + "aa" * 16 + " -",
        "X 1 2 3",
    ],
)
def test_crafted_journal_lines_are_discarded_with_a_log_line(tmp_path, caplog, body):
    path = tmp_path / "x.partial.journal"
    header = JournalHeader("k", 10 * PART, "etag1", PART)
    JournalWriter.create(path, header).close()
    path.write_bytes(
        path.read_bytes() + crc_line(body) + PartRecord(2, "ab" * 16).to_line().encode()
    )
    with caplog.at_level(logging.INFO, logger="tplr.comms.download.journal"):
        assert sorted(read_journal(path, header)) == [2]
    assert "ignoring line 2" in caplog.text


@pytest.fixture
async def s3_object(s3_server, s3_client, bucket, tmp_path):
    """KEY on moto behind the fault proxy; yields (store, proxy, data, manifest)."""
    data = payload(10 * PART + 7, seed=4)
    s3_client.put_object(Bucket=bucket, Key=KEY, Body=data)
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    (src / KEY).write_bytes(data)
    manifest = build_manifest(src, part_size=PART)
    async with (
        FaultProxy(s3_server) as proxy,
        S3Store(bucket_config(proxy.url, bucket)) as store,
    ):
        yield store, proxy, data, manifest


ONE_STREAM = TransferConfig(download_part_size=PART, download_max_workers=1)


async def interrupted_download(store: S3Store, proxy: FaultProxy, dest: Path, **kwargs) -> None:
    """A download of KEY that stops after four parts: the server refuses the fifth."""
    proxy.add(Fault("status", range_start=4 * PART, status=403, code="AccessDenied"))
    with pytest.raises(AccessDenied):
        await download(store, KEY, dest, config=ONE_STREAM, progress=False, **kwargs)


@pytest.mark.parametrize("verify", ["manifest", "etag"])
async def test_bytes_flipped_in_a_journaled_part_are_fetched_again(s3_object, tmp_path, verify):
    store, proxy, data, manifest = s3_object
    dest = tmp_path / "out" / "shard.bin"
    extra = {"manifest": manifest} if verify == "manifest" else {}
    await interrupted_download(store, proxy, dest, verify=verify, **extra)
    partial, journal = sidecar_paths(dest)
    header = JournalHeader(KEY, len(data), (await store.head(KEY)).etag, PART)
    assert sorted(read_journal(journal, header)) == [0, 1, 2, 3]
    with open(partial, "r+b") as fh:  # a local user flips a byte of journaled part 2
        fh.seek(2 * PART + 100)
        fh.write(bytes([data[2 * PART + 100] ^ 0xFF]))
    before = proxy.stats.body_bytes_sent
    result = await download(
        store, KEY, dest, config=ONE_STREAM, progress=False, verify=verify, **extra
    )
    assert dest.read_bytes() == data and result.verified == verify
    assert result.parts_resumed == 3 and result.resumed_bytes == 3 * PART
    assert proxy.stats.body_bytes_sent - before == len(data) - 3 * PART


async def test_a_partial_replaced_by_a_symlink_is_never_followed(s3_object, tmp_path):
    store, proxy, data, _ = s3_object
    dest = tmp_path / "out" / "shard.bin"
    await interrupted_download(store, proxy, dest)
    partial, _ = sidecar_paths(dest)
    outside = tmp_path / "victim"
    precious = b"p" * len(data)  # the object's size: it looks like the partial it replaced
    outside.write_bytes(precious)
    partial.unlink()
    partial.symlink_to(outside)
    result = await download(store, KEY, dest, config=ONE_STREAM, progress=False)
    assert dest.read_bytes() == data and not dest.is_symlink()
    assert outside.read_bytes() == precious and result.parts_resumed == 0


async def test_journal_symlinks_are_never_followed(s3_object, tmp_path):
    store, proxy, data, _ = s3_object
    dest = tmp_path / "out" / "shard.bin"
    await interrupted_download(store, proxy, dest)
    _, journal = sidecar_paths(dest)
    victims = [tmp_path / "victim1", tmp_path / "victim2"]
    for victim in victims:
        victim.write_bytes(b"precious" * 1000)
    journal.unlink()
    journal.symlink_to(victims[0])  # read as a journal?
    tmp = journal.with_name(journal.name + ".tmp")
    tmp.symlink_to(victims[1])  # truncated while the new journal is written?
    result = await download(store, KEY, dest, config=ONE_STREAM, progress=False)
    assert dest.read_bytes() == data and result.parts_resumed == 0
    assert all(v.read_bytes() == b"precious" * 1000 for v in victims)
    assert not journal.exists() and not tmp.is_symlink()


async def test_a_partial_swapped_during_the_download_is_not_published(s3_object, tmp_path):
    store, proxy, data, _ = s3_object
    dest = tmp_path / "out" / "shard.bin"
    partial, _ = sidecar_paths(dest)
    outside = tmp_path / "victim"
    outside.write_bytes(b"x" * len(data))

    async def swap() -> None:  # the engine keeps writing its own open file
        partial.unlink()
        partial.symlink_to(outside)

    proxy.add(Fault("hook", range_start=2 * PART, hook=swap))
    with pytest.raises(DestinationError, match="was replaced during the download"):
        await download(store, KEY, dest, config=ONE_STREAM, progress=False, verify="size")
    assert not dest.exists() and outside.read_bytes() == b"x" * len(data)


RSS_SCRIPT = """
import asyncio, sys
from pathlib import Path
from tplr.comms.download.engine import download
from tplr.comms.stores.local import LocalStore
from tplr.comms.transfer_config import TransferConfig

async def main():
    async with LocalStore(sys.argv[1]) as store:
        config = TransferConfig(download_part_size=2 * 1024 * 1024, download_max_workers=8)
        await download(
            store, sys.argv[2], Path(sys.argv[3]), config=config, verify="size", progress=False
        )
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print(int(line.split()[1]) * 1024)

asyncio.run(main())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_does_not_grow_with_file_size(tmp_path):
    import subprocess

    root = tmp_path / "store"
    root.mkdir()
    peaks = {}
    for name, size in (("small", 16 * 1024 * 1024), ("large", 128 * 1024 * 1024)):
        with open(root / name, "wb") as fh:
            fh.truncate(size)  # sparse: cheap to create, read as zeros
        # the store hashes a foreign file once, on its first HEAD: do that here, not in
        # the measured process, whose peak should be the download alone
        asyncio.run(LocalStore(root).head(name))
        out = subprocess.run(
            [sys.executable, "-c", RSS_SCRIPT, str(root), name, str(tmp_path / f"{name}.out")],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[name] = int(out.stdout.split()[-1])
        assert (tmp_path / f"{name}.out").stat().st_size == size
    assert peaks["large"] - peaks["small"] < 8 * 1024 * 1024, peaks  # the same 8 buffers
