"""Node lifecycle: stop requests race every long wait, SIGTERM/SIGINT stop cleanly (exit 0),
a second signal or the grace period cancels, errors exit 2; and real node processes that
are killed (-9), restarted and finally stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from node_harness import build_dataset

from tplr.comms.stores.local import LocalStore
from tplr.errors import ConfigError
from tplr.node.network.directory import embedded_prefix
from tplr.node.network.prefixed_store import PrefixedStore
from tplr.node.network.reports import read_report, report_windows
from tplr.node.process.lifecycle import (
    EXIT_CONFIG,
    EXIT_OK,
    NodeStopped,
    Shutdown,
    run_node,
    supervise,
)
from tplr.node.process.log_setup import LogContext, configure_logging
from tplr.protocol.payload import read_safetensors_header

ROOT = Path(__file__).resolve().parents[1]


async def test_unless_stopped_returns_the_result_or_cancels_the_wait():
    shutdown = Shutdown()
    assert await shutdown.unless_stopped(asyncio.sleep(0, result="done")) == (True, "done")
    cancelled = asyncio.Event()

    async def long_wait() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    asyncio.get_running_loop().call_later(0.05, shutdown.request, "test")
    assert await shutdown.unless_stopped(long_wait()) == (False, None)
    assert cancelled.is_set() and shutdown.reason == "test"
    assert await shutdown.unless_stopped(asyncio.sleep(0)) == (False, None)  # already stopped


def send_later(signum: signal.Signals, delay_s: float) -> None:
    asyncio.get_running_loop().call_later(delay_s, os.kill, os.getpid(), signum)


async def test_sigterm_stops_at_the_next_safe_point_and_exits_0():
    steps: list[str] = []

    async def main(shutdown: Shutdown) -> None:
        while True:
            steps.append("work")
            await asyncio.sleep(0.01)  # a step in flight finishes
            finished, _ = await shutdown.unless_stopped(asyncio.sleep(3600))
            if not finished:
                steps.append("stopped")
                return

    send_later(signal.SIGTERM, 0.1)
    assert await supervise(main, grace_s=30) == EXIT_OK
    assert steps == ["work", "stopped"]


@pytest.mark.parametrize("second_signal", [True, False])
async def test_a_second_signal_or_the_grace_period_cancels_stuck_work(second_signal):
    cancelled = asyncio.Event()

    async def stuck(shutdown: Shutdown) -> None:
        try:
            await asyncio.sleep(3600)  # ignores the stop request
        except asyncio.CancelledError:
            cancelled.set()
            raise

    send_later(signal.SIGINT, 0.05)
    if second_signal:
        send_later(signal.SIGTERM, 0.15)
    started = time.monotonic()
    grace_s = 60.0 if second_signal else 0.3
    assert await supervise(stuck, grace_s=grace_s) == EXIT_OK
    assert cancelled.is_set() and time.monotonic() - started < 10


async def test_a_stop_during_a_wait_for_another_node_exits_0():
    async def waiting(shutdown: Shutdown) -> None:
        await shutdown.wait()
        raise NodeStopped("stopped while waiting for run.json")

    send_later(signal.SIGTERM, 0.05)
    assert await supervise(waiting, grace_s=30) == EXIT_OK


def test_a_typed_error_exits_2_with_its_message_and_hint(capsys):
    async def failing(shutdown: Shutdown) -> None:
        raise ConfigError("TPLR_UID is taken", hint="pick another uid")

    assert run_node(failing, grace_s=1) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "error: TPLR_UID is taken" in err and "hint: pick another uid" in err


# -- real processes ---------------------------------------------------------------------------
# batch 8 = micro 4 x 2 ranks (torchrun miner) = micro 4 x 2 accumulation steps (plain miner)
LEAD_FLAGS = [
    *("--run-model", "tiny", "--run-window-seconds", "10", "--run-inner-steps", "4"),
    *("--run-inner-lr", "0.003", "--run-outer-lr", "1.0", "--run-micro-batch-size", "4"),
    *("--run-batch-size", "8", "--run-compression-chunk-size", "128"),
    *("--run-compression-topk", "16", "--run-checkpoint-every-windows", "2"),
    *("--run-gate-samples", "64", "--run-heldout-samples", "128"),
    *(
        "--validator-retention-windows",
        "6",
    ),
]
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def start_node(home: Path, log: Path, *args: str, **extra_env: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPLR_", "R2_"))}
    env.update(extra_env)
    env.update(
        TPLR_HOME=str(home),
        METRICS_PORT="0",
        METRICS_HOST="127.0.0.1",
        TPLR_TORCH_THREADS="1",
        OMP_NUM_THREADS="1",
        TPLR_POLL_INTERVAL_S="0.5",
        TPLR_MINER_RETENTION_WINDOWS="6",
    )
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


async def reports(shared: LocalStore, uid: int) -> dict[int, tuple[str, tuple[int, ...]]]:
    """window -> (model digest, aggregated uids) from a node's reports."""
    store = PrefixedStore(shared, embedded_prefix(uid))
    found = {}
    for window in await report_windows(store):
        report = await read_report(store, window)
        found[window] = (report.model_digest, report.aggregated_uids)
    return found


async def wait_for_agreement(shared, processes, logs, *, after: int, timeout_s: float) -> int:
    """The first window > ``after`` in which the lead aggregated both miners and both
    miners' models equal the lead's."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process, log in zip(processes, logs, strict=True):
            assert process.poll() is None, log.read_text()[-3000:]
        lead, one, two = [await reports(shared, uid) for uid in (0, 1, 2)]
        for window in sorted(set(lead) & set(one) & set(two)):
            digest, aggregated = lead[window]
            both = aggregated == (1, 2) and one[window][0] == two[window][0] == digest
            if window > after and both:
                return window
        await asyncio.sleep(0.5)
    raise AssertionError("no agreement:\n" + "\n".join(log.read_text()[-2000:] for log in logs))


def assert_no_partial_objects(shared_root: Path, cache_root: Path) -> None:
    """Every object under a final name is complete; no scratch file was left behind."""
    for path in shared_root.rglob("*"):
        if ".tplr-store" in path.parts or not path.is_file():
            continue
        if path.suffix == ".safetensors":
            read_safetensors_header(path.read_bytes(), max_header_bytes=1 << 24)  # torn: raises
        elif path.suffix == ".json":
            json.loads(path.read_text())
    leftovers = [p for p in cache_root.rglob("*") if p.is_file() and ".tmp." in p.name]
    assert not leftovers


def make_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shards = build_dataset(tmp_path / "data", rows_per_shard=256, shards=4)
    (home / "dataset" / "remote").mkdir(parents=True)
    shards.rename(home / "dataset" / "remote" / "tokenized")
    return home


async def test_torchrun_miner_killed_miner_rejoin_and_sigterm_exits_0(tmp_path):
    """A lead, miner 1 under torchrun (2 gloo ranks, FSDP2) and a plain miner 2 hold the same
    model; miner 2 killed with -9 rejoins; SIGTERM stops every node cleanly."""
    home = make_home(tmp_path)
    logs = [tmp_path / "lead.log", tmp_path / "miner1.log", tmp_path / "miner2.log"]
    lead = start_node(home, logs[0], "neurons/validator.py", "--lead", "--uid", "0", *LEAD_FLAGS)
    miner1 = start_node(
        home, logs[1], *TORCHRUN, "neurons/miner.py", "--uid", "1", TPLR_PARALLEL="fsdp"
    )
    miner2_args = ("neurons/miner.py", "--uid", "2", "--lead-uid", "0")
    miner2 = start_node(home, logs[2], *miner2_args)
    shared = LocalStore(home / "shared")
    processes = [lead, miner1, miner2]
    try:
        first = await wait_for_agreement(shared, processes, logs, after=-1, timeout_s=150)
        miner2.kill()  # SIGKILL: no cleanup at all
        miner2.wait(timeout=30)
        miner2 = processes[2] = start_node(home, logs[2], *miner2_args)
        await wait_for_agreement(shared, processes, logs, after=first + 1, timeout_s=150)
        assert "loaded checkpoint" in logs[2].read_text().split("miner uid 2 in run")[-1]
        for process in processes:
            process.send_signal(signal.SIGTERM)
        assert lead.wait(timeout=60) == 0, logs[0].read_text()[-2000:]
        assert miner2.wait(timeout=60) == 0, logs[2].read_text()[-2000:]
        miner1.wait(timeout=60)  # torchrun's own exit code reports the signal it got
        ranks_log = logs[1].read_text()
        assert "stopped cleanly (SIGTERM)" in ranks_log and "rank 1: rank 0 stopped" in ranks_log
        assert_no_partial_objects(home / "shared", home / "cache")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


# -- logging ----------------------------------------------------------------------------------
WIRE_KEY_ID = "AKIAWIRELOGTEST00042"
WIRE_PROBE = """
import asyncio, sys
from pydantic import SecretStr
from tplr.comms.config import BucketConfig
from tplr.comms.stores.s3 import S3Store
from tplr.comms.transfer_config import TransferConfig
from tplr.node.process.lifecycle import configure_process

endpoint, bucket, key_id, wire = sys.argv[1:5]
configure_process(log_level="DEBUG", torch_threads=None, debug_wire=wire == "1")
config = BucketConfig(bucket_name=bucket, access_key_id=SecretStr(key_id),
                      secret_access_key=SecretStr("wire-secret"), endpoint_url=endpoint,
                      region="us-east-1")

async def main():
    async with S3Store(config, TransferConfig()) as store:
        await store.put("probe.bin", b"x" * 10)
        await store.head("probe.bin")

asyncio.run(main())
"""


def wire_log(endpoint: str, bucket: str, *, debug_wire: bool) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            WIRE_PROBE,
            endpoint,
            bucket,
            WIRE_KEY_ID,
            "1" if debug_wire else "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TPLR_"))},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_debug_logging_keeps_key_ids_and_signatures_out_unless_debug_wire(s3_server, bucket):
    """A real S3 PUT and HEAD on moto at --log-level DEBUG: no access key id, no SigV4
    signature in the log; --debug-wire shows both (so the check can fail)."""
    quiet = wire_log(s3_server, bucket, debug_wire=False)
    assert "DEBUG" in quiet, "the node's own DEBUG lines still appear"
    assert WIRE_KEY_ID not in quiet and "Signature=" not in quiet
    loud = wire_log(s3_server, bucket, debug_wire=True)
    assert WIRE_KEY_ID in loud and "Signature=" in loud
    assert "--debug-wire: HTTP/S3 request dumps are logged" in loud


def test_json_log_lines_carry_the_node_context():
    stream = io.StringIO()
    context = LogContext(role="validator", uid=4, run_id="run-9", rank=0, window_source=lambda: 12)
    try:
        configure_logging("info", log_format="json", context=context, stream=stream)
        logging.getLogger("tplr.test").info("window %d closed", 12)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("tplr.test").exception("failed")
    finally:
        configure_logging("WARNING")  # back to text for the other tests
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "window 12 closed" and first["level"] == "INFO"
    assert (first["role"], first["uid"], first["run_id"], first["window"], first["rank"]) == (
        "validator", 4, "run-9", 12, 0,
    )  # fmt: skip
    assert first["ts"].endswith("Z") and first["logger"] == "tplr.test"
    assert "ValueError: boom" in second["exc"]
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("bogus")
