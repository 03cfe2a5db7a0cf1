"""Resume after ``kill -9`` (a real ``tplr fetch`` subprocess, bytes counted by the
proxy), the journal's crash safety, and memory that does not grow with the file size."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from pathlib import Path

import pytest
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from fault_proxy import FaultProxy
from test_download import PART, payload

from tplr.comms.download_sidecar import sidecar_paths
from tplr.comms.journal import JournalHeader, JournalWriter, PartRecord, read_journal
from tplr.comms.local_store import LocalStore

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


async def test_kill_9_then_resume_fetches_only_the_missing_parts(
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
        async with asyncio.timeout(60):
            while len(read_journal(journal, header)) < 4:
                assert proc.returncode is None, await proc.stderr.read()
                await asyncio.sleep(0.02)
        proc.kill()  # SIGKILL: no cleanup of any kind
        await proc.wait()
        assert not dest.exists() and partial.stat().st_size == SIZE
        journaled = read_journal(journal, header)
        assert 4 <= len(journaled) < 25
        journaled_bytes = sum(min(PART, SIZE - i * PART) for i in journaled)

        proxy.rate_bytes_per_s = None
        before = proxy.stats.body_bytes_sent
        gets_before = len(proxy.stats.gets())
        proc = await asyncio.create_subprocess_exec(
            *fetch_command(bucket, proxy.url, dest),
            env=fetch_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
    assert dest.read_bytes() == data
    assert not partial.exists() and not journal.exists()
    assert f"{len(journaled)} parts resumed" in out.decode()
    assert proxy.stats.body_bytes_sent - before == SIZE - journaled_bytes
    refetched = {start // PART for _, _, start in proxy.stats.gets()[gets_before:]}
    assert refetched == set(range(25)) - set(journaled)


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


RSS_SCRIPT = """
import asyncio, sys
from pathlib import Path
from tplr.comms.download import download
from tplr.comms.local_store import LocalStore
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
