"""A real node serves /metrics and /healthz from its first second: a lead validator whose
dataset arrives slowly (moto behind a proxy paced to a trickle) is scraped while it waits for
its first shard, then while it validates; SIGTERM still stops it with exit code 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY, moto_bucket_config
from fault_proxy import FaultProxy
from node_harness import PREFIX, build_dataset, publish_folder
from prometheus_client.parser import text_string_to_metric_families

from tplr.comms.stores.s3 import S3Store
from tplr.comms.transfer_config import TransferConfig

ROOT = Path(__file__).resolve().parents[1]
DOWNLOAD_S = 8.0  # how long the first shard takes to arrive through the proxy
LEAD_FLAGS = [
    *("--run-model", "tiny", "--run-window-seconds", "4", "--run-inner-steps", "2"),
    *("--run-micro-batch-size", "4", "--run-batch-size", "4"),
    *("--run-compression-chunk-size", "128", "--run-compression-topk", "16"),
    *("--validator-retention-windows", "6", "--run-checkpoint-every-windows", "2"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as response:
            return response.status, await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return 0, ""


def state_of(metrics_text: str) -> str | None:
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "tplr_node_state":
            return next((s.labels["state"] for s in family.samples if s.value == 1), None)
    return None


async def test_a_node_serves_health_and_metrics_while_its_dataset_arrives(
    s3_server, s3_client, tmp_path
):
    shards = build_dataset(tmp_path / "data", rows_per_shard=256, shards=4)
    s3_client.create_bucket(Bucket="slow-dataset")
    async with S3Store(moto_bucket_config(s3_server, "slow-dataset"), TransferConfig()) as store:
        await publish_folder(store, shards, PREFIX)
    first_shard_bytes = sum(p.stat().st_size for p in shards.glob("*_000000.*"))
    port = free_port()
    async with FaultProxy(s3_server, rate_bytes_per_s=first_shard_bytes / DOWNLOAD_S) as proxy:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TPLR_", "R2_"))}
        env.update(
            METRICS_PORT=str(port), TPLR_TORCH_THREADS="1", OMP_NUM_THREADS="1",
            TPLR_HOME=str(tmp_path / "home"), DATASET_LOCAL_DIR=str(tmp_path / "shards"),
            R2_DATASET_BUCKET_NAME="slow-dataset", R2_DATASET_ENDPOINT_URL=proxy.url,
            R2_DATASET_READ_ACCESS_KEY_ID=TEST_ACCESS_KEY,
            R2_DATASET_READ_SECRET_ACCESS_KEY=TEST_SECRET_KEY, TPLR_DEVICE="cpu",
        )  # fmt: skip
        log = open(tmp_path / "lead.log", "wb")  # noqa: SIM115 - closed below
        lead = subprocess.Popen(
            [sys.executable, "neurons/validator.py", "--lead", "--uid", "0", *LEAD_FLAGS],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            seen = await watch(lead, port, tmp_path / "lead.log")
        finally:
            if lead.poll() is None:
                lead.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(lead.wait, 60)
            log.close()
    downloading = seen["downloading"]
    assert downloading["healthz"] == (200, "ok: downloading: the dataset shard of window 0\n")
    assert downloading["window_seconds"] == 4.0, "the run is known while the shard arrives"
    assert downloading["dataset_series"], "the Data row has series during the download"
    assert seen["validating"]["healthz"][0] == 200
    assert code == 0, (tmp_path / "lead.log").read_text()[-3000:]


async def watch(lead: subprocess.Popen, port: int, log_path: Path) -> dict[str, dict]:
    """Scrape until the lead has been seen downloading and then validating."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 120
    async with aiohttp.ClientSession() as session:
        while "validating" not in seen and time.monotonic() < deadline:
            assert lead.poll() is None, log_path.read_text()[-3000:]
            status, metrics = await get(session, f"http://127.0.0.1:{port}/metrics")
            healthz = await get(session, f"http://127.0.0.1:{port}/healthz")
            state = state_of(metrics) if status == 200 else None
            if state is not None and state not in seen:
                families = {f.name: f for f in text_string_to_metric_families(metrics)}
                window = families.get("tplr_run_window_seconds")
                samples = window.samples if window else []
                seen[state] = {
                    "healthz": healthz,
                    "window_seconds": samples[0].value if samples else None,
                    "dataset_series": [
                        s.name for name, f in families.items() if name.startswith("tplr_dataset_")
                        for s in f.samples
                    ],
                }  # fmt: skip
            await asyncio.sleep(0.25)
    assert "downloading" in seen and "validating" in seen, (seen, log_path.read_text()[-3000:])
    return seen
