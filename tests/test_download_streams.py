"""Adaptive concurrency (how many GETs run at once, how much each asks for) and how a
stream takes its work: real streams on the event loop, timed by real sleeps, the
throughput and CPU time they measure given by the test."""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from pathlib import Path

import xxhash
from conftest import moto_bucket_config
from fault_proxy import Fault, FaultProxy
from prometheus_client import CollectorRegistry

from tplr.comms.buffers import BufferPool, TransferSlots
from tplr.comms.download.http import PresignedRangeReader
from tplr.comms.download.journal import JournalHeader
from tplr.comms.download.parts import PartFetcher, Request, Run, Verification
from tplr.comms.download.plan import MiB, plan_download
from tplr.comms.download.sidecar import Resumed, Sidecar
from tplr.comms.download.source import RangeSource, range_source
from tplr.comms.download.streams import AdaptiveStreams
from tplr.comms.progress import NoProgress
from tplr.comms.retry import RetryPolicy
from tplr.comms.stores.local import LocalStore
from tplr.comms.stores.s3 import S3Store
from tplr.comms.transfer_config import TransferConfig
from tplr.comms.transfer_metrics import TransferMetrics


class Origin:
    """Work items that take ``seconds`` each and count their bytes when done; ``busy``
    is the CPU the process reports per second of wall time, per core."""

    def __init__(
        self, *, seconds: float, busy: float = 0.0, warmup_s: float = 0.0, prompt: int = 0
    ) -> None:
        self.seconds = seconds
        self.busy = busy
        self.warmup_s = warmup_s  # a stream's first item waits this long (connecting) ...
        self.prompt = prompt  # ... except for the first ``prompt`` streams
        self.warm: set[object] = set()
        self.done_bytes = 0
        self.taken: list[list[int]] = []
        self.cpu = 0.0
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()

    def take(self, queue: deque[int], share: int) -> list[int]:
        unit = [queue.popleft() for _ in range(min(share, len(queue)))]
        self.taken.append(unit)
        return unit

    async def run(self, unit: list[int]) -> None:
        stream = asyncio.current_task()
        if stream not in self.warm:
            self.warm.add(stream)
            if len(self.warm) > self.prompt:
                await asyncio.sleep(self.warmup_s)
        await asyncio.sleep(self.seconds * len(unit))
        self.done_bytes += len(unit) * MiB  # a per-connection-limited origin: linear

    def cpu_seconds(self) -> float:
        return (self.loop.time() - self.started) * self.busy * 2  # on 2 cores

    def streams(self, items: int, *, interval_s: float = 0.1, **options: float) -> AdaptiveStreams:
        """Streams over ``items`` work items of this origin: 4 to start, at most 64."""
        return AdaptiveStreams(
            deque(range(items)),
            self.run,
            take=self.take,
            max_streams=64,
            bytes_done=lambda: self.done_bytes,
            initial_streams=4,
            interval_s=interval_s,
            cpu_seconds=self.cpu_seconds,
            cores=2,
            **options,
        )


async def test_a_per_connection_limit_gets_every_stream_one_request_each():
    origin = Origin(seconds=0.01)
    # min_gain 1.1: a loaded test machine's timers jitter; the origin is linear
    streams = origin.streams(1500, min_gain=1.1)
    await streams.run()
    assert streams.peak_streams == 64 and not streams.settled
    assert all(len(unit) == 1 for unit in origin.taken)  # capped, not settled: no runs


async def test_streams_slow_to_start_get_one_more_interval_to_show_their_gain():
    # the first streams are connected at once, later ones take 1.5 intervals: the
    # interval right after a growth shows no gain, the next one the whole of it
    origin = Origin(seconds=0.01, warmup_s=0.15, prompt=4)
    streams = origin.streams(2500)
    await streams.run()
    assert streams.peak_streams == 64 and not streams.settled


async def test_busy_cores_stop_the_growth_and_streams_then_take_more_at_once():
    origin = Origin(seconds=0.02, busy=0.9)
    streams = origin.streams(100, interval_s=0.05)
    await streams.run()
    assert streams.peak_streams == 4 and streams.settled
    assert max(len(unit) for unit in origin.taken) > 1
    assert sorted(i for unit in origin.taken for i in unit) == list(range(100))


def fetcher_for(
    tmp_path: Path,
    size: int,
    *,
    fixed: int,
    store: object = None,
    source: RangeSource | None = None,
    sidecar: Sidecar | None = None,
) -> tuple[PartFetcher, deque[Request]]:
    plan = plan_download(size, fixed_part_size=fixed)
    reader = PresignedRangeReader(
        lambda: asyncio.sleep(0, "http://127.0.0.1:9/k"),
        location="s3://b/k",
        connect_timeout_s=1,
        read_timeout_s=1,
        map_error=lambda *a: AssertionError(a),
    )
    fetcher = PartFetcher(
        store=store or LocalStore(tmp_path / "store"),
        key="k",
        etag="",
        sidecar=sidecar or Sidecar(tmp_path / "k", JournalHeader("k", size, "e", plan.part_size)),
        verification=Verification(
            mode="size", location="s3://b/k", metrics=TransferMetrics(CollectorRegistry())
        ),
        part_md5=False,
        policy=RetryPolicy(),
        metrics=TransferMetrics(CollectorRegistry()),
        progress=NoProgress(),
        slots=TransferSlots(4),
        pool=BufferPool(4, MiB),
        source=source or RangeSource(reader=reader),
        on_retry=lambda *a: None,
        piece_size=plan.piece_size,
    )
    return fetcher, fetcher.requests(plan.parts(), Resumed())


def test_a_settled_stream_takes_a_part_whole_instead_of_its_pieces(tmp_path):
    # 1 GiB in 32 MiB manifest parts: 4 pieces of 8 MiB each, 128 requests
    fetcher, queue = fetcher_for(tmp_path, 1024 * MiB, fixed=32 * MiB)
    assert len(queue) == 128 and queue[0].piece_offset == 0
    one = fetcher.take(queue, 1)
    assert [r.piece_offset for r in one.requests] == [0]  # not settled: one piece
    run = fetcher.take(queue, 8)  # the rest of part 0; part 1 is left whole
    assert [(r.part.index, r.piece_offset) for r in run.requests] == [
        (0, 8 * MiB),
        (0, 16 * MiB),
        (0, 24 * MiB),
    ]
    run = fetcher.take(queue, 8)  # part 1, whole: one GET, hashed as it streams
    [whole] = run.requests
    assert (whole.part.index, whole.piece_offset, whole.position, whole.end) == (
        1,
        None,
        32 * MiB,
        64 * MiB,
    )
    assert len(whole.hashers) == 1 and run.describe() == f"part 1 bytes {32 * MiB}-{64 * MiB - 1}"
    assert queue[0].part.index == 2 and len(queue) == 128 - 8


def test_a_run_is_contiguous_and_bounded(tmp_path):
    fetcher, queue = fetcher_for(tmp_path, 100 * MiB, fixed=8 * MiB)  # 13 whole parts
    run = fetcher.take(queue, 100)
    assert isinstance(run, Run) and run.position == 0 and run.end == 32 * MiB
    assert [r.part.index for r in run.requests] == [0, 1, 2, 3]
    assert fetcher.take(queue, 2).describe() == f"parts 4-5 bytes {32 * MiB}-{48 * MiB - 1}"


async def test_a_run_is_one_get_and_a_cut_inside_it_resumes_where_it_stopped(
    s3_server, s3_client, bucket, tmp_path
):
    part = 64 * 1024
    data = hashlib.shake_256(b"run").digest(6 * part)
    s3_client.put_object(Bucket=bucket, Key="k", Body=data)
    config = TransferConfig(transfer_max_attempts=3, transfer_read_timeout_s=5)
    sidecar = Sidecar(tmp_path / "k", JournalHeader("k", len(data), "e", part))
    resumed = await asyncio.to_thread(sidecar.open, None, md5=False)
    async with (
        FaultProxy(s3_server) as proxy,
        S3Store(moto_bucket_config(proxy.url, bucket), config) as store,
        range_source(store, "k", config, streams=2) as source,
    ):
        fetcher, _ = fetcher_for(
            tmp_path, len(data), fixed=part, store=store, source=source, sidecar=sidecar
        )
        queue = fetcher.requests(plan_download(len(data), part_size=part).parts(), resumed)
        run = fetcher.take(queue, 4)
        assert [r.part.index for r in run.requests] == [0, 1, 2, 3]
        proxy.add(Fault("truncate", range_start=0, after_bytes=part + 5000))  # inside part 1
        await fetcher.fetch(run, queue)
    await asyncio.to_thread(sidecar.close)
    starts = [start for _, _, start in proxy.stats.gets()]
    assert len(starts) == 2 and part <= starts[1] <= part + 5000  # after what was written
    assert sorted(fetcher.completed) == [0, 1, 2, 3]
    for index, record in fetcher.completed.items():
        assert record.xxh3 == xxhash.xxh3_128(data[index * part : (index + 1) * part]).hexdigest()
    assert (tmp_path / "k.partial").read_bytes()[: 4 * part] == data[: 4 * part]
