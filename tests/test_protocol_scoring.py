"""Scoring v2 rules: the gate's rank test, reward normalisation, admission."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from tplr.protocol.approval import Candidate, decide_approvals
from tplr.protocol.reasons import RejectReason
from tplr.protocol.scoring import (
    EvaluationFailed,
    Evidence,
    GateResult,
    ScoringConfig,
    ScoringError,
    admitted,
    evidence_of,
    gate_result,
    in_bootstrap,
    mann_whitney_z,
    relative_rewards,
    z_critical,
)


def test_mann_whitney_z_by_hand():
    # treated ranks 4, 5, 6 of 6: U = 15 - 6 = 9 = n1*n2 -> the largest possible
    z = mann_whitney_z(np.array([4.0, 5.0, 6.0]), np.array([1.0, 2.0, 3.0]))
    expected = (9 - 4.5) / np.sqrt(3 * 3 * 7 / 12)
    assert z == pytest.approx(expected)
    assert mann_whitney_z(np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])) == -z
    # ties get mid-ranks and a smaller variance
    tied = mann_whitney_z(np.array([1.0, 1.0, 2.0]), np.array([1.0, 0.0, 0.0]))
    assert 0 < tied < expected
    assert mann_whitney_z(np.ones(5), np.ones(7)) == 0.0


def test_the_gate_refuses_broken_losses_and_empty_sides():
    with pytest.raises(EvaluationFailed):
        mann_whitney_z(np.array([1.0, np.nan]), np.array([0.0, 1.0]))
    with pytest.raises(ScoringError, match="both sides"):
        mann_whitney_z(np.array([]), np.array([1.0]))


def test_the_gate_is_calibrated_under_the_null():
    """Rows whose gains come from one distribution pass at about the nominal rate: the gate
    does not pass a miner that did not train on its rows more often than ``gate_alpha``."""
    rng = np.random.default_rng(0)
    alpha = 0.05
    trials = 2000
    passes = sum(
        gate_result(rng.standard_t(3, 64), rng.standard_t(3, 64), alpha=alpha).passed
        for _ in range(trials)
    )
    assert abs(passes / trials - alpha) < 0.015
    assert z_critical(0.001) == pytest.approx(3.0902, abs=1e-3)


def test_the_gate_sees_a_shift_of_half_a_standard_deviation_in_128_rows():
    rng = np.random.default_rng(1)
    passes = sum(
        gate_result(rng.normal(0.5, 1, 128), rng.normal(0, 1, 128), alpha=0.001).passed
        for _ in range(200)
    )
    assert passes >= 150


def test_relative_rewards():
    raw = {1: 0.02, 2: 0.01, 3: 0.03, 4: -0.01, 5: 0.5, 6: 0.04}
    rewards = relative_rewards(raw, gate_passed=[1, 2, 3, 4, 5], cap=3.0)
    median = 0.025  # of the positive raw rewards of gate-passing uids: 0.01 .. 0.5
    assert rewards[1] == pytest.approx(0.02 / median)
    assert rewards[4] == 0.0  # harmful
    assert rewards[5] == 3.0  # capped
    assert rewards[6] == 0.0  # did not pass the gate
    assert relative_rewards({1: -1.0}, [1], cap=3.0) == {1: 0.0}
    assert relative_rewards({}, [], cap=3.0) == {}
    with pytest.raises(ScoringError, match="not finite"):
        relative_rewards({1: float("nan")}, [1], cap=3.0)


@given(st.floats(min_value=1e-6, max_value=1e6))
def test_relative_rewards_are_scale_free(k):
    raw = {1: 0.02, 2: 0.01, 3: 0.03}
    scaled = {uid: value * k for uid, value in raw.items()}
    plain = relative_rewards(raw, [1, 2, 3], cap=3.0)
    again = relative_rewards(scaled, [1, 2, 3], cap=3.0)
    assert again == pytest.approx(plain)


def passed_gate() -> GateResult:
    return GateResult(z=5.0, assigned_rows=128, unassigned_rows=128, passed=True)


def failed_gate() -> GateResult:
    return GateResult(z=0.1, assigned_rows=128, unassigned_rows=128, passed=False)


def test_evidence_and_admission():
    config = ScoringConfig(admission_passes=2, admission_windows=4)
    assert evidence_of(passed_gate(), 0.01) is Evidence.PASSED
    assert evidence_of(passed_gate(), -0.01) is Evidence.HARMFUL
    assert evidence_of(failed_gate(), 0.01) is Evidence.FAILED
    assert evidence_of(None, None) is Evidence.FAILED
    P, F, H = Evidence.PASSED, Evidence.FAILED, Evidence.HARMFUL
    assert not admitted([], config)
    assert not admitted([P], config)
    assert admitted([P, P], config)
    assert admitted([P, F, P], config)
    assert not admitted([P, P, F], config)  # a failed gate removes at once
    assert not admitted([P, P, P, H], config)  # so does a harmful update
    assert not admitted([P, F, F, F, P], config)  # only the last 4 count
    with pytest.raises(ValidationError, match="must not exceed"):
        ScoringConfig(admission_passes=5, admission_windows=4)


def test_bootstrap_windows():
    config = ScoringConfig(bootstrap_windows=3)
    assert in_bootstrap(2, config) and not in_bootstrap(3, config)


def candidate(uid: int, **kwargs) -> Candidate:
    return Candidate(uid=uid, sha256="a" * 64, size=10, norm=1.0, **kwargs)


def test_approval_rule():
    candidates = [
        candidate(1, evaluated=True, gate=passed_gate(), raw_reward=0.1),
        candidate(2, evaluated=True, gate=passed_gate(), raw_reward=0.1),  # not admitted
        candidate(3, evaluated=True, gate=failed_gate(), raw_reward=0.1),
        candidate(4, evaluated=True, gate=passed_gate(), raw_reward=-0.1),
        candidate(5, evaluated=False),
        candidate(6, evaluated=True, failure=RejectReason.NON_FINITE_LOSS),
    ]
    approved, excluded = decide_approvals(candidates, admitted=[1, 3, 4], bootstrap=False)
    assert approved == [1]
    assert excluded == {
        2: RejectReason.NOT_ADMITTED,
        3: RejectReason.GATE_FAILED,
        4: RejectReason.HARMFUL,
        5: RejectReason.NOT_EVALUATED,
        6: RejectReason.NON_FINITE_LOSS,
    }
    # bootstrap: approval on held-out improvement alone, never for a harmful update
    approved, excluded = decide_approvals(candidates, admitted=[], bootstrap=True)
    assert approved == [1, 2, 3]
    assert excluded[4] is RejectReason.HARMFUL
