"""`tplr doctor` against real servers: moto (good keys, a missing bucket), moto behind a proxy
that refuses writes with 403 AccessDenied (a read-only key, as R2 answers it) or rewrites
Date (a wrong clock), and a free-space probe that reports a small disk."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY, moto_bucket_config
from node_harness import PREFIX, TEST_RUN, NetworkLayout, build_dataset, publish_folder, s3_settings
from pydantic import SecretStr
from s3_rewrite_proxy import S3RewriteProxy

from tplr.comms.stores.s3 import S3Store
from tplr.comms.transfer_config import TransferConfig
from tplr.doctor.report import CheckResult
from tplr.doctor.run import DoctorOptions, run_doctor
from tplr.node.network.peers import PeerList, publish_peer_list
from tplr.node.network.run_spec import publish_run_spec
from tplr.node.process.settings import NodeSettings
from tplr.node.scoring import MinerVerdict, ScoreBoard, publish_scores
from tplr.protocol.run_spec import RunSpec
from tplr.protocol.scoring import ScoringConfig

ROOT = Path(__file__).resolve().parents[1]
WINDOW_S = 60.0


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("doctor-data"), rows_per_shard=256, shards=4)


@pytest.fixture
async def network(s3_server, s3_client, shards, tmp_path) -> NetworkLayout:
    """A lead (uid 0) with run.json, scores and a peer list naming miner 1, which has
    uploaded a payload for the current window."""
    tag = uuid.uuid4().hex[:8]
    layout = NetworkLayout(
        endpoint=s3_server,
        dataset_bucket=f"data-{tag}",
        buckets={0: f"lead-{tag}", 1: f"miner-{tag}"},
        roles={0: "validator", 1: "miner"},
        peers_file=tmp_path / "peers.yaml",
    )
    for name in (layout.dataset_bucket, *layout.buckets.values()):
        s3_client.create_bucket(Bucket=name)
    layout.write_peers_file()
    transfer = TransferConfig()
    genesis = float(int(time.time()) - 10 * WINDOW_S)
    spec = RunSpec(genesis_s=genesis, sequence_length=128, vocab_size=257, **TEST_RUN)
    window = spec.window_clock().current_window()
    async with S3Store(moto_bucket_config(s3_server, layout.dataset_bucket), transfer) as data:
        await publish_folder(data, shards, PREFIX)
    async with S3Store(moto_bucket_config(s3_server, layout.buckets[0]), transfer) as lead:
        await publish_run_spec(lead, spec)
        board = ScoreBoard(ScoringConfig())
        verdict = MinerVerdict(reason=None, evaluated=True, raw_reward=0.01, window_score=1.25)
        board.close_window(window - 1, {1: verdict}, expected_uids=[1])
        await publish_scores(lead, board)
        await publish_peer_list(lead, PeerList(window=window + 1, uids=(1,), published_by=0))
    async with S3Store(moto_bucket_config(s3_server, layout.buckets[1]), transfer) as own:
        await own.put(f"gradients/{window}/1.safetensors", b"payload")
    return layout


def miner_settings(layout: NetworkLayout, home: Path, **gradients) -> NodeSettings:
    settings = s3_settings(layout, 1, home)
    node = settings.node.model_copy(update={"device": "cpu"})
    bucket = settings.gradients_bucket.model_copy(
        update={
            "read_access_key_id": SecretStr(TEST_ACCESS_KEY),
            "read_secret_access_key": SecretStr(TEST_SECRET_KEY),
            **gradients,
        }
    )
    return settings.model_copy(update={"node": node, "gradients_bucket": bucket})


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {result.name: result for result in results}


async def test_good_keys_pass_every_check(network, tmp_path):
    results = by_name(await run_doctor(miner_settings(network, tmp_path / "home")))
    failed = [r.line() for r in results.values() if r.status == "fail"]
    assert not failed, failed
    for name in ("clock (dataset)", "clock (gradients)", "dataset bucket", "gradients bucket write",
                 "peers file", "dataset", "disk", "run.json", "gpu", "last upload", "score",
                 "peer list"):  # fmt: skip
        assert results[name].status == "ok", results[name].line()
    assert results["score"].detail.endswith("in the lead's scores of window 9")
    assert "local settings agree" in results["run.json"].detail
    # moto without auth lets any key write: the doctor says the read key is too strong
    assert results["gradients bucket read key"].status == "warn"


async def test_a_read_only_write_key_fails_the_write_check(network, tmp_path):
    async with S3RewriteProxy(network.endpoint, refuse_writes=True) as proxy:
        settings = miner_settings(network, tmp_path / "home", endpoint_url=proxy.url)
        results = by_name(await run_doctor(settings))
    line = results["gradients bucket write"].line()
    assert line.startswith("fail  gradients bucket write: access denied: PUT"), line
    assert "check the access key id and secret" in line
    assert results["dataset bucket"].status == "ok"


async def test_a_missing_bucket_is_named(network, tmp_path):
    settings = miner_settings(network, tmp_path / "home", bucket_name="no-such-bucket-tplr")
    results = await run_doctor(settings)
    failed = [r.line() for r in results if r.status == "fail"]
    assert any("bucket 'no-such-bucket-tplr' does not exist" in line for line in failed), failed


async def test_a_store_clock_an_hour_ahead_fails(network, tmp_path):
    async with S3RewriteProxy(network.endpoint, date_offset_s=3600) as proxy:
        settings = miner_settings(network, tmp_path / "home", endpoint_url=proxy.url)
        results = by_name(await run_doctor(settings))
    clock = results["clock (gradients)"]
    assert (
        clock.status == "fail" and "s ahead of this host" in clock.detail and "NTP" in clock.detail
    )
    assert 3590 < float(clock.detail.split("is ")[1].split("s ")[0]) < 3610
    assert results["clock (dataset)"].status == "ok"  # the dataset store's clock is right


async def test_too_little_disk_for_the_next_shard_fails(network, tmp_path):
    options = DoctorOptions(free_space_probe=lambda path: 1_000_000)
    results = by_name(await run_doctor(miner_settings(network, tmp_path / "home"), options))
    disk = results["disk"]
    assert (
        disk.status == "fail" and "short by" in disk.detail and "DATASET_LOCAL_DIR" in disk.detail
    )


def doctor_env(layout: NetworkLayout, home: Path, gradients_bucket: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPLR_", "R2_", "AWS_"))}
    env.update(
        TPLR_UID="1", TPLR_HOME=str(home), TPLR_DEVICE="cpu", TPLR_LEAD_UID="0",
        PEERS_FILE=str(layout.peers_file), DATASET_LOCAL_DIR=str(home / "dataset"),
        R2_DATASET_BUCKET_NAME=layout.dataset_bucket, R2_DATASET_ENDPOINT_URL=layout.endpoint,
        R2_DATASET_READ_ACCESS_KEY_ID=TEST_ACCESS_KEY,
        R2_DATASET_READ_SECRET_ACCESS_KEY=TEST_SECRET_KEY,
        R2_GRADIENTS_BUCKET_NAME=gradients_bucket, R2_GRADIENTS_ENDPOINT_URL=layout.endpoint,
        R2_GRADIENTS_WRITE_ACCESS_KEY_ID=TEST_ACCESS_KEY,
        R2_GRADIENTS_WRITE_SECRET_ACCESS_KEY=TEST_SECRET_KEY,
        AWS_EC2_METADATA_DISABLED="true",
    )  # fmt: skip
    return env


def test_the_command_prints_one_line_per_check_and_exits_by_outcome(network, tmp_path):
    command = [sys.executable, "-m", "tplr", "--log-level", "WARNING", "doctor", "miner"]
    good = subprocess.run(
        command, env=doctor_env(network, tmp_path, network.buckets[1]), cwd=tmp_path,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert good.returncode == 0, good.stdout + good.stderr
    lines = good.stdout.splitlines()
    assert lines[-1] == "all checks passed"
    assert all(line[:6].strip() in {"ok", "warn", "skip"} for line in lines[:-1]), lines
    bad = subprocess.run(
        command, env=doctor_env(network, tmp_path, "missing-bucket-tplr"), cwd=tmp_path,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr and bad.stdout.splitlines()[-1].endswith("failed")
    usage = subprocess.run(
        [*command, "--uid", "x"], env=doctor_env(network, tmp_path, network.buckets[1]),
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert usage.returncode == 2 and "invalid TPLR_UID (flag --uid)" in usage.stderr
