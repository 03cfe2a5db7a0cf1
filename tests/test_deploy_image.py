"""The Docker image's parts, run for real: the entrypoint (python and torchrun), the
healthcheck against a live HealthServer, and the pinned requirements against pyproject and
the venv. (Building the CUDA image itself needs Docker and a registry, which CI lacks.)"""

from __future__ import annotations

import ast
import asyncio
import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client import CollectorRegistry

from tplr.node.process.health import HealthServer, ProgressTracker
from tplr.node.process.metrics import NodeMetrics
from tplr.protocol.clock import FakeClock, WindowClock

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
VENV_BIN = Path(sys.executable).parent
sys.path.insert(0, str(DOCKER))
import lock_requirements  # noqa: E402

NODE_STUB = """
import json, os, sys
line = json.dumps({
    "script": os.path.basename(__file__),
    "argv": sys.argv[1:],
    "rank": os.environ.get("RANK"),
    "world_size": os.environ.get("WORLD_SIZE"),
}) + "\\n"
os.write(1, line.encode())  # one write: two torchrun ranks never interleave within a line
"""


def dockerfile_args() -> dict[str, str]:
    text = (DOCKER / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))


def dockerfile_instructions(name: str) -> list[str]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    return [m.strip() for m in re.findall(rf"^{name} (.+)$", text, re.MULTILINE)]


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_pairs_the_cuda_base_with_the_matching_torch_wheels():
    args = dockerfile_args()
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    assert cuda, f"CUDA_IMAGE must be an nvidia/cuda runtime image, got {args['CUDA_IMAGE']}"
    assert args["TORCH_INDEX_URL"].endswith(f"/cu{cuda[1]}{cuda[2]}")
    lock_text = (DOCKER / "requirements.lock").read_text()
    assert args["TORCH_VERSION"] == lock_requirements.locked_torch_version(lock_text)
    tested = metadata.version("torch").split("+", 1)[0]
    assert args["TORCH_VERSION"] == tested, "the image must ship the torch the tests ran with"
    cuda_pins = lock_requirements.parse_lock((DOCKER / "requirements-cuda.lock").read_text())
    assert cuda_pins["cuda-toolkit"].startswith(f"{cuda[1]}.{cuda[2]}."), cuda_pins


def test_dockerfile_runs_unprivileged_with_volumes_healthcheck_and_entrypoint():
    user = dockerfile_instructions("USER")
    assert user and user[-1] not in ("root", "0")
    volumes = json.loads(dockerfile_instructions("VOLUME")[0])
    assert {"/data/shards", "/data/checkpoints"} <= set(volumes)
    env = " ".join(dockerfile_instructions("ENV"))
    assert "DATASET_LOCAL_DIR=/data/shards" in env and "TPLR_HOME=/data/checkpoints" in env
    assert "TPLR_DEVICE=cuda" in env, "a GPU image must not fall back to the CPU silently"
    assert "METRICS_HOST=0.0.0.0" in env, "compose's Prometheus scrapes over the network"
    healthcheck = dockerfile_instructions("HEALTHCHECK")[0]
    assert "/app/docker/healthcheck.py" in healthcheck
    assert "--start-period=2m" in healthcheck, "/healthz answers while the node starts"
    entrypoint = json.loads(dockerfile_instructions("ENTRYPOINT")[0])
    assert entrypoint[-1] == "/app/docker/entrypoint.sh"


def test_every_file_the_dockerfile_copies_exists_and_is_in_the_build_context():
    allowed = [
        line[1:].rstrip("/")
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for instruction in dockerfile_instructions("COPY"):
        for source in instruction.split()[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: no such path"
            top = source.rstrip("/")
            assert any(top == a or top.startswith(a + "/") for a in allowed), (
                f"COPY {source} is excluded by docker/Dockerfile.dockerignore"
            )


# --- pinned requirements ---------------------------------------------------------------------


def locked() -> dict[str, str]:
    return lock_requirements.parse_lock((DOCKER / "requirements.lock").read_text())


def test_lock_pins_every_runtime_dependency_within_pyproject_ranges():
    pins = locked()
    for requirement in lock_requirements.top_level_requirements(REPO / "pyproject.toml"):
        name = canonicalize_name(requirement.name)
        if name == "torch":
            assert name not in pins, "torch comes from the CUDA index, not the lock"
            continue
        if not lock_requirements.applies(requirement, frozenset()):
            continue
        assert name in pins, f"{requirement} is not pinned in docker/requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])


def test_lock_is_closed_under_the_installed_dependencies():
    """Whatever a locked package needs (per its installed metadata) is locked too."""
    pins = locked()
    missing = []
    for name in pins:
        for text in metadata.distribution(name).requires or []:
            child = Requirement(text)
            child_name = canonicalize_name(child.name)
            if lock_requirements.applies(child, frozenset()) and child_name not in pins:
                missing.append(f"{name} needs {child}")
    assert not missing, "regenerate with docker/lock_requirements.py: " + "; ".join(missing)


def test_the_tests_run_the_locked_versions():
    """setup_env.sh installs with the locks as constraints: what CI tests is what ships."""
    assert lock_requirements.check_against_venv() == []


def test_the_lock_generator_asks_uv_for_the_image_platform(tmp_path: Path):
    command = lock_requirements.uv_command(
        "uv", tmp_path / "out.txt", "2.13.0", upgrade=False, index_url="https://pypi.org/simple"
    )
    text = " ".join(command)
    assert command[:3] == ["uv", "pip", "compile"] and "--upgrade" not in command
    assert "--python-version 3.12" in text and "--python-platform x86_64-manylinux_2_28" in text
    assert "--extra gpt2" in text
    main, cuda = lock_requirements.split_pins(
        {"torch": "2.13.0", "triton": "3.7.1", "nvidia-nccl-cu13": "2", "sympy": "1.14.0"}
    )
    assert main == {"sympy": "1.14.0"} and set(cuda) == {"triton", "nvidia-nccl-cu13"}


def imported_distributions() -> set[str]:
    """Distributions that src/tplr imports (module names mapped through their metadata)."""
    modules = set()
    for path in (REPO / "src" / "tplr").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module.split(".")[0])
    mapping = metadata.packages_distributions()
    return {
        canonicalize_name(dist)
        for module in modules - {"tplr"} - set(sys.stdlib_module_names)
        for dist in mapping.get(module, [module])
    }


def test_pyproject_declares_exactly_what_the_package_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(Requirement(t).name) for t in project["dependencies"]}
    optional = {
        canonicalize_name(Requirement(t).name)
        for extra in ("gpt2", "gpu", "parquet")
        for t in project["optional-dependencies"][extra]
    }
    imported = imported_distributions()
    assert imported - declared - optional == set(), "imported but not declared"
    assert declared - imported == set(), "declared but never imported"
    assert (REPO / "LICENSE").is_file() and project["license"] == "MIT"


def test_pyproject_extras_used_by_the_image_exist():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert set(lock_requirements.EXTRAS) <= set(project["optional-dependencies"])


# --- entrypoint ------------------------------------------------------------------------------


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A stand-in /app whose neurons print what they were started with."""
    for role in ("miner", "validator"):
        path = tmp_path / "neurons" / f"{role}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(NODE_STUB)
    return tmp_path


def run_entrypoint(app_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "HOME": str(app_dir),
        "TPLR_APP_DIR": str(app_dir),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def outputs(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_entrypoint_starts_the_miner_with_python_and_passes_flags(app_dir: Path):
    result = run_entrypoint(app_dir, "--uid", "3", NODE_TYPE="miner")
    assert result.returncode == 0, result.stderr
    assert outputs(result) == [
        {"script": "miner.py", "argv": ["--uid", "3"], "rank": None, "world_size": None}
    ]


def test_entrypoint_runs_torchrun_with_one_process_per_gpu(app_dir: Path):
    result = run_entrypoint(app_dir, "--uid", "1", NODE_TYPE="validator", NPROC_PER_NODE="2")
    assert result.returncode == 0, result.stderr
    ranks = sorted((o["rank"], o["world_size"], o["script"]) for o in outputs(result))
    assert ranks == [("0", "2", "validator.py"), ("1", "2", "validator.py")]
    assert all(o["argv"] == ["--uid", "1"] for o in outputs(result))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NODE_TYPE": "minr"}, "NODE_TYPE must be 'miner' or 'validator', got 'minr'"),
        ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE must be a whole number >= 1 or 'gpu'"),
        ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be a whole number >= 1 or 'gpu'"),
    ],
)
def test_entrypoint_rejects_bad_settings_with_a_clear_message(app_dir, env, message):
    result = run_entrypoint(app_dir, **env)
    assert result.returncode == 2
    assert message in result.stderr
    assert not outputs(result)


def test_entrypoint_names_a_missing_checkout(tmp_path: Path):
    result = run_entrypoint(tmp_path, NODE_TYPE="miner")
    assert result.returncode == 2
    assert "neurons/miner.py not found" in result.stderr


def test_entrypoint_runs_any_other_command_as_given(app_dir: Path):
    result = run_entrypoint(app_dir, "python", "-c", "print('tool ran')")
    assert result.returncode == 0 and result.stdout.strip() == "tool ran"


# --- healthcheck -----------------------------------------------------------------------------


async def run_healthcheck(port: int) -> tuple[int, str]:
    env = {"PATH": os.environ.get("PATH", ""), "METRICS_PORT": str(port)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(DOCKER / "healthcheck.py"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    return process.returncode, stdout.decode().strip()


async def test_healthcheck_follows_the_node_health_endpoint():
    genesis = 1_700_000_000.0
    clock = FakeClock(genesis)
    registry = CollectorRegistry()
    NodeMetrics(role="miner", uid=1, registry=registry, clock=clock)
    windows = WindowClock(genesis_s=genesis, window_seconds=60, clock=clock)
    tracker = ProgressTracker(windows, max_stalled_windows=2)
    async with HealthServer(registry=registry, health=tracker.status, port=0) as server:
        assert server.port is not None
        code, line = await run_healthcheck(server.port)
        assert code == 0 and line.startswith("ok: window 0")
        clock.advance(4 * 60)  # four windows without progress, limit two
        code, line = await run_healthcheck(server.port)
        assert code == 1
        assert line.startswith("HTTP 503: unhealthy: no window progress for 4 windows")
    code, line = await run_healthcheck(server.port)  # the server is gone
    assert code == 1 and "is the node running?" in line


def test_entrypoint_and_healthcheck_are_executable_scripts():
    for name in ("entrypoint.sh", "healthcheck.py"):
        first_line = (DOCKER / name).read_text().splitlines()[0]
        assert first_line.startswith("#!"), name
    assert shutil.which("sh"), "the entrypoint needs a POSIX sh"
