"""Checkpoints: resume is exact, files are atomic, loading never unpickles code."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from tplr.train.config import ModelConfig, TrainConfig
from tplr.train.errors import CheckpointError
from tplr.train.synthetic import progression_batches
from tplr.train.worker import TrainWorker

VOCAB, SEQ, MICRO = 64, 32, 4


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # robust on a loaded 2-core box (no OpenMP barriers)


def make_worker(optimizer: str = "muon", seed: int = 1, **model_overrides) -> TrainWorker:
    model_config = ModelConfig.preset("tiny", vocab_size=VOCAB, max_seq_len=SEQ, **model_overrides)
    config = TrainConfig(
        optimizer=optimizer,
        lr=3e-3,
        micro_batch_size=MICRO,
        global_batch_size=2 * MICRO,
        seq_len=SEQ,
        warmup_steps=2,
        total_steps=20,
        seed=seed,
        device="cpu",
    )
    return TrainWorker(model_config, config)


def batch_list(count: int, seed: int) -> list:
    return list(itertools.islice(progression_batches(VOCAB, MICRO, SEQ, seed=seed), count))


def test_resume_gives_the_same_next_losses_as_not_stopping(tmp_path):
    path = tmp_path / "ckpt" / "step3.pt"
    first = make_worker()
    first.train_steps(batch_list(6, seed=0), 3)
    first.save_checkpoint(path)
    rng_after_save = (torch.rand(3), random.random(), np.random.rand())
    go_on = [first.train_steps(batch_list(2, seed=s), 1).loss for s in (10, 11)]

    resumed = make_worker(seed=999)  # a different init: the checkpoint must overwrite it
    resumed.load_checkpoint(path)
    assert resumed.step == 3
    assert torch.equal(torch.rand(3), rng_after_save[0])
    assert (random.random(), np.random.rand()) == rng_after_save[1:]
    again = [resumed.train_steps(batch_list(2, seed=s), 1).loss for s in (10, 11)]
    assert again == go_on  # bit-exact on CPU: model, both optimizers, schedule and step
    for (name, a), b in zip(
        first.model.named_parameters(), resumed.model.parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in path.parent.iterdir()) == ["step3.pt"]  # no tmp left


def test_rng_state_restored(tmp_path):
    worker = make_worker(optimizer="adamw")
    worker.save_checkpoint(tmp_path / "c.pt")
    expected = torch.rand(4)
    torch.manual_seed(12345)
    worker.load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(torch.rand(4), expected)


def test_weights_only_refuses_pickled_objects(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would have run",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "tplr-train-checkpoint", "version": 1, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="outside the safe set"):
        make_worker().load_checkpoint(path)


def test_unreadable_and_foreign_files(tmp_path):
    worker = make_worker()
    with pytest.raises(CheckpointError, match="does not exist"):
        worker.load_checkpoint(tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    worker.save_checkpoint(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        worker.load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a tplr training checkpoint"):
        worker.load_checkpoint(foreign)
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    with pytest.raises(CheckpointError, match="cannot create checkpoint folder"):
        worker.save_checkpoint(blocked / "c.pt")


def test_mismatched_model_or_optimizer_named(tmp_path):
    path = tmp_path / "c.pt"
    make_worker().save_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"different model \(activation") as info:
        make_worker(activation="gelu").load_checkpoint(path)
    assert "--model" in info.value.hint
    with pytest.raises(CheckpointError, match=r"optimizers \['adamw', 'muon'\]"):
        make_worker(optimizer="adamw").load_checkpoint(path)
