"""``python -m tplr.train --data DIR`` on tiny llm.c shards: trains, evaluates, saves, resumes,
runs under torchrun, and fails clearly on bad settings."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tplr.comms.manifest import Manifest, write_manifest_atomic
from tplr.train.entry import main

VOCAB, SEQ = 64, 32
COMMON = [
    "--model", "tiny", "--vocab-size", str(VOCAB), "--seq-len", str(SEQ), "--device", "cpu",
    "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # robust on a loaded 2-core box (no OpenMP barriers)


def write_llmc_shard(path: Path, tokens: np.ndarray) -> None:
    """llm.c layout: 256 little-endian int32 header (magic, version, count), uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, tokens.size)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """Three shards of learnable arithmetic progressions (the last is validation)."""
    root = tmp_path / "shards"
    root.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        rows = 300
        starts = rng.integers(0, VOCAB, (rows, 1))
        strides = rng.integers(1, 4, (rows, 1))
        tokens = (starts + strides * np.arange(SEQ + 1)) % VOCAB  # one sample per row
        write_llmc_shard(root / f"tiny_train_{index:06d}.bin", tokens.reshape(-1))
    return root


def logged(caplog, pattern: str) -> list[re.Match]:
    return [m for r in caplog.records if (m := re.search(pattern, r.getMessage()))]


def test_trains_evaluates_saves_and_resumes(shard_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    ckpt = tmp_path / "run" / "ckpt.pt"
    args = [*COMMON, "--data", str(shard_dir), "--eval-every-steps", "15", "--save", str(ckpt)]
    assert main([*args, "--steps", "30"]) == 0
    val = [float(m.group(2)) for m in logged(caplog, r"step (\d+) \| val loss ([\d.]+)")]
    assert len(val) == 2 and val[1] < val[0] < 0.6 * np.log(128)  # log(128): untrained
    assert val[1] < 0.5 * np.log(128)
    assert logged(caplog, r"step 30/30 \| loss [\d.]+ \| [\d,]+ tok/s .* MFU n/a")
    assert ckpt.is_file()
    caplog.clear()
    assert main([*args, "--steps", "35", "--resume", str(ckpt)]) == 0
    assert logged(caplog, r"loaded checkpoint .* at step 30")
    assert logged(caplog, r"step 35/35 \| loss")
    assert torch.load(ckpt, weights_only=True)["step"] == 35


def test_torchrun_two_ranks_match_one_process(shard_dir, tmp_path):
    steps = ["--steps", "3", "--eval-every-steps", "0"]
    one = tmp_path / "one.pt"
    assert main([*COMMON, "--data", str(shard_dir), *steps, "--save", str(one)]) == 0
    two = tmp_path / "two.pt"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "tplr.train", *COMMON, "--data", str(shard_dir), *steps, "--save", str(two),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 micro x 2 ranks x 1 accumulation" in done.stderr
    a = torch.load(one, weights_only=True)
    b = torch.load(two, weights_only=True)
    assert a["world_size"] == 1 and b["world_size"] == 2
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-4, atol=2e-5, msg=name)


def test_bad_settings_exit_with_a_clear_error(shard_dir, capsys):
    assert main([*COMMON, "--data", str(shard_dir), "--global-batch-size", "10"]) == 2
    err = capsys.readouterr().err
    assert "error: global_batch_size (10) is not divisible" in err
    assert "hint: make --global-batch-size a multiple" in err
    assert main([*COMMON, "--data", str(shard_dir), "--micro-batch-size", "0"]) == 2
    assert "--micro-batch-size" in capsys.readouterr().err
    assert main([*COMMON, "--data", str(shard_dir / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    manifest = Manifest(files={}, dataset={"vocab_size": 50257})
    write_manifest_atomic(manifest, shard_dir / "manifest.json")
    assert main([*COMMON, "--data", str(shard_dir)]) == 2
    err = capsys.readouterr().err
    assert "vocabulary of 50257 but the model's vocab_size is 64" in err
    assert "hint: set --vocab-size to at least 50257" in err


def test_worker_takes_the_loaders_host_batches(shard_dir):
    """tplr.data's HostBatch (views of a reused buffer) goes through its own to_device."""
    from tplr.data.dataset import SharedShardedDataset
    from tplr.data.loader import BatchLoader, HostBatch, LoaderConfig
    from tplr.train.config import ModelConfig, TrainConfig
    from tplr.train.worker import TrainWorker

    dataset = SharedShardedDataset.open(shard_dir / "tiny_train_000000.bin", seq_len=SEQ)
    config = LoaderConfig(batch_size=4, output="host", hold_batches=4)
    model_config = ModelConfig.preset("tiny", vocab_size=VOCAB, max_seq_len=SEQ)
    train_config = TrainConfig(
        micro_batch_size=4, global_batch_size=8, seq_len=SEQ, device="cpu", prefetch_batches=2
    )
    worker = TrainWorker(model_config, train_config)
    with BatchLoader(dataset, np.arange(40), config=config) as loader:
        assert isinstance(next(iter(loader)), HostBatch)
        stats = worker.train_steps(loader, 3)  # 6 micro-batches of the 9 left
        assert stats.tokens == 6 * 4 * SEQ
        assert len(list(loader)) == 3


@pytest.fixture(scope="module")
def templar_dir(tmp_path_factory) -> Path:
    """Templar shards (rows of 128 bytes-tokens + sample ids) with their manifest."""
    from node_harness import build_dataset

    return build_dataset(tmp_path_factory.mktemp("templar"), rows_per_shard=256, shards=4)


def test_seq_len_defaults_to_the_datasets_recorded_length(templar_dir, caplog):
    """Regression: without --seq-len the model's max_seq_len (256 for tiny) was asked of
    shards that store rows of 128 tokens, and the run failed."""
    caplog.set_level(logging.INFO)
    args = ["--data", str(templar_dir), "--model", "tiny", "--device", "cpu", "--steps", "2"]
    args += ["--micro-batch-size", "2", "--global-batch-size", "4", "--eval-every-steps", "0"]
    assert main(args) == 0
    assert logged(caplog, r"seq 127, global batch 4")  # rows of 128: 127 tokens of context
    assert main([*args, "--seq-len", "128"]) == 0  # the recorded length, given explicitly


def test_seq_len_conflicting_with_stored_rows_is_a_clear_error(templar_dir, capsys):
    args = ["--data", str(templar_dir), "--model", "tiny", "--device", "cpu", "--steps", "1"]
    assert main([*args, "--seq-len", "64"]) == 2
    err = capsys.readouterr().err
    assert "--seq-len 64" in err and "128" in err and "Traceback" not in err
    assert "hint: " in err


def test_every_flag_has_help():
    from tplr.train.entry import build_parser

    parser = build_parser()
    missing = [
        action.option_strings
        for action in parser._actions
        if action.option_strings and not action.help
    ]
    assert missing == []
    text = parser.format_help()
    for flag in ("--parallel", "--activation-checkpointing", "--estimate-memory", "--optimizer"):
        assert flag in text, flag
