#!/usr/bin/env python
"""Node benchmarks: the two process-model claims of the miner/validator, each measured
side by side with the straightforward alternative, in one run, with the ratio printed.

1. **The event loop stays responsive while the model trains.** A node runs its inner steps
   and compression in a worker thread (``asyncio.to_thread``). While a window's training
   runs, a client thread polls ``/healthz`` every few milliseconds and records each
   request's latency. Competitor: the same training called directly on the event loop.
2. **Peers are gathered concurrently.** :class:`tplr.node.network.gather.PayloadFetcher` fetches
   every peer's payload at once (bounded, each with its own deadline) from a real S3 API
   server (moto on loopback, behind a proxy that delays each request by ``--latency-ms``
   as a WAN link to R2 would). Competitor: the same fetches one peer after another.

Rounds alternate (competitor, ours) to share the machine's noise; medians are printed.

    .venv/bin/python scripts/bench_node.py                      # defaults
    .venv/bin/python scripts/bench_node.py --peers 32 --payload-mib 4 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import logging
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable

import torch
from moto.server import ThreadedMotoServer
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from tplr.comms.config import BucketConfig
from tplr.comms.retry import RetryPolicy
from tplr.comms.stores.s3 import S3Store
from tplr.node.network.gather import PayloadFetcher
from tplr.node.network.prefixed_store import PrefixedStore
from tplr.node.process.health import HealthServer, ProgressTracker
from tplr.node.process.settings import GatherConfig
from tplr.protocol.clock import FakeClock, WindowClock
from tplr.protocol.payload import payload_key
from tplr.train.compression import CompressionSettings, ErrorFeedbackCompressor
from tplr.train.config import ModelConfig, TrainConfig
from tplr.train.worker import TrainWorker


# -- 1. event loop responsiveness -------------------------------------------------------------
def make_training(model: str, steps: int, seq_len: int) -> Callable[[], None]:
    """One window of a miner's compute: inner steps, Δ, restore, compression."""
    config = TrainConfig(
        lr=3e-3,
        micro_batch_size=8,
        global_batch_size=8,
        seq_len=seq_len,
        device="cpu",
        prefetch_batches=0,
        total_steps=1 << 30,
        warmup_steps=0,
    )
    worker = TrainWorker(ModelConfig.preset(model, vocab_size=257, max_seq_len=seq_len), config)
    compressor = ErrorFeedbackCompressor(CompressionSettings(chunk_size=128, topk=16))
    tokens = torch.randint(0, 257, (8, seq_len))

    def train() -> None:
        snapshot = worker.snapshot()
        worker.train_steps([(tokens, tokens)] * steps, steps)
        delta = worker.pseudo_gradient(snapshot)
        worker.restore(snapshot)
        compressor.compress(delta)

    return train


def poll_latencies(port: int, stop: threading.Event, out: list[float], every_s: float) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/healthz")
        connection.getresponse().read()
        connection.close()
        out.append(time.perf_counter() - started)
        time.sleep(every_s)


async def loop_latency_round(train: Callable[[], None], *, off_loop: bool) -> list[float]:
    windows = WindowClock(genesis_s=0, window_seconds=60, clock=FakeClock(0))
    progress = ProgressTracker(windows)
    async with HealthServer(registry=CollectorRegistry(), health=progress.status) as server:
        latencies: list[float] = []
        stop = threading.Event()
        client = threading.Thread(
            target=poll_latencies, args=(server.port, stop, latencies, 0.005), daemon=True
        )
        client.start()
        await asyncio.sleep(0.1)
        if off_loop:
            await asyncio.to_thread(train)  # ours
        else:
            train()  # competitor: compute on the event loop
        await asyncio.sleep(0.1)
        stop.set()
        await asyncio.to_thread(client.join)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_loop(args: argparse.Namespace) -> None:
    train = make_training(args.model, args.steps, args.seq_len)
    train()  # warm-up
    results: dict[str, list[float]] = {"on the loop": [], "to_thread (ours)": []}
    maxima: dict[str, list[float]] = {"on the loop": [], "to_thread (ours)": []}
    for _ in range(args.rounds):
        for name, off_loop in (("on the loop", False), ("to_thread (ours)", True)):
            latencies = await loop_latency_round(train, off_loop=off_loop)
            results[name].append(percentile(latencies, 0.99))
            maxima[name].append(max(latencies))
    print(f"\n1. /healthz latency while one window trains ({args.model}, {args.steps} steps)")
    for name in results:
        p99 = statistics.median(results[name]) * 1e3
        worst = statistics.median(maxima[name]) * 1e3
        print(f"   {name:>18}: p99 {p99:8.1f} ms   max {worst:8.1f} ms")
    ratio = statistics.median(results["on the loop"]) / statistics.median(
        results["to_thread (ours)"]
    )
    print(f"   p99 ratio (on the loop / ours): {ratio:.1f}x")


# -- 2. concurrent gather ------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def latency_proxy(host: str, port: int, latency_s: float):
    """A TCP proxy that holds every client->server chunk (a request) for ``latency_s``."""

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay_s: float):
        try:
            while data := await src.read(1 << 16):
                if delay_s:
                    await asyncio.sleep(delay_s)
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            dst.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, port)
        await asyncio.gather(pipe(reader, up_writer, latency_s), pipe(up_reader, writer, 0.0))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def bucket_config(name: str, endpoint: str) -> BucketConfig:
    return BucketConfig(
        bucket_name=name,
        access_key_id=SecretStr("bench"),
        secret_access_key=SecretStr("bench"),
        endpoint_url=endpoint,
        region="us-east-1",
    )


class BucketDirectory:
    """Every peer under its own prefix of one bucket (the embedded store's layout)."""

    def __init__(self, store: S3Store) -> None:
        self.store = store

    async def miners(self) -> list[int]:
        return []

    async def validators(self) -> list[int]:
        return []

    async def store_for(self, uid: int) -> PrefixedStore:
        return PrefixedStore(self.store, f"uids/{uid}/")


async def gather_round(fetcher: PayloadFetcher, peers: int, *, concurrent: bool) -> float:
    started = time.perf_counter()
    if concurrent:
        outcome = await fetcher.fetch(0, range(peers), max_bytes=1 << 40)
        assert len(outcome.fetched) == peers
    else:
        for uid in range(peers):
            outcome = await fetcher.fetch(0, [uid], max_bytes=1 << 40)
            assert len(outcome.fetched) == 1
    return time.perf_counter() - started


async def fill_bucket(config: BucketConfig, peers: int, payload: bytes) -> None:
    async with S3Store(config) as store:
        await store._client.create_bucket(Bucket=config.bucket_name)
        for uid in range(peers):
            await store.put(f"uids/{uid}/{payload_key(0, uid)}", payload)


async def time_gathers(config: BucketConfig, args: argparse.Namespace) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"one by one": [], "concurrent (ours)": []}
    async with S3Store(config, max_connections=args.peers) as store:
        fetcher = PayloadFetcher(BucketDirectory(store), GatherConfig(), RetryPolicy())
        for _ in range(args.rounds):
            for name, concurrent in (("one by one", False), ("concurrent (ours)", True)):
                seconds = await gather_round(fetcher, args.peers, concurrent=concurrent)
                times[name].append(seconds)
    return times


async def bench_gather(args: argparse.Namespace) -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log lines
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    name = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        payload = os.urandom(int(args.payload_mib * 1024 * 1024))
        await fill_bucket(bucket_config(name, f"http://{host}:{port}"), args.peers, payload)
        async with latency_proxy(host, port, args.latency_ms / 1000) as proxy_port:
            times = await time_gathers(bucket_config(name, f"http://127.0.0.1:{proxy_port}"), args)
    finally:
        server.stop()
    total_mib = args.peers * args.payload_mib
    print(
        f"\n2. gather {args.peers} payloads of {args.payload_mib:g} MiB from S3 (moto on "
        f"loopback, {args.latency_ms:g} ms added per request)"
    )
    for label, values in times.items():
        seconds = statistics.median(values)
        print(f"   {label:>18}: {seconds:6.2f} s   {total_mib / seconds:8.1f} MiB/s")
    ratio = statistics.median(times["one by one"]) / statistics.median(times["concurrent (ours)"])
    print(f"   speed-up (one by one / ours): {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="model preset for the training window")
    parser.add_argument("--steps", type=int, default=40, help="inner steps per window")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--peers", type=int, default=16)
    parser.add_argument("--payload-mib", type=float, default=1.0)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="added per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(bench_loop(args))
        asyncio.run(bench_gather(args))


if __name__ == "__main__":
    main()
