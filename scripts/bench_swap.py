#!/usr/bin/env python
"""Shard-swap benchmark: stall at each swap and peak disk, against a local S3 server.

Starts moto's S3 server (a separate process, on a free loopback port), uploads
``--train-shards`` llm.c shards of ``--shard-mb`` MB (plus a small validation shard)
with the project's uploader, then steps windows through ``--swaps`` shard swaps with
the SharedShardedDatasetManager (keep off, prefetch 1). Before each swap it lets the
prefetch finish (the case the bar is about), then times ``dataset_for(window)``.
A sampler thread records the bytes allocated in the local dataset folder.

Prints swap stall p50/p99 and peak bytes on disk / largest shard size.
Bars: p99 stall <= 10 ms; peak disk <= 2 shards + one part buffer.

    python scripts/bench_swap.py                 # 4 x 256 MB shards, 20 swaps
    python scripts/bench_swap.py --shard-mb 32   # a quick smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from tplr.comms.config import BucketConfig
from tplr.comms.download.plan import auto_part_size
from tplr.comms.manifest import MANIFEST_NAME, build_manifest, write_manifest_atomic
from tplr.comms.stores.s3 import S3Store
from tplr.comms.transfer_config import TransferConfig
from tplr.comms.upload import upload_file
from tplr.data.formats import TokenFormat
from tplr.data.manager import SharedShardedDatasetManager, dataset_opener
from tplr.data.manager_config import DatasetConfig
from tplr.data.manager_files import allocated_bytes_under
from tplr.data.manager_metrics import DatasetMetrics
from tplr.data.shard_state import ShardState
from tplr.data.tools.writers import TokenShardWriter

PREFIX = "bench/tokenized/"
BUCKET = "bench-swap"
WINDOWS_PER_SHARD = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def write_shards(folder: Path, count: int, tokens: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count + 1):
        n = tokens if index < count else 1 << 16  # the held-out validation shard is small
        path = folder / f"bench_train_{index:06d}.bin"
        with TokenShardWriter(path, TokenFormat.LLMC, np.dtype("<u2")) as writer:
            for start in range(0, n, 1 << 24):
                writer.append(rng.integers(0, 50257, min(1 << 24, n - start), dtype=np.uint16))
            writer.finish()
        paths.append(path)
    write_manifest_atomic(build_manifest(folder), folder / MANIFEST_NAME)
    return paths


class DiskSampler(threading.Thread):
    def __init__(self, folder: Path, interval_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.folder, self.interval_s, self.peak = folder, interval_s, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, allocated_bytes_under(self.folder))
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


async def run(args: argparse.Namespace, work: Path, endpoint: str) -> None:
    bucket = BucketConfig(
        bucket_name=BUCKET,
        access_key_id=SecretStr("bench"),
        secret_access_key=SecretStr("bench"),
        endpoint_url=endpoint,
        region="us-east-1",
    )
    tokens = args.shard_mb * 1_000_000 // 2
    paths = write_shards(work / "src", args.train_shards, tokens)
    shard_bytes = max(p.stat().st_size for p in paths)
    async with S3Store(bucket, TransferConfig(), max_connections=32) as store:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)
        for path in [*paths, work / "src" / MANIFEST_NAME]:
            await upload_file(store, path, PREFIX + path.name)
        print(f"uploaded {len(paths)} shards of {shard_bytes / 1e6:.0f} MB to {endpoint}")

        local = work / "local"
        config = DatasetConfig(bins_path=PREFIX, local_dir=local, disk_margin=0)
        sampler = DiskSampler(local)
        stalls_ms: list[float] = []
        async with SharedShardedDatasetManager(
            store,
            config,
            windows_per_shard=WINDOWS_PER_SHARD,
            open_shard=dataset_opener(1024),
            metrics=DatasetMetrics(CollectorRegistry()),
        ) as manager:
            await manager.dataset_for(0)
            sampler.start()
            n = manager.num_train_shards
            for swap in range(1, args.swaps + 1):
                window = swap * WINDOWS_PER_SHARD
                upcoming = manager.shard_index_for(window)
                while manager.slots[upcoming].state is not ShardState.READY:
                    await asyncio.sleep(0.005)  # the prefetch had time to finish
                for w in range(window - WINDOWS_PER_SHARD + 1, window):
                    await manager.dataset_for(w)  # the windows in between: no swap
                started = time.perf_counter()
                dataset = await manager.dataset_for(window)
                stalls_ms.append((time.perf_counter() - started) * 1000)
                assert manager.active_index == upcoming == swap % n
                _ = dataset[len(dataset) - 1][0]  # the new shard is mapped and readable
            while any(s.state is ShardState.DOWNLOADING for s in manager.slots):
                await asyncio.sleep(0.01)
        sampler.stop()

    stalls_ms.sort()
    p50 = statistics.median(stalls_ms)
    p99 = stalls_ms[min(len(stalls_ms) - 1, round(0.99 * (len(stalls_ms) - 1)))]
    part = auto_part_size(shard_bytes)
    ratio = sampler.peak / shard_bytes
    bar_disk = 2 + part / shard_bytes
    print(f"swaps: {len(stalls_ms)} of {n} shards x {shard_bytes / 1e6:.0f} MB (keep off)")
    print(
        f"swap stall: p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {max(stalls_ms):.3f} ms "
        f"(bar p99 <= 10 ms: {'PASS' if p99 <= 10 else 'FAIL'})"
    )
    print(
        f"peak disk: {sampler.peak / 1e6:.0f} MB = {ratio:.3f} x largest shard "
        f"(bar <= {bar_disk:.3f}: {'PASS' if ratio <= bar_disk else 'FAIL'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard-mb", type=int, default=256, help="size of each train shard")
    parser.add_argument("--train-shards", type=int, default=4, help="number of train shards")
    parser.add_argument("--swaps", type=int, default=20, help="number of swaps to time")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default /tmp)")
    args = parser.parse_args()
    port = free_port()
    moto = start_moto(port)
    try:
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="tplr-bench-swap-") as tmp:
            asyncio.run(run(args, Path(tmp), f"http://127.0.0.1:{port}"))
    finally:
        moto.terminate()
        moto.wait()


if __name__ == "__main__":
    main()
