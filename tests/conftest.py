"""Shared fixtures: a real S3 API server (moto, server mode) on a free loopback port,
and per-test isolation of the AWS_* / R2_* / tplr environment variables."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from moto.server import ThreadedMotoServer
from pydantic import SecretStr

from tplr.comms.config import BucketConfig

TEST_ACCESS_KEY = "testing-access-key"
TEST_SECRET_KEY = "testing-secret-key"

# Fuzz budget: the whole property-based suite must stay well under 3 minutes on 2 cores.
# CI (CI=true) runs a fixed, derandomized sample so a red build is reproducible; locally the
# examples vary between runs. HYPOTHESIS_PROFILE=deep runs many more examples on demand.
hypothesis_settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
hypothesis_settings.register_profile(
    "dev",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
hypothesis_settings.register_profile(
    "deep", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck)
)
hypothesis_settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)

_ISOLATED_PREFIXES = (
    "AWS_",
    "R2_",
    "DATASET_",
    "DOWNLOAD_",
    "UPLOAD_",
    "TRANSFER_",
    "TPLR_",
    "METRICS_",
    "HEALTH_",
    "PEERS_",
    "NODE_",
    "TRAIN_",
    "RUN_",
    "HF_",
)


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> Iterator[None]:
    """No test sees the developer's credentials or tplr settings, and none leaks its own."""
    for name in list(os.environ):
        if name.startswith(_ISOLATED_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "aws_config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "aws_credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield


def moto_bucket_config(
    endpoint: str, name: str, *, key: str = TEST_ACCESS_KEY, secret: str = TEST_SECRET_KEY
) -> BucketConfig:
    """Settings for one bucket on the test S3 server."""
    return BucketConfig(
        bucket_name=name,
        access_key_id=SecretStr(key),
        secret_access_key=SecretStr(secret),
        endpoint_url=endpoint,
        region="us-east-1",
    )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server once per session; yields its endpoint URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_client(s3_server: str):
    """A plain boto3 client for arranging test state (never the code under test)."""
    return boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id=TEST_ACCESS_KEY,
        aws_secret_access_key=TEST_SECRET_KEY,
        region_name="us-east-1",
    )


@pytest.fixture
def bucket(s3_client) -> str:
    """A fresh, empty bucket per test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


SMALL_DISK_BYTES = 2 * 1024 * 1024


@dataclass
class SmallDisk:
    folder: Path
    """A 2 MiB disk: a real tmpfs where this machine lets the test mount one (root), else
    a folder whose injected free-space probe reports a 2 MiB disk. Tests run either way."""

    real: bool  # a tmpfs of SMALL_DISK_BYTES: writes past it fail with ENOSPC

    def probe(self, _path: Path) -> int:
        """Free bytes of a SMALL_DISK_BYTES disk holding what is in ``folder`` now."""
        if self.real:
            return shutil.disk_usage(self.folder).free
        used = sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())
        return SMALL_DISK_BYTES - used


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    folder = tmp_path / "small"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK_BYTES}", "tmpfs", str(folder)]
    mounted = (
        shutil.which("mount") is not None
        and subprocess.run(mount, capture_output=True, check=False).returncode == 0
    )
    try:
        yield SmallDisk(folder, real=mounted)
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread, so timings and reductions don't depend on the machine's cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def node_test_data(tmp_path_factory):
    """The node tests' dataset and warmed-up initial model, built once per session."""
    from node_harness import make_test_data

    return make_test_data(tmp_path_factory.mktemp("node-data"))


@pytest.fixture(scope="session")
def s3_auth_server() -> Iterator[tuple[str, dict[str, str]]]:
    """A second, separate moto server that enforces IAM auth (its own process, so the
    shared server stays open). The first 4 requests set up a user allowed on 'good' only."""
    code = (
        "import sys\nfrom moto.server import ThreadedMotoServer\n"
        "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\n"
        "s.start()\nprint(s.get_host_and_port()[1], flush=True)\nsys.stdin.read()\n"
    )
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4")
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        endpoint = f"http://127.0.0.1:{int(proc.stdout.readline())}"
        admin = dict(endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="y")
        iam = boto3.client("iam", region_name="us-east-1", **admin)
        iam.create_user(UserName="miner")
        key = iam.create_access_key(UserName="miner")["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": "s3:*",
                    "Resource": ["arn:aws:s3:::good", "arn:aws:s3:::good/*"],
                }
            ],
        }
        iam.put_user_policy(UserName="miner", PolicyName="p", PolicyDocument=json.dumps(policy))
        boto3.client("s3", region_name="us-east-1", **admin).create_bucket(Bucket="good")
        yield endpoint, {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
