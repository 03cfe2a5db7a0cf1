"""`make demo` needs only Python: it runs with a PATH that has no promtool and no
docker-compose, and scripts/setup_env.sh asks for those tools only with --with-test-tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
pytestmark = pytest.mark.timeout(600)


def python_only_path(tmp_path: Path) -> str:
    """A PATH of make, sh and bash alone (no promtool, prometheus, docker-compose)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("make", "sh", "bash", "env", "python3", "dirname", "id"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    path = str(bin_dir)
    for tool in ("promtool", "prometheus", "docker-compose", "docker"):
        assert shutil.which(tool, path=path) is None, tool
    return path


def test_make_demo_runs_without_promtool_or_docker_compose(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPLR_", "R2_", "DATASET_"))}
    env["PATH"] = python_only_path(tmp_path)
    home = tmp_path / "demo"
    command = [
        "make", "-o", f"{VENV}/.installed",  # this test's venv is already set up
        "demo", f"VENV={VENV}",
        f"DEMO_ARGS=--windows 2 --window-seconds 4 --home {home}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "=== summary ===" in result.stdout
    assert (
        "exit codes after SIGTERM: {'validator-0': 0, 'miner-1': 0, 'miner-2': 0}" in result.stdout
    )


def setup_dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": python_only_path(tmp_path),
        "TPLR_TORCH_INDEX_URL": "https://example.invalid/cpu",
    }
    return subprocess.run(
        ["bash", "scripts/setup_env.sh", "--dry-run", *args, str(tmp_path / "venv")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_setup_asks_for_test_tools_only_when_told_to(tmp_path: Path):
    plain = setup_dry_run(tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "prometheus" not in plain.stdout + plain.stderr
    assert "--index-url https://example.invalid/cpu" in plain.stdout, "torch: the CPU build"
    assert "-c docker/requirements.lock" in plain.stdout
    (tmp_path / "t").mkdir()
    tools = setup_dry_run(tmp_path / "t", "--with-test-tools")
    assert "prometheus" in tools.stdout + tools.stderr
    assert "docker-compose" in tools.stdout + tools.stderr
