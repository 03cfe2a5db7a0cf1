#!/usr/bin/env python
"""Start-up benchmark: the whole-process time of fetching a 1-byte object.

For a 1-byte object the time of a fetch is its start-up: interpreter, imports, settings,
the first request. A local nginx (the one ``bench_download.py`` starts) serves the object;
each contender runs as its own process, interleaved, ``--rounds`` times, and the script
prints the medians and tplr / s5cmd:

- tplr s3: ``tplr fetch s3://bucket/KEY DEST --endpoint-url ...`` (presigned GET)
- tplr http: ``tplr fetch http://127.0.0.1:PORT/bucket/KEY DEST`` (an HTTP(S) source)
- s5cmd: ``s5cmd cp`` (Go; what start-up costs without an interpreter)
- curl: one GET
- python: an empty interpreter (``python -c pass``), the floor for any Python tool

    .venv/bin/python scripts/bench_startup.py              # 9 rounds
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

from bench_download import (
    BUCKET,
    NGINX,
    S5CMD,
    child_env,
    compile_bytecode,
    nginx,
    run_child,
)

KEY = "bench/one-byte.bin"


def commands(port: int, dest: Path) -> dict[str, list[str]]:
    endpoint = f"http://127.0.0.1:{port}"
    tplr = [sys.executable, "-m", "tplr", "--log-level", "WARNING", "fetch"]
    quiet = ["--no-progress", "--verify", "size"]
    source = f"s3://{BUCKET}/{KEY}"
    return {
        "tplr s3": [*tplr, source, str(dest), "--endpoint-url", endpoint, *quiet],
        "tplr http": [*tplr, f"{endpoint}/{BUCKET}/{KEY}", str(dest), *quiet],
        "s5cmd": [S5CMD, "--endpoint-url", endpoint, "--no-sign-request", "cp", source, str(dest)],
        "curl": ["curl", "-sSf", "-o", str(dest), f"{endpoint}/{BUCKET}/{KEY}"],
        "python": [sys.executable, "-c", "pass"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tplr-bench-startup"))
    args = parser.parse_args()
    missing = [tool for tool in (S5CMD, NGINX, "curl") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"the benchmark needs {', '.join(missing)} (see bench_download.py)")
    www = args.workdir / "www"
    source = www / BUCKET / KEY
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(b"x")
    dest = args.workdir / "out" / "one-byte.bin"
    dest.parent.mkdir(parents=True, exist_ok=True)
    compile_bytecode()
    env = child_env()
    times: dict[str, list[float]] = {}
    with nginx(www, args.workdir / "nginx", 1 << 20) as (port, _):
        contenders = commands(port, dest)
        names = list(contenders)
        for round_no in range(args.rounds):
            shift = round_no % len(names)
            for name in names[shift:] + names[:shift]:
                dest.unlink(missing_ok=True)
                seconds, _ = run_child(contenders[name], env)
                if name != "python" and dest.read_bytes() != b"x":
                    raise SystemExit(f"{name} fetched the wrong bytes")
                times.setdefault(name, []).append(seconds)
    print(f"whole-process time of a 1-byte fetch, median of {args.rounds} (interleaved):")
    for name in names:
        print(f"  {name:10s} {statistics.median(times[name]) * 1000:7.1f} ms")
    ratio = statistics.median(times["tplr s3"]) / statistics.median(times["s5cmd"])
    print(f"tplr s3 / s5cmd: {ratio:.1f}x the time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
