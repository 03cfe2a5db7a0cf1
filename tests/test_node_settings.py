"""Node settings: flags > environment > .env, errors that name the variable, --help, secrets,
and a node whose local run settings disagree with run.json refusing to start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from node_harness import TEST_RUN, build_dataset

from tplr.comms.stores.local import LocalStore
from tplr.comms.transfer_config import TransferConfig
from tplr.errors import ConfigError
from tplr.node.network.run_spec import publish_run_spec
from tplr.node.network.stores import open_node_stores
from tplr.node.process.env_check import check_names, known_env_names, tplr_settings_classes
from tplr.node.process.lifecycle import Shutdown
from tplr.node.process.settings import (
    COMPONENTS,
    NodeConfig,
    RunSettings,
    build_settings,
    components_for,
)
from tplr.node.process.settings_cli import build_parser, load_settings, settable_fields
from tplr.node.runtime import open_runtime
from tplr.protocol.clock import FakeClock
from tplr.protocol.run_spec import RunSpec, RunSpecConflict

ROOT = Path(__file__).resolve().parents[1]


def test_flags_win_over_env_and_env_over_dotenv(tmp_path, monkeypatch):
    dotenv = tmp_path / "node.env"
    dotenv.write_text(
        "TPLR_UID=4\nTPLR_RUN_WINDOW_SECONDS=10\nMETRICS_PORT=9000\nDATASET_KEEP_SHARDS=false\n"
    )
    monkeypatch.setenv("TPLR_RUN_WINDOW_SECONDS", "20")
    monkeypatch.setenv("TPLR_RUN_INNER_STEPS", "7")
    settings = load_settings(
        "miner",
        [
            *("--env-file", str(dotenv), "--metrics-port", "9100"),
            *("--run-inner-steps", "9", "--keep-shards"),
        ],
    )
    assert settings.node.uid == 4  # only in .env
    assert settings.run.window_seconds == 20.0  # env beats .env
    assert settings.health.metrics_port == 9100  # flag beats .env
    assert settings.run.inner_steps == 9  # flag beats env
    assert settings.dataset.keep_shards is True  # --keep-shards alias of --dataset-keep-shards
    assert settings.run.given() == {"window_seconds": 20.0, "inner_steps": 9}
    assert settings.validator is None and settings.miner is not None


def test_missing_uid_is_named_with_its_flag():
    with pytest.raises(ConfigError) as info:
        load_settings("validator", [])
    assert "missing TPLR_UID (flag --uid)" in info.value.message
    assert "--help" in info.value.hint


def test_every_bad_value_is_named_with_the_allowed_range():
    with pytest.raises(ConfigError) as info:
        load_settings(
            "miner", ["--uid", "1", "--metrics-port", "70000", "--run-window-seconds", "-5"]
        )
    message = info.value.message
    assert "invalid METRICS_PORT (flag --metrics-port)" in message
    assert "less than or equal to 65535" in message
    assert "invalid TPLR_RUN_WINDOW_SECONDS (flag --run-window-seconds)" in message
    assert "greater than or equal to 1" in message
    with pytest.raises(ConfigError, match=r"--env-file .*no such file"):
        load_settings("miner", ["--uid", "1", "--env-file", "/nonexistent/.env"])


def test_help_lists_every_setting_with_its_variable_and_default(capsys):
    build_parser("validator").print_help()
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for cls in components_for("validator").values():
        for _, _, env in settable_fields(cls):
            assert f"[env {env}; default:" in text, env
    assert "[env TPLR_UID; default: required]" in text
    assert "[env METRICS_PORT; default: 9108]" in text
    assert "a new run gets 120.0" in text  # what a lead proposes for a run setting
    assert "SECRET" not in text  # secrets have no flag


def test_secrets_come_from_the_environment_only(monkeypatch, capsys):
    monkeypatch.setenv("R2_GRADIENTS_WRITE_SECRET_ACCESS_KEY", "very-secret-value")
    settings = load_settings("miner", ["--uid", "1"])
    secret = settings.gradients_bucket.write_secret_access_key
    assert secret is not None and secret.get_secret_value() == "very-secret-value"
    assert "very-secret-value" not in repr(settings)
    with pytest.raises(SystemExit):
        load_settings("miner", ["--uid", "1", "--r2-gradients-write-secret-access-key", "x"])
    assert "unrecognized arguments" in capsys.readouterr().err


async def test_partial_bucket_keys_name_the_missing_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("R2_GRADIENTS_BUCKET_NAME", "grads")
    monkeypatch.setenv("R2_GRADIENTS_WRITE_ACCESS_KEY_ID", "key-id")
    settings = build_settings("miner", node=NodeConfig(uid=1, home=tmp_path))
    stores = open_node_stores(
        settings.node, settings.dataset_bucket, settings.gradients_bucket, TransferConfig()
    )
    with pytest.raises(ConfigError, match="PEERS_FILE"):
        async with stores:
            pass
    peers = tmp_path / "peers.yaml"
    peers.write_text("peers: []\n")
    settings = build_settings("miner", node=NodeConfig(uid=1, home=tmp_path, peers_file=peers))
    stores = open_node_stores(
        settings.node, settings.dataset_bucket, settings.gradients_bucket, TransferConfig()
    )
    with pytest.raises(ConfigError, match="R2_GRADIENTS_WRITE_SECRET_ACCESS_KEY"):
        async with stores:
            pass


def test_the_lead_proposes_the_datasets_vocabulary_and_sequence_length():
    run = RunSettings(window_seconds=30)
    spec = run.proposed_spec(
        dataset_defaults={"vocab_size": 257, "sequence_length": 128}, now_s=1_800_000_000.7
    )
    assert (spec.vocab_size, spec.sequence_length, spec.window_seconds) == (257, 128, 30.0)
    assert spec.genesis_s == 1_800_000_000.0 and spec.run_id == "run-1800000000"
    given = RunSettings(sequence_length=64).proposed_spec(
        dataset_defaults={"sequence_length": 128}, now_s=0
    )
    assert given.sequence_length == 64  # what the operator set wins over the dataset
    with pytest.raises(ConfigError) as info:
        RunSettings(compression_topk=64, compression_chunk_size=32).proposed_spec(
            dataset_defaults={}, now_s=0
        )
    assert "compression_topk (64) must not exceed compression_chunk_size (32)" in str(info.value)


@pytest.fixture
def embedded_home(tmp_path) -> Path:
    """An embedded home with a dataset and a lead's run.json (window_seconds 60)."""
    home = tmp_path / "home"
    shards = build_dataset(tmp_path / "data", rows_per_shard=256, shards=4)
    target = home / "dataset" / "remote" / "tokenized"
    target.parent.mkdir(parents=True)
    shards.rename(target)
    return home


async def write_lead_run(home: Path) -> RunSpec:
    spec = RunSpec(genesis_s=1_800_000_000.0, sequence_length=128, vocab_size=257, **TEST_RUN)
    store = LocalStore(home / "shared" / "uids" / "0")
    await publish_run_spec(store, spec)
    return spec


async def test_a_node_whose_run_settings_conflict_refuses_to_start(embedded_home):
    await write_lead_run(embedded_home)
    settings = build_settings(
        "miner",
        node=NodeConfig(uid=1, home=embedded_home, lead_uid=0),
        run=RunSettings(window_seconds=30, inner_steps=TEST_RUN["inner_steps"]),
    )
    with pytest.raises(RunSpecConflict) as info:
        async with open_runtime(settings, shutdown=Shutdown(), clock=FakeClock()):
            pass
    assert info.value.conflicts == [("window_seconds", 60.0, 30.0)]
    assert "window_seconds: run has 60.0, local setting is 30.0" in info.value.message


async def test_an_empty_embedded_store_says_how_to_make_a_dataset(tmp_path):
    settings = build_settings("miner", node=NodeConfig(uid=1, home=tmp_path / "home"))
    with pytest.raises(ConfigError) as info:
        async with open_runtime(settings, shutdown=Shutdown(), clock=FakeClock()):
            pass
    assert "no dataset in the embedded store" in info.value.message
    assert "tplr shards prepare --tokenizer bytes" in info.value.hint


async def test_the_miner_command_refuses_a_conflicting_run_and_exits_2(embedded_home):
    await write_lead_run(embedded_home)
    command = [sys.executable, "neurons/miner.py", "--uid", "1", "--lead-uid", "0"]
    command += ["--home", str(embedded_home), "--run-window-seconds", "30", "--metrics-port", "0"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: local settings conflict with the run" in result.stderr
    assert "window_seconds: run has 60.0, local setting is 30.0" in result.stderr
    assert "hint: remove the local override" in result.stderr


# -- misconfiguration: each one a clear error, no traceback, the right exit code -------------


def run_node(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TPLR_", "R2_", "DATASET_"))}
    base.update(METRICS_PORT="0", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=base, capture_output=True, text=True, timeout=120
    )


def assert_clean_exit(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("DATASET_KEEP_SHARD", "true", "unknown setting DATASET_KEEP_SHARD (environment); "
         "did you mean DATASET_KEEP_SHARDS?"),
        ("TPLR_VALIDATOR_LEAD", "true", "did you mean TPLR_LEAD?"),
        ("TPLR_S3_PART_SIZE", "64", "TPLR_S3_PART_SIZE (environment) is a templar setting: use "
         "DOWNLOAD_PART_SIZE"),
        ("R2_AGGREGATOR_BUCKET_NAME", "agg", "tplr has no aggregator bucket"),
        ("r2_dataset_bucket_nmae", "x", "did you mean R2_DATASET_BUCKET_NAME?"),
    ],
)  # fmt: skip
def test_unknown_and_templar_variables_are_errors(monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings("miner", ["--uid", "1"])
    assert expected in info.value.message
    assert "docs/migrating-from-templar.md" in info.value.hint


def test_unknown_names_in_the_env_file_are_named_with_the_file(tmp_path, monkeypatch):
    env_file = tmp_path / "node.env"
    env_file.write_text("TPLR_UID=2\nTPLR_GATHER_TIMEOUT=5\nWALLET_NAME=default\n")
    with pytest.raises(ConfigError, match=rf"TPLR_GATHER_TIMEOUT \({env_file}\); did you mean"):
        load_settings("validator", ["--env-file", str(env_file)])
    env_file.write_text("TPLR_UID=2\nWALLET_NAME=default\nTPLR_APP_DIR=/app\n")
    settings = load_settings("validator", ["--env-file", str(env_file)])
    (notice,) = settings.notices  # outside tplr's prefixes: a warning naming the equivalent
    assert "WALLET_NAME" in notice and "TPLR_UID" in notice


def test_known_names_come_from_the_settings_classes():
    """Every variable that .env.example documents passes; nothing is listed by hand."""
    documented = [
        (line.split("=", 1)[0].lstrip("# "), ".env.example")
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and line.lstrip("# ").split("=", 1)[0].isupper()
    ]
    known = known_env_names([*COMPONENTS.values(), *tplr_settings_classes()])
    report = check_names(documented, known)
    assert not report.errors, report.errors
    assert {"TPLR_UID", "TPLR_LEAD", "PEERS_FILE", "DATASET_BINS_PATH"} <= known
    assert "TPLR_VALIDATOR_LEAD" not in known  # the field reads TPLR_LEAD only


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"R2_DATASET_ENDPOINT_URL": "minio:9000"},
         ("invalid R2_DATASET_ENDPOINT_URL: 'minio:9000' is not an http(s):// URL",
          "hint: write it as https://host[:port]")),
        ({"TPLR_LOG_LEVEL": "bogus"}, ("invalid TPLR_LOG_LEVEL (flag --log-level)",)),
        ({"DATASET_KEEP_SHARD": "1"}, ("did you mean DATASET_KEEP_SHARDS?",)),
    ],
)  # fmt: skip
def test_bad_settings_exit_2_with_one_clear_error(env, needles, tmp_path):
    result = run_node("neurons/miner.py", "--uid", "1", "--home", str(tmp_path), env=env)
    assert_clean_exit(result, 2, *needles)


def test_log_level_is_case_insensitive_and_checked_in_the_tplr_cli(tmp_path):
    settings = load_settings("miner", ["--uid", "1", "--log-level", "debug"])
    assert settings.node.log_level == "DEBUG"
    result = run_node("-m", "tplr", "--log-level", "bogus", "manifest", str(tmp_path))
    assert_clean_exit(result, 2, "unknown log level 'bogus'")


async def test_a_bucket_name_without_keys_is_an_error_not_the_embedded_store(tmp_path, monkeypatch):
    monkeypatch.setenv("R2_DATASET_BUCKET_NAME", "tplr-dataset")
    monkeypatch.setenv("R2_DATASET_READ_ACCESS_KEY_ID", "")  # `KEY=` copied from the template
    settings = build_settings("miner", node=NodeConfig(uid=1, home=tmp_path))
    stores = open_node_stores(
        settings.node, settings.dataset_bucket, settings.gradients_bucket, TransferConfig()
    )
    with pytest.raises(ConfigError, match="R2_DATASET_BUCKET_NAME=tplr-dataset is set but"):
        async with stores:
            pass
    result = run_node(
        "neurons/miner.py", "--uid", "1", "--home", str(tmp_path),
        env={"R2_GRADIENTS_BUCKET_NAME": "my-grads"},
    )  # fmt: skip
    assert_clean_exit(result, 2, "R2_GRADIENTS_BUCKET_NAME=my-grads is set but", "hint: set")


def test_a_runtime_failure_exits_1(embedded_home):
    """No lead publishes run.json within the wait: a failure at run time, not a usage error."""
    result = run_node(
        "neurons/miner.py", "--uid", "1", "--lead-uid", "0", "--home", str(embedded_home),
        "--run-wait-timeout-s", "1", "--poll-interval-s", "0.2", "--log-format", "json",
    )  # fmt: skip
    assert_clean_exit(result, 1, "did not appear within 1s")
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line["uid"] == 1 and line["role"] == "miner" for line in lines)
    assert {"ts", "level", "logger", "message", "run_id", "window", "rank"} <= set(lines[-1])
    assert lines[-1]["level"] == "ERROR" and "hint:" in lines[-1]["message"]
