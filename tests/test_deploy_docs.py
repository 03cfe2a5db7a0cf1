"""The README's operator guide tells the truth: the troubleshooting messages are what the
code prints (reproduced here against real servers: moto with and without auth, a closed
port, a server that never answers), the figures come from the code, the links resolve."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tplr.comms.errors import InsufficientSpace, Throttled
from tplr.node.process.health import ProgressTracker
from tplr.protocol.clock import FakeClock, WindowClock
from tplr.train.config import ModelConfig
from tplr.train.model.flops import flops_per_token, peak_flops_for, tokens_per_s_at

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent
KEY = "remote/tokenized/train_000000.npy"
PLACEHOLDER_PATTERNS = {"<n>": r"\d+", "<bytes>": r"\d+", "<path>": r"\S+"}


def readme_block(after: str) -> list[str]:
    """The lines of the first ```text block after ``after`` in the README."""
    start = README.index(after)
    match = re.search(r"```text\n(.*?)\n```", README[start:], re.DOTALL)
    assert match, f"no text block after {after!r}"
    return match.group(1).splitlines()


def assert_printed(lines: list[str], output: str, **values: str) -> None:
    """Every README line appears in ``output`` with its <placeholders> filled in."""
    for line in lines:
        pattern = re.escape(line)
        for name, value in values.items():
            pattern = pattern.replace(re.escape(f"<{name}>"), re.escape(value))
        for placeholder, regex in PLACEHOLDER_PATTERNS.items():
            pattern = pattern.replace(re.escape(placeholder), regex)
        assert re.search(pattern, output), f"README says:\n{line}\ncode printed:\n{output}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(args: list[str], cwd: Path, **env: str) -> str:
    base = {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "HOME": str(cwd),
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY",
        "AWS_SECRET_ACCESS_KEY": "example-secret",
        "AWS_EC2_METADATA_DISABLED": "true",
        "TRANSFER_MAX_ATTEMPTS": "2",
    }
    result = subprocess.run(
        args, cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0, result.stdout
    return result.stdout + result.stderr


def fetch(endpoint: str, bucket: str, tmp_path: Path, **env: str) -> str:
    url = f"s3://{bucket}/{KEY}"
    args = ["tplr", "fetch", url, str(tmp_path), "--endpoint-url", endpoint, "--no-progress"]
    return run_cli(args, tmp_path, **env)


@pytest.fixture
def moto_with_auth(tmp_path: Path) -> Iterator[str]:
    """A moto S3 server that checks credentials (unknown keys are refused with 403)."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    command = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with open(tmp_path / "moto.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers (a stalled link)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_forever() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in accepted:
            connection.close()
        listener.close()


def test_wrong_keys_message(moto_with_auth: str, tmp_path: Path):
    output = fetch(moto_with_auth, "dataset", tmp_path)
    lines = readme_block("**Wrong or missing keys.**")
    assert_printed(lines, output, bucket="dataset", key=KEY, endpoint=moto_with_auth)


def test_missing_bucket_message(s3_server: str, tmp_path: Path):
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    output = fetch(s3_server, bucket, tmp_path)
    lines = readme_block("A wrong bucket name or prefix")
    assert_printed(lines, output, bucket=bucket, key=KEY, endpoint=s3_server)


def test_missing_setting_message(tmp_path: Path):
    output = run_cli([sys.executable, str(REPO / "neurons" / "miner.py")], tmp_path)
    assert_printed(readme_block("A setting the node cannot use"), output)


def test_network_interruption_message(tmp_path: Path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    output = fetch(endpoint, "dataset", tmp_path)
    lines = readme_block("**Network interruptions.**")
    assert_printed(lines, output, bucket="dataset", key=KEY, endpoint=endpoint)


def test_http_timeout_message(silent_server: str, tmp_path: Path):
    output = fetch(
        silent_server, "dataset", tmp_path, TRANSFER_READ_TIMEOUT_S="1", TRANSFER_MAX_ATTEMPTS="1"
    )
    lines = readme_block("**HTTP timeouts.**")
    assert_printed(lines, output, bucket="dataset", key=KEY, endpoint=silent_server)


def test_disk_space_messages():
    manager = (REPO / "src/tplr/data/manager.py").read_text()
    assert 'log.warning("postponing shard %d: %s (%s)"' in manager
    for fragment in ("free disk space, move DATASET_LOCAL_DIR to a larger disk",
                     ", or turn off DATASET_KEEP_SHARDS", "; retrying every"):  # fmt: skip
        assert fragment in manager
    (line,) = readme_block("**Disk space.**")
    message = InsufficientSpace("/data/shards", 3_145_728, 1_048_576).message
    hint = "free disk space, move DATASET_LOCAL_DIR to a larger disk; retrying every 30s"
    assert_printed([line], f"WARNING tplr.data.manager: postponing shard 4: {message} ({hint})")
    fetch_line = "error: not enough disk space at <path>: need <bytes> bytes,\n<bytes> bytes free"
    assert fetch_line in README
    assert (
        "free at least {needed_bytes - free} bytes there, or download to another disk"
        in (REPO / "src/tplr/comms/diskspace.py").read_text()
    )


def test_health_and_hint_quotes_come_from_the_code():
    clock = FakeClock(0.0)
    tracker = ProgressTracker(WindowClock(genesis_s=0.0, window_seconds=60, clock=clock))
    tracker.mark_progress(8)
    clock.advance(12 * 60)
    detail = " ".join(f"HTTP 503: unhealthy: {tracker.status().detail}".split())
    assert detail in " ".join(README.split())
    assert f"`hint: {Throttled.hint}`" in README
    s3_store = (REPO / "src/tplr/comms/stores/s3.py").read_text()
    assert '"this machine\'s clock is wrong; enable NTP time sync"' in s3_store
    assert "`hint: this machine's clock is wrong; enable NTP time sync`" in README


def test_node_log_lines_quoted_in_the_readme_exist_in_the_code():
    sources = "\n".join(p.read_text() for p in (REPO / "src/tplr/node").glob("*.py"))
    for fragment in (
        "s after the commit deadline",
        "a validator to announce itself",
        "start the lead validator (neurons/validator.py --lead) or set TPLR_LEAD_UID",
    ):
        assert fragment in sources, fragment
        assert fragment in " ".join(README.split()), fragment


def test_throughput_figures_on_paper_follow_the_flops_table():
    peak = peak_flops_for("NVIDIA H100 80GB HBM3")
    assert peak is not None
    for preset, quoted in (("small", 521_000), ("medium", 184_000)):
        config = ModelConfig.preset(preset, vocab_size=50257)
        tokens_per_s = tokens_per_s_at(0.45, flops_per_token(config, 1024), peak)
        assert f"{quoted:,}" in README
        assert abs(tokens_per_s - quoted) / quoted < 0.01, (preset, tokens_per_s)


def test_readme_guides_cover_what_operators_need():
    for heading in ("## Run a miner", "## Run a validator", "## Self-hosting the dataset",
                    "## Troubleshooting", "## Configuration"):  # fmt: skip
        assert heading in README, heading
    for text in ("docker compose --profile miner up", "docker compose --profile validator up",
                 "torchrun", "NPROC_PER_NODE", "tplr shards upload", "tplr fetch", "tplr put",
                 "DATASET_KEEP_SHARDS", "DOWNLOAD_MAX_WORKERS", "DOWNLOAD_PART_SIZE",
                 "REQUESTS_PER_SECOND", "TRANSFER_READ_TIMEOUT_S"):  # fmt: skip
        assert text in README, text


def test_readme_links_to_docs_resolve():
    links = re.findall(r"\]\((docs/[^)#]+)", README)
    assert "docs/operators.md" in links
    for link in links:
        assert (REPO / link).is_file(), f"README links to missing {link}"
    for doc in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in links, f"README does not link docs/{doc.name}"


def test_the_templar_migration_guide_covers_every_name_the_node_recognises():
    from tplr.node.process.env_check import (
        TEMPLAR_ELSEWHERE,
        TEMPLAR_EQUIVALENTS,
        TEMPLAR_PREFIX_EQUIVALENTS,
        known_env_names,
        tplr_settings_classes,
    )
    from tplr.node.process.settings import COMPONENTS

    guide = (REPO / "docs" / "migrating-from-templar.md").read_text()
    for name in [*TEMPLAR_EQUIVALENTS, *TEMPLAR_ELSEWHERE, *TEMPLAR_PREFIX_EQUIVALENTS]:
        assert f"`{name}" in guide, f"{name} is recognised at start but not in the guide"
    known = known_env_names([*COMPONENTS.values(), *tplr_settings_classes()])
    templar = {*TEMPLAR_EQUIVALENTS, *TEMPLAR_ELSEWHERE}
    for row in (line for line in guide.splitlines() if line.startswith("| ") and "|" in line[2:]):
        tplr_side = row.split("|")[2]
        for name in re.findall(r"`((?:TPLR|R2|DATASET)_[A-Z0-9_]+)`", tplr_side):
            assert name in known or name in templar, f"the guide names {name}, which is not read"
