"""A real HealthServer in a process of its own, with a low file-descriptor limit.

    python tests/health_server_proc.py NOFILE

Prints ``port N`` once it serves. Each line on stdin ``open K`` makes it open K files at
once (the node's own file work) and answer ``opened K`` or ``failed: <error>``;
``quit`` (or EOF) stops it.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys

from prometheus_client import CollectorRegistry

from tplr.node.process.health import HealthServer, HealthStatus
from tplr.node.process.lifecycle import new_event_loop


def open_files(count: int) -> str:
    handles = []
    try:
        for _ in range(count):
            handles.append(open(os.devnull, "rb"))  # noqa: SIM115 - closed below
    except OSError as exc:
        return f"failed: {exc}"
    finally:
        for handle in handles:
            handle.close()
    return f"opened {count}"


async def main(nofile: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
    ok = HealthStatus(True, "fine")
    async with HealthServer(registry=CollectorRegistry(), health=lambda: ok) as server:
        print(f"port {server.port}", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if not line or line == "quit":
                return
            command, _, count = line.partition(" ")
            if command == "open":
                print(open_files(int(count)), flush=True)


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=new_event_loop) as runner:  # uvloop, as the node runs
        runner.run(main(int(sys.argv[1])))
