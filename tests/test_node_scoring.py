from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tplr.comms.local_store import LocalStore
from tplr.node.scoring import (
    EvaluationFailed,
    LossMeasurement,
    ScoreBoard,
    ScoringConfig,
    ScoringError,
    ema,
    measure_delta,
    publish_scores,
    read_scores,
    relative_gain,
    scores_key,
    window_score,
)

Batch = tuple[torch.Tensor, torch.Tensor]


class LinearWorker:
    """A real (tiny) torch model with the worker's snapshot/restore/apply/evaluate API."""

    def __init__(self, features: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Linear(features, 1, bias=False)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    @torch.no_grad()
    def restore(self, snapshot) -> None:
        for name, p in self.model.named_parameters():
            p.copy_(snapshot[name])

    @torch.no_grad()
    def apply_update(self, delta, lr: float) -> None:
        for name, p in self.model.named_parameters():
            p.sub_(delta[name], alpha=lr)

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        losses = [nn.functional.mse_loss(self.model(x), y) for x, y in batches]
        return float(torch.stack(losses).mean())

    def train(self, batches: list[Batch], steps: int, lr: float = 0.05) -> None:
        optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        for _ in range(steps):
            for x, y in batches:
                optimizer.zero_grad()
                nn.functional.mse_loss(self.model(x), y).backward()
                optimizer.step()


def make_batches(generator: torch.Generator, true_w: torch.Tensor, n: int) -> list[Batch]:
    x = torch.randn(n, true_w.numel(), generator=generator)
    y = x @ true_w + 0.1 * torch.randn(n, 1, generator=generator)
    return [(x[i : i + 4], y[i : i + 4]) for i in range(0, n, 4)]


def pseudo_gradient_after_training(worker: LinearWorker, batches: list[Batch]) -> dict:
    start = worker.snapshot()
    worker.train(batches, steps=20)
    delta = {name: start[name] - p.detach() for name, p in worker.model.named_parameters()}
    worker.restore(start)
    return delta


def test_work_on_assigned_samples_scores_above_other_work():
    generator = torch.Generator().manual_seed(0)
    true_w = torch.randn(32, 1, generator=generator)
    assigned = make_batches(generator, true_w, 8)
    other = make_batches(generator, true_w, 8)
    random = make_batches(generator, true_w, 64)
    worker = LinearWorker(32)
    before = worker.snapshot()

    honest = pseudo_gradient_after_training(worker, assigned)
    lazy = pseudo_gradient_after_training(worker, other)  # trained on someone else's data
    noise = {name: torch.randn(t.shape, generator=generator) for name, t in honest.items()}

    def score(delta) -> float:
        measurement = measure_delta(
            worker, delta, step_lr=0.5, assigned_batches=assigned, random_batches=random
        )
        return window_score(measurement)

    honest_score, lazy_score, noise_score = score(honest), score(lazy), score(noise)
    assert honest_score > 0.1
    assert honest_score > 3 * lazy_score
    assert noise_score < honest_score / 3
    for name, p in worker.model.named_parameters():  # the model is restored every time
        assert torch.equal(p.detach(), before[name])


def test_measure_delta_restores_the_model_when_the_update_breaks_it():
    worker = LinearWorker(4)
    before = worker.snapshot()
    batches = [(torch.ones(2, 4), torch.zeros(2, 1))]
    nan_delta = {"weight": torch.full((1, 4), float("nan"))}
    measurement = measure_delta(
        worker, nan_delta, step_lr=0.1, assigned_batches=batches, random_batches=batches
    )
    with pytest.raises(EvaluationFailed, match="non-finite loss") as info:
        window_score(measurement)
    assert info.value.reason == "non_finite_loss"
    assert torch.equal(worker.model.weight.detach(), before["weight"])
    # a precomputed random_before is used as given
    again = measure_delta(
        worker,
        {"weight": torch.zeros(1, 4)},
        step_lr=0.1,
        assigned_batches=batches,
        random_batches=batches,
        random_before=123.0,
    )
    assert again.random_before == 123.0


def test_window_score_math():
    # assigned: 2.0 -> 1.5 (25 %); random: 2.0 -> 1.9 (5 %) => 0.20
    assert window_score(LossMeasurement(2.0, 1.5, 2.0, 1.9)) == pytest.approx(0.20)
    # helping random data more than assigned data earns nothing
    assert window_score(LossMeasurement(2.0, 1.9, 2.0, 1.5)) == 0.0
    # making things worse everywhere earns nothing
    assert window_score(LossMeasurement(2.0, 2.5, 2.0, 2.1)) == 0.0
    assert relative_gain(4.0, 3.0) == 0.25
    with pytest.raises(ScoringError, match="must be positive"):
        relative_gain(0.0, 1.0)
    with pytest.raises(EvaluationFailed):
        relative_gain(float("inf"), 1.0)
    assert ema(1.0, 0.0, 0.25) == 0.75


def test_ema_decay_and_failures_on_the_board():
    board = ScoreBoard(ScoringConfig(ema_alpha=0.5, missing_decay=0.8, top_n=2))
    board.close_window(10, scores={1: 0.4, 2: 0.2}, failures={}, expected_uids=[1, 2, 3])
    assert board.scores() == {1: 0.2, 2: 0.1, 3: 0.0}
    board.close_window(11, scores={1: 0.4}, failures={2: "digest_mismatch"}, expected_uids=[3])
    assert board.scores() == pytest.approx({1: 0.3, 2: 0.05, 3: 0.0})
    board.close_window(12, scores={}, failures={}, expected_uids=[1, 2, 3])  # nobody posted
    assert board.scores() == pytest.approx({1: 0.24, 2: 0.04, 3: 0.0})
    assert board.peers[2].last_rejection_reason == "digest_mismatch"
    assert board.peers[2].last_window_seen == 11
    assert board.peers[1].last_window_seen == 11
    assert board.peers[1].last_window_updated == 12
    assert board.window == 12


def test_double_updates_and_bad_scores_are_refused():
    board = ScoreBoard()
    board.record_score(1, 5, 0.1)
    with pytest.raises(ScoringError, match="already updated for window 5") as info:
        board.record_missing(1, 5)
    assert info.value.hint
    with pytest.raises(ScoringError, match="finite and >= 0"):
        board.record_score(2, 5, float("nan"))
    with pytest.raises(ScoringError, match="both a score and a failure"):
        board.close_window(6, scores={3: 0.1}, failures={3: "non_finite"})


def test_peer_list_is_top_n_above_the_minimum():
    board = ScoreBoard(ScoringConfig(ema_alpha=1.0, top_n=3, min_score=0.05))
    board.close_window(
        1,
        scores={1: 0.10, 2: 0.30, 3: 0.30, 4: 0.04, 5: 0.20, 6: 0.0},
        failures={7: "not_safetensors"},
    )
    assert board.top_peers() == [2, 3, 5]  # ties broken by uid
    assert board.top_peers(n=10) == [2, 3, 5, 1]
    assert board.top_peers(n=10, min_score=0.0) == [2, 3, 5, 1, 4]  # zero scores never


async def test_scoreboard_json_round_trip_through_a_store(tmp_path):
    store = LocalStore(tmp_path)
    board = ScoreBoard(ScoringConfig(ema_alpha=0.3))
    with pytest.raises(ScoringError, match="no window closed"):
        await publish_scores(store, board)
    board.close_window(7, scores={4: 0.5}, failures={9: "wrong_window"}, expected_uids=[2])
    key = await publish_scores(store, board)
    assert key == scores_key(7) == "scores/7.json"
    document = json.loads(await store.get(key))
    assert document["peers"]["9"]["last_rejection_reason"] == "wrong_window"
    assert document["peers"]["4"]["last_window_seen"] == 7
    loaded = await read_scores(store, 7)
    assert loaded.scores() == board.scores()
    assert loaded.config == board.config and loaded.window == 7
    assert loaded.peers == board.peers
    loaded.record_score(4, 8, 0.5)  # the loaded board keeps its guards
    with pytest.raises(ScoringError, match="already updated"):
        loaded.record_score(4, 8, 0.5)
    with pytest.raises(ScoringError, match="not a valid scores file") as info:
        ScoreBoard.from_json(b'{"format": "tplr-scores", "version": 1}', source="s.json")
    assert "s.json" in str(info.value)
    with pytest.raises(ScoringError, match="not a valid scores file"):
        ScoreBoard.from_json(b"\x80\x04pickle")
