"""Downloads through the fault-injecting proxy in front of the real moto S3 server:
every fault ends bit-exact (after retrying only what failed) or with the right typed
error, and cancellation leaves no final file and a journal the next run resumes from."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fault_proxy import Fault, FaultProxy
from prometheus_client import CollectorRegistry
from test_download import PART, bucket_config, payload, sample

from tplr.comms.download.engine import download
from tplr.comms.download.http import PresignedRangeReader
from tplr.comms.download.journal import JournalHeader, read_journal
from tplr.comms.download.sidecar import sidecar_paths
from tplr.comms.errors import AccessDenied, IntegrityError, NotFound, TransientError
from tplr.comms.manifest import build_manifest
from tplr.comms.stores.s3 import S3Store
from tplr.comms.transfer_config import TransferConfig
from tplr.comms.transfer_metrics import TransferMetrics

SIZE = 6 * PART + 1234  # 7 parts, the last one short
KEY = "shards/obj.bin"


def config(**extra) -> TransferConfig:
    values = dict(
        download_part_size=PART,
        download_max_workers=3,
        transfer_max_attempts=4,
        transfer_read_timeout_s=0.5,
        transfer_connect_timeout_s=2,
    )
    values.update(extra)
    return TransferConfig(**values)


@pytest.fixture
async def proxy(s3_server) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(s3_server) as running:
        yield running


@pytest.fixture
def data(s3_client, bucket) -> bytes:
    body = payload(SIZE, seed=5)
    s3_client.put_object(Bucket=bucket, Key=KEY, Body=body)
    return body


async def fetch(proxy: FaultProxy, bucket: str, dest: Path, **kwargs):
    cfg = kwargs.pop("config", None) or config()
    registry = CollectorRegistry()
    metrics = TransferMetrics(registry)
    async with S3Store(bucket_config(proxy.url, bucket), cfg, max_connections=8) as store:
        result = await download(
            store, KEY, dest, config=cfg, metrics=metrics, progress=False, **kwargs
        )
        return result, registry, store


def retries(registry: CollectorRegistry, reason: str) -> float:
    return sample(registry, "tplr_transfer_retries_total", direction="download", reason=reason)


@pytest.mark.parametrize(
    ("fault", "reason", "wasted"),
    [
        (Fault("reset", range_start=PART, after_bytes=1000), "transient", 1000),
        (Fault("status", range_start=PART, status=500, code="InternalError"), "transient", 0),
        (Fault("status", range_start=PART, status=503, code="ServiceUnavailable"), "transient", 0),
        (Fault("status", range_start=PART, status=503, code="SlowDown"), "throttled", 0),
        (Fault("status", range_start=PART, status=429, code="TooManyRequests"), "throttled", 0),
        (Fault("truncate", range_start=PART, after_bytes=1000), "transient", 1000),
        (Fault("stall", range_start=PART, after_bytes=1000, stall_s=30), "transient", 1000),
    ],
    ids=["reset-mid-body", "500", "503", "503-slowdown", "429", "truncated", "stall"],
)
async def test_transient_fault_is_retried_alone(
    proxy, bucket, data, tmp_path, fault, reason, wasted
):
    proxy.add(Fault(**{**fault.__dict__, "hits": 0}))
    result, metrics, store = await fetch(proxy, bucket, tmp_path / "o.bin")
    assert (tmp_path / "o.bin").read_bytes() == data
    assert result.retries == 1 and retries(metrics, reason) == 1
    starts = [start for _, _, start in proxy.stats.gets()]
    assert len(starts) == 7 + 1  # only the faulty part again
    again = [s for s in starts if s not in range(0, SIZE, PART)] or [PART]
    # the retry continues after the bytes that were written (a stalled stream's bytes
    # never left the receive buffer, so it starts at the part's start again)
    assert again[0] in (PART, PART + wasted) and starts.count(PART) == 1 + (again[0] == PART)
    # parts travel as ranged GETs of one presigned URL (the raw, zero-copy reader)
    assert all("X-Amz-Signature=" in path for _, path, _ in proxy.stats.gets())
    assert proxy.stats.body_bytes_sent == SIZE + wasted - (again[0] - PART)
    assert (store.throttle.rate is not None) == (reason == "throttled")


async def test_connection_reset_before_the_answer(proxy, bucket, data, tmp_path):
    """A kept-alive connection that drops before answering (the server closed it while
    idle) is asked again once on a fresh connection, which is not a retry; a fresh
    connection that drops is a failure, retried by the policy."""
    proxy.add(Fault("reset", range_start=PART, times=1))
    one_stream = config(download_max_workers=1)  # part 1 reuses part 0's connection
    result, registry, _ = await fetch(proxy, bucket, tmp_path / "o.bin", config=one_stream)
    assert (tmp_path / "o.bin").read_bytes() == data
    assert [start for _, _, start in proxy.stats.gets()].count(PART) == 2
    assert result.retries == 0

    proxy.add(Fault("reset", range_start=2 * PART, times=2))
    before = len(proxy.stats.gets())
    result, registry, _ = await fetch(proxy, bucket, tmp_path / "p.bin", config=one_stream)
    assert (tmp_path / "p.bin").read_bytes() == data
    assert [start for _, _, start in proxy.stats.gets()[before:]].count(2 * PART) == 3
    assert result.retries == 1 and retries(registry, "transient") == 1


async def test_persistent_failure_raises_and_keeps_the_rest_for_resume(
    proxy, bucket, data, tmp_path
):
    proxy.add(Fault("status", range_start=3 * PART, times=None, status=500))
    dest = tmp_path / "o.bin"
    with pytest.raises(TransientError, match="500"):
        await fetch(proxy, bucket, dest, config=config(transfer_max_attempts=3))
    assert [start for _, _, start in proxy.stats.gets()].count(3 * PART) == 3
    assert not dest.exists()
    partial, journal = sidecar_paths(dest)
    header = JournalHeader(KEY, SIZE, hashlib.md5(data).hexdigest(), PART)
    done = read_journal(journal, header)
    assert 3 not in done and len(done) >= 1 and partial.stat().st_size == SIZE
    proxy.faults.clear()
    before = proxy.stats.body_bytes_sent
    result, _, _ = await fetch(proxy, bucket, dest)
    assert dest.read_bytes() == data and result.parts_resumed == len(done)
    resumed_bytes = sum(min(PART, SIZE - i * PART) for i in done)
    assert proxy.stats.body_bytes_sent - before == SIZE - resumed_bytes


async def test_object_replaced_mid_download_restarts_cleanly(
    proxy, bucket, data, s3_client, tmp_path
):
    new = payload(SIZE + 5000, seed=9)

    async def replace() -> None:
        await asyncio.to_thread(s3_client.put_object, Bucket=bucket, Key=KEY, Body=new)

    proxy.add(Fault("hook", range_start=4 * PART, hook=replace))
    result, _, _ = await fetch(proxy, bucket, tmp_path / "o.bin")
    assert (tmp_path / "o.bin").read_bytes() == new  # never a mix of both versions
    assert result.etag == hashlib.md5(new).hexdigest() and result.size == len(new)
    assert result.parts_resumed == 0


async def test_corrupt_part_is_refetched_alone_then_gives_up(proxy, bucket, data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "obj.bin").write_bytes(data)
    manifest = build_manifest(src, part_size=PART)
    proxy.add(Fault("corrupt", range_start=2 * PART, after_bytes=777))
    result, metrics, _ = await fetch(proxy, bucket, tmp_path / "o.bin", manifest=manifest)
    assert (tmp_path / "o.bin").read_bytes() == data and result.verified == "manifest"
    starts = [start for _, _, start in proxy.stats.gets()]
    assert starts.count(2 * PART) == 2 and len(starts) == 8
    assert proxy.stats.body_bytes_sent == SIZE + PART
    assert retries(metrics, "integrity") == 1
    assert sample(metrics, "tplr_transfer_integrity_failures_total", direction="download") == 1

    proxy.add(Fault("corrupt", range_start=PART, times=None, after_bytes=5))
    with pytest.raises(IntegrityError, match="3 times in a row") as err:
        await fetch(proxy, bucket, tmp_path / "p.bin", manifest=manifest)
    assert "does not match its manifest hash" in str(err.value)
    assert not (tmp_path / "p.bin").exists()


async def test_missing_key_and_bucket_fail_at_once(proxy, bucket, data, tmp_path):
    with pytest.raises(NotFound, match=r"shards/absent\.bin"):
        async with S3Store(bucket_config(proxy.url, bucket), config()) as store:
            await download(store, "shards/absent.bin", tmp_path / "o", progress=False)
    assert [m for m, _, _ in proxy.stats.requests] == ["HEAD", "HEAD"]  # key, then bucket
    with pytest.raises(NotFound, match="bucket 'no-such-bucket-zz' does not exist"):
        async with S3Store(bucket_config(proxy.url, "no-such-bucket-zz"), config()) as store:
            await download(store, KEY, tmp_path / "o", progress=False)
    assert not list(tmp_path.iterdir())


async def test_object_deleted_mid_download_is_not_found(proxy, bucket, data, s3_client, tmp_path):
    async def delete() -> None:
        await asyncio.to_thread(s3_client.delete_object, Bucket=bucket, Key=KEY)

    proxy.add(Fault("hook", range_start=3 * PART, hook=delete))
    with pytest.raises(NotFound, match=f"s3://{bucket}/{KEY}"):
        await fetch(proxy, bucket, tmp_path / "o.bin")
    assert [start for _, _, start in proxy.stats.gets()].count(3 * PART) == 1  # not retried
    assert not (tmp_path / "o.bin").exists()


async def test_presigned_url_is_renewed_before_it_expires(proxy, bucket, data):
    made = []

    async with S3Store(bucket_config(proxy.url, bucket), config()) as store:

        async def url() -> str:
            made.append(1)
            return await store._client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": KEY}, ExpiresIn=60
            )

        reader = PresignedRangeReader(
            url, location=store.url(KEY), connect_timeout_s=2, read_timeout_s=2,
            map_error=lambda *a: AssertionError(a), url_ttl_s=0.0,
        )  # fmt: skip
        async with reader:
            for offset in (0, PART):
                got = bytearray(100)
                await reader.read_into(offset, memoryview(got))
                assert got == data[offset : offset + 100]
    assert len(made) == 3  # entering, then once per request with a zero time-to-live


async def test_refused_request_is_not_retried(proxy, bucket, data, tmp_path):
    proxy.add(Fault("status", method="HEAD", status=403, code="AccessDenied"))
    with pytest.raises(AccessDenied, match=f"s3://{bucket}/{KEY}"):
        await fetch(proxy, bucket, tmp_path / "o.bin")
    assert len(proxy.stats.requests) == 1


async def test_cancel_stops_a_stalled_receive_at_once(proxy, bucket, data, tmp_path):
    """Parts are received by worker threads on blocking sockets; cancelling the download
    wakes a thread stuck in a receive (the server stalls, the read timeout is far) and
    waits for it, so no thread outlives the download or writes after it returned."""
    proxy.add(Fault("stall", range_start=PART, after_bytes=1000, stall_s=60))
    patient = config(transfer_read_timeout_s=60, download_max_workers=2)
    task = asyncio.create_task(fetch(proxy, bucket, tmp_path / "o.bin", config=patient))
    async with asyncio.timeout(20):
        while not any(start == PART for _, _, start in proxy.stats.gets()):
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # the stalled stream is now waiting in recv_into
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 5
    assert not [t for t in threading.enumerate() if t.name.startswith("tplr-stream")]
    assert not (tmp_path / "o.bin").exists()


async def test_cancel_leaves_no_final_file_and_a_valid_journal(proxy, bucket, data, tmp_path):
    dest = tmp_path / "o.bin"
    partial, journal = sidecar_paths(dest)
    header = JournalHeader(KEY, SIZE, hashlib.md5(data).hexdigest(), PART)
    proxy.rate_bytes_per_s = 400_000  # ~0.16 s per part
    task = asyncio.create_task(
        fetch(
            proxy, bucket, dest, config=config(download_max_workers=2), checkpoint_interval_s=0.05
        )
    )
    async with asyncio.timeout(20):
        while len(read_journal(journal, header)) < 2:
            await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not dest.exists()
    done = read_journal(journal, header)
    assert 2 <= len(done) < 7 and partial.stat().st_size == SIZE
    for index in done:  # every journaled part is really on disk
        offset = index * PART
        assert partial.read_bytes()[offset : offset + PART] == data[offset : offset + PART]
    proxy.rate_bytes_per_s = None
    before = proxy.stats.body_bytes_sent
    result, _, _ = await fetch(proxy, bucket, dest)
    assert dest.read_bytes() == data and result.parts_resumed == len(done)
    assert proxy.stats.body_bytes_sent - before == result.fetched_bytes
    assert result.fetched_bytes == SIZE - sum(min(PART, SIZE - i * PART) for i in done)
    assert not partial.exists() and not journal.exists()


async def test_an_http_proxy_in_the_environment_is_honoured(
    proxy, bucket, data, s3_server, monkeypatch, tmp_path
):
    """With HTTP_PROXY set, parts go through the store's own client (which honours it),
    not the raw reader; the fault proxy here plays the forward proxy."""
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    cfg = config()
    async with S3Store(bucket_config(s3_server, bucket), cfg, max_connections=8) as store:
        await download(store, KEY, tmp_path / "o.bin", config=cfg, progress=False)
    assert (tmp_path / "o.bin").read_bytes() == data
    gets = proxy.stats.gets()
    assert len(gets) == 7 and not any("X-Amz-Signature=" in path for _, path, _ in gets)


async def test_big_manifest_parts_of_a_small_object_come_in_pieces(
    proxy, bucket, s3_client, tmp_path
):
    """16 MiB manifest parts would give this 24 MiB object two streams: each part is
    fetched as 8 MiB pieces instead, hashed once whole, and re-fetched whole if wrong."""
    mib = 1024 * 1024
    body = payload(24 * mib + 123, seed=2)
    s3_client.put_object(Bucket=bucket, Key=KEY, Body=body)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "obj.bin").write_bytes(body)
    manifest = build_manifest(tmp_path / "src", part_size=16 * mib)
    proxy.add(Fault("corrupt", range_start=8 * mib, after_bytes=4321))
    cfg = TransferConfig(transfer_max_attempts=3)
    result, registry, _ = await fetch(
        proxy, bucket, tmp_path / "o.bin", manifest=manifest, config=cfg
    )
    assert (tmp_path / "o.bin").read_bytes() == body and result.verified == "manifest"
    starts = sorted(start for _, _, start in proxy.stats.gets())
    assert starts == [0, 0, 8 * mib, 8 * mib, 16 * mib, 24 * mib]  # part 0 twice, whole
    assert proxy.stats.body_bytes_sent == len(body) + 16 * mib
    assert retries(registry, "integrity") == 1

    proxy.add(Fault("corrupt", range_start=16 * mib, after_bytes=1, times=None))
    with pytest.raises(IntegrityError, match=r"part 1 .*\(3 times in a row\)"):
        await fetch(proxy, bucket, tmp_path / "p.bin", manifest=manifest, config=cfg)
    assert not (tmp_path / "p.bin").exists()
