"""Validator scoring: per-window score from losses, moving average, the derived peer list.

Per miner and window, the validator measures the loss on a few of the miner's *assigned*
samples and on *random* samples, before and after applying the miner's Δ with a small
step (:func:`measure_delta`). The window score is the relative improvement on the
assigned samples beyond the relative improvement on random ones::

    gain(before, after) = (before - after) / before
    window_score = max(0, gain(assigned) - gain(random))   (0 when gain(assigned) <= 0)

A Δ that merely helps everywhere (or was computed on other data) earns nothing beyond
what random data shows; only work on the assigned samples does. Scores are smoothed
with an EMA (``score ← α·window_score + (1−α)·score``); a failed check feeds a window
score of 0; a miner that posted nothing decays (``score ← missing_decay·score``).
The board is published as ``scores/{w}.json``; the peer list for the next window is the
top-N uids with at least the minimum score.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from tplr.comms.store import ObjectStore
from tplr.errors import TplrError

SCORES_FORMAT = "tplr-scores"
SCORES_VERSION = 1


class ScoringError(TplrError):
    """Scores cannot be computed or loaded (bad losses, double update, bad file)."""


class EvaluationFailed(ScoringError):
    """The miner's Δ broke the model (non-finite loss): its window score is 0."""

    reason = "non_finite_loss"


class ScoringConfig(BaseModel):
    """EMA and peer-selection settings; a run carries them in run.json (``score_*``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ema_alpha: float = Field(default=0.2, gt=0, le=1)
    missing_decay: float = Field(default=0.9, ge=0, le=1)
    top_n: int = Field(default=32, ge=1)
    min_score: float = Field(default=0.0, ge=0)


@dataclass(frozen=True, slots=True)
class LossMeasurement:
    assigned_before: float
    assigned_after: float
    random_before: float
    random_after: float


def relative_gain(before: float, after: float) -> float:
    """``(before - after) / before``; losses must be finite and ``before`` positive."""
    if not (math.isfinite(before) and math.isfinite(after)):
        raise EvaluationFailed(f"non-finite loss (before {before}, after {after})")
    if before <= 0:
        raise ScoringError(f"loss before the update must be positive, got {before}")
    return (before - after) / before


def window_score(measurement: LossMeasurement) -> float:
    """Improvement on the assigned samples beyond the improvement on random samples (≥ 0).

    A Δ that does not improve the assigned samples at all earns 0, even if it harms random
    samples more (noise that hurts everything must not score by hurting random data most).
    """
    assigned = relative_gain(measurement.assigned_before, measurement.assigned_after)
    random = relative_gain(measurement.random_before, measurement.random_after)
    if assigned <= 0:
        return 0.0
    return max(0.0, assigned - random)


def ema(previous: float, new: float, alpha: float) -> float:
    return alpha * new + (1.0 - alpha) * previous


class DeltaEvaluator(Protocol):
    """What :func:`measure_delta` needs from the training worker."""

    def snapshot(self) -> Mapping[str, torch.Tensor]: ...

    def restore(self, snapshot: Mapping[str, torch.Tensor]) -> None: ...

    def apply_update(self, delta: Mapping[str, torch.Tensor], lr: float) -> None: ...

    def evaluate(self, batches: Iterable[Any]) -> float: ...


def measure_delta(
    worker: DeltaEvaluator,
    delta: Mapping[str, torch.Tensor],
    *,
    step_lr: float,
    assigned_batches: Sequence[Any],
    random_batches: Sequence[Any],
    random_before: float | None = None,
) -> LossMeasurement:
    """Losses before/after ``θ ← θ − step_lr·Δ``; the model is restored afterwards.

    Blocking compute: run it in a worker thread. ``random_before`` may be passed when the
    same random batches are scored for several miners (it does not depend on Δ).
    """
    snapshot = worker.snapshot()
    try:
        assigned_before = worker.evaluate(assigned_batches)
        if random_before is None:
            random_before = worker.evaluate(random_batches)
        worker.apply_update(delta, step_lr)
        assigned_after = worker.evaluate(assigned_batches)
        random_after = worker.evaluate(random_batches)
    finally:
        worker.restore(snapshot)
    return LossMeasurement(assigned_before, assigned_after, random_before, random_after)


@dataclass(slots=True)
class PeerScore:
    score: float = 0.0
    last_window_seen: int | None = None  # last window the peer posted a payload for
    last_window_updated: int | None = None  # last window this entry was updated for
    last_rejection_reason: str | None = None
    last_window_score: float | None = None


class ScoreBoard:
    """Moving-average scores per uid, serialisable as ``scores/{w}.json``."""

    def __init__(self, config: ScoringConfig | None = None) -> None:
        self.config = config or ScoringConfig()
        self.peers: dict[int, PeerScore] = {}
        self.window: int | None = None  # last window closed

    def _entry(self, uid: int, window: int) -> PeerScore:
        entry = self.peers.setdefault(uid, PeerScore())
        if entry.last_window_updated is not None and entry.last_window_updated >= window:
            raise ScoringError(
                f"uid {uid} was already updated for window {entry.last_window_updated}; "
                f"refusing a second update for window {window}",
                hint="update each uid once per window, in increasing window order",
            )
        entry.last_window_updated = window
        return entry

    def record_score(self, uid: int, window: int, score: float) -> None:
        """The peer posted a valid payload that earned ``score`` this window."""
        if not (math.isfinite(score) and score >= 0):
            raise ScoringError(f"window score of uid {uid} must be finite and >= 0, got {score}")
        entry = self._entry(uid, window)
        entry.score = ema(entry.score, score, self.config.ema_alpha)
        entry.last_window_seen = window
        entry.last_window_score = score

    def record_failure(self, uid: int, window: int, reason: str) -> None:
        """The peer posted, but a check failed (``reason`` is a low-cardinality label)."""
        entry = self._entry(uid, window)
        entry.score = ema(entry.score, 0.0, self.config.ema_alpha)
        entry.last_window_seen = window
        entry.last_rejection_reason = reason
        entry.last_window_score = 0.0

    def record_missing(self, uid: int, window: int) -> None:
        """The peer was expected but posted nothing: its score decays."""
        entry = self._entry(uid, window)
        entry.score *= self.config.missing_decay
        entry.last_window_score = None

    def close_window(
        self,
        window: int,
        *,
        scores: Mapping[int, float],
        failures: Mapping[int, str],
        expected_uids: Iterable[int] = (),
    ) -> None:
        """Apply one window's outcome; expected uids with neither outcome decay."""
        both = set(scores) & set(failures)
        if both:
            raise ScoringError(f"uids {sorted(both)} have both a score and a failure")
        for uid in sorted(scores):
            self.record_score(uid, window, scores[uid])
        for uid in sorted(failures):
            self.record_failure(uid, window, failures[uid])
        for uid in sorted(set(expected_uids) - set(scores) - set(failures)):
            self.record_missing(uid, window)
        self.window = window

    def scores(self) -> dict[int, float]:
        return {uid: entry.score for uid, entry in sorted(self.peers.items())}

    def top_peers(self, n: int | None = None, min_score: float | None = None) -> list[int]:
        """Up to ``n`` uids by descending score (ties by uid) with score ≥ ``min_score``
        (and > 0: a peer that never earned anything is not gathered)."""
        n = self.config.top_n if n is None else n
        floor = self.config.min_score if min_score is None else min_score
        eligible = [
            (uid, entry.score)
            for uid, entry in self.peers.items()
            if entry.score >= floor and entry.score > 0
        ]
        eligible.sort(key=lambda item: (-item[1], item[0]))
        return [uid for uid, _ in eligible[:n]]

    def to_json(self) -> bytes:
        document = {
            "format": SCORES_FORMAT,
            "version": SCORES_VERSION,
            "window": self.window,
            "config": self.config.model_dump(),
            "peers": {str(uid): asdict(entry) for uid, entry in sorted(self.peers.items())},
        }
        return json.dumps(document, indent=1, allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = "scores") -> ScoreBoard:
        try:
            document = json.loads(data)
            if (document.get("format"), document.get("version")) != (
                SCORES_FORMAT,
                SCORES_VERSION,
            ):
                raise ValueError(f"format/version {document.get('format')!r} is not ours")
            board = cls(ScoringConfig.model_validate(document["config"]))
            board.window = document["window"]
            board.peers = {int(uid): PeerScore(**entry) for uid, entry in document["peers"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ScoringError(
                f"{source} is not a valid scores file: {exc}",
                hint="start scoring afresh (delete the local copy) or fix the file",
            ) from exc
        return board


def scores_key(window: int) -> str:
    return f"scores/{window}.json"


async def publish_scores(store: ObjectStore, board: ScoreBoard) -> str:
    """Write the board as ``scores/{w}.json`` for the window it last closed."""
    if board.window is None:
        raise ScoringError("no window closed yet: nothing to publish")
    key = scores_key(board.window)
    await store.put(key, board.to_json())
    return key


async def read_scores(store: ObjectStore, window: int) -> ScoreBoard:
    key = scores_key(window)
    return ScoreBoard.from_json(await store.get(key), source=store.url(key))
