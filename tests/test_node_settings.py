"""Node settings: flags > environment > .env, errors that name the variable, --help, secrets,
and a node whose local run settings disagree with run.json refusing to start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from node_harness import TEST_RUN, build_dataset

from tplr.comms.local_store import LocalStore
from tplr.comms.transfer_config import TransferConfig
from tplr.errors import ConfigError
from tplr.node.lifecycle import Shutdown
from tplr.node.run_spec import publish_run_spec
from tplr.node.runtime import open_runtime
from tplr.node.settings import NodeConfig, RunSettings, build_settings, components_for
from tplr.node.settings_cli import build_parser, load_settings, settable_fields
from tplr.node.stores import open_node_stores
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
    assert "greater than 0" in message
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
    shards = build_dataset(tmp_path / "data", text_bytes=150_000)
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
