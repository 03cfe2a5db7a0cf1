"""Scoring v2: the rules, as pure functions (no I/O, no model): gate, reward, admission.

A validator asks two questions of every evaluated payload, separately:

1. **The gate — did this miner train on its assigned data?** Its Δ, normalised to the
   window's reference norm, is applied at the outer learning rate; the per-row loss
   improvement is measured on a secret subset of the miner's *fresh* assigned rows (not
   assigned to anyone earlier on this shard) and on secret matched rows of the same shard
   that nobody was assigned. A Δ trained on those rows improves them more than rows it
   never saw (memorisation shows first). :func:`gate_result` runs a one-sided
   Mann–Whitney rank test (normal approximation, tie-corrected): rank tests ignore the
   heavy tails of per-row gains. The miner passes when ``z >= z_critical(gate_alpha)``.
2. **The reward — how much does the update help?** The first-order improvement of the
   held-out loss (fresh, secret rows of the validation shard) when the Δ is applied *as it
   is aggregated*: normalised to the reference norm and weighted ``1/n``:
   ``raw = outer_lr · (r/n) · g_H · Δ̂ / L_H``. Rewards are compared within the window
   (:func:`relative_rewards`): divided by the median raw reward of the gate-passing
   miners, capped. The reward is paid only when the gate passes; a Δ with ``raw <= 0``
   raised the held-out loss: it earns 0 and its miner loses admission at once.

Scaling Δ changes nothing (everything is normalised); memorising without generalising
earns a gate pass but no reward; copies, replays, noise and Δs trained on other rows fail
the gate. **Admission** (:func:`admitted`) needs ``admission_passes`` passes in the last
``admission_windows`` evaluations, the latest one a pass.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tplr.errors import TplrError


class ScoringError(TplrError):
    """Scores cannot be computed or loaded (bad losses, double update, bad file)."""


class EvaluationFailed(ScoringError):
    """The miner's Δ broke the model (non-finite loss): it fails the gate."""

    reason = "non_finite_loss"


GateAlpha = Annotated[float, Field(gt=0, lt=0.5)]
GateSamples = Annotated[int, Field(ge=8, le=1 << 16)]
HeldoutSamples = Annotated[int, Field(ge=8, le=1 << 20)]
RewardCap = Annotated[float, Field(ge=1, le=1000)]
AdmissionCount = Annotated[int, Field(ge=1, le=1000)]
BootstrapWindows = Annotated[int, Field(ge=0, le=1 << 20)]
EmaAlpha = Annotated[float, Field(gt=0, le=1)]
Decay = Annotated[float, Field(ge=0, le=1)]
TopN = Annotated[int, Field(ge=1, le=1 << 16)]
Cosine = Annotated[float, Field(gt=0, le=1)]
"""The bounds of each setting, shared with run.json's fields (:mod:`tplr.protocol.run_spec`)."""


class ScoringConfig(BaseModel):
    """Scoring and admission settings; a run carries them in run.json."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    gate_alpha: GateAlpha = 0.001
    gate_samples: GateSamples = 128
    heldout_samples: HeldoutSamples = 512
    reward_cap: RewardCap = 3.0
    admission_passes: AdmissionCount = 2
    admission_windows: AdmissionCount = 4
    bootstrap_windows: BootstrapWindows = 10
    ema_alpha: EmaAlpha = 0.2
    missing_decay: Decay = 0.9
    top_n: TopN = 32
    duplicate_cosine: Cosine = 0.9

    @model_validator(mode="after")
    def _check_admission(self) -> ScoringConfig:
        if self.admission_passes > self.admission_windows:
            raise ValueError(
                f"admission_passes ({self.admission_passes}) must not exceed "
                f"admission_windows ({self.admission_windows})"
            )
        return self


def z_critical(alpha: float) -> float:
    """The one-sided standard-normal critical value for significance ``alpha``."""
    return statistics.NormalDist().inv_cdf(1.0 - alpha)


def mann_whitney_z(treated: np.ndarray, control: np.ndarray) -> float:
    """One-sided Mann–Whitney U as a z score: large when ``treated`` tends to exceed
    ``control``. Normal approximation with the tie correction; 0.0 when all values tie."""
    treated = np.asarray(treated, dtype=np.float64)
    control = np.asarray(control, dtype=np.float64)
    n1, n2 = treated.size, control.size
    if n1 == 0 or n2 == 0:
        raise ScoringError(f"the gate needs rows on both sides, got {n1} and {n2}")
    values = np.concatenate([treated, control])
    if not np.isfinite(values).all():
        raise EvaluationFailed("a loss after the update is not finite")
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(1, values.size + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ranks = np.bincount(inverse, weights=ranks)[inverse] / counts[inverse]  # mid-ranks
    u_statistic = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    total = n1 + n2
    tie_term = float((counts**3 - counts).sum()) / (total * (total - 1))
    variance = n1 * n2 / 12.0 * ((total + 1) - tie_term)
    if variance <= 0:
        return 0.0
    return float((u_statistic - n1 * n2 / 2.0) / math.sqrt(variance))


@dataclass(frozen=True, slots=True)
class GateResult:
    z: float
    assigned_rows: int
    unassigned_rows: int
    passed: bool


def gate_result(
    assigned_gain: np.ndarray, unassigned_gain: np.ndarray, *, alpha: float
) -> GateResult:
    """Per-row loss improvements (before − after) on assigned vs never-assigned rows."""
    z = mann_whitney_z(assigned_gain, unassigned_gain)
    return GateResult(
        z=z,
        assigned_rows=len(assigned_gain),
        unassigned_rows=len(unassigned_gain),
        passed=z >= z_critical(alpha),
    )


def relative_rewards(
    raw: Mapping[int, float], gate_passed: Iterable[int], *, cap: float
) -> dict[int, float]:
    """Window scores: ``raw / median(positive raw of gate-passing uids)``, in ``[0, cap]``.

    Only gate-passing uids with a positive raw reward earn anything; every uid of ``raw``
    gets an entry (0.0 when it earns nothing).
    """
    passed = set(gate_passed)
    for uid, value in raw.items():
        if not math.isfinite(value):
            raise ScoringError(f"raw reward of uid {uid} is not finite: {value}")
    positive = [raw[uid] for uid in passed if uid in raw and raw[uid] > 0]
    if not positive:
        return dict.fromkeys(raw, 0.0)
    reference = statistics.median(positive)
    return {
        uid: min(cap, value / reference) if uid in passed and value > 0 else 0.0
        for uid, value in raw.items()
    }


class Evidence(StrEnum):
    """One evaluation's outcome, as admission counts it."""

    PASSED = "passed"  # gate passed, held-out loss improved
    FAILED = "failed"  # gate failed (or the evaluation broke)
    HARMFUL = "harmful"  # the update raised the held-out loss


def evidence_of(gate: GateResult | None, raw_reward: float | None) -> Evidence:
    if gate is None or not gate.passed:
        return Evidence.FAILED
    if raw_reward is None or raw_reward <= 0:
        return Evidence.HARMFUL
    return Evidence.PASSED


def admitted(history: Sequence[Evidence], config: ScoringConfig) -> bool:
    """Admission: ``admission_passes`` passes among the last ``admission_windows``
    evaluations (oldest first in ``history``), and the latest one a pass."""
    recent = list(history)[-config.admission_windows :]
    if not recent or recent[-1] is not Evidence.PASSED:
        return False
    return sum(item is Evidence.PASSED for item in recent) >= config.admission_passes


def ema(previous: float, new: float, alpha: float) -> float:
    return alpha * new + (1.0 - alpha) * previous


def in_bootstrap(window: int, config: ScoringConfig) -> bool:
    """During the first ``bootstrap_windows`` windows of a run the gate cannot yet tell
    (a model near its initialisation learns the same from every row), so approval asks
    only for a held-out improvement; gate results are still recorded as evidence."""
    return window < config.bootstrap_windows
