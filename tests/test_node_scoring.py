"""The validator's score board: moving scores, admission evidence, the scores file."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tplr.comms.stores.local import LocalStore
from tplr.node.scoring import MinerVerdict, ScoreBoard, publish_scores, read_scores, scores_key
from tplr.protocol.reasons import RejectReason
from tplr.protocol.scoring import GateResult, ScoringConfig, ScoringError

CONFIG = ScoringConfig(ema_alpha=0.5, missing_decay=0.5, admission_passes=2, admission_windows=3)
PASS = GateResult(z=4.0, assigned_rows=64, unassigned_rows=64, passed=True)
FAIL = GateResult(z=0.2, assigned_rows=64, unassigned_rows=64, passed=False)


def good(score: float = 1.0) -> MinerVerdict:
    return MinerVerdict(reason=None, evaluated=True, gate=PASS, raw_reward=0.01, window_score=score)


def test_moving_scores_and_missing_decay():
    board = ScoreBoard(CONFIG)
    board.close_window(0, {1: good(1.0), 2: good(0.5)}, expected_uids=[1, 2, 3])
    assert board.scores() == {1: 0.5, 2: 0.25, 3: 0.0}
    assert board.peers[3].last_reason is RejectReason.NO_COMMITMENT
    board.close_window(1, {1: good(1.0)}, expected_uids=[1, 2])
    assert board.scores()[1] == 0.75
    assert board.scores()[2] == 0.125  # committed nothing: decays
    # valid but not in this window's evaluated subset: no measurement, the score stands
    board.close_window(2, {1: MinerVerdict(reason=RejectReason.NOT_EVALUATED)}, expected_uids=[1])
    assert board.scores()[1] == 0.75
    assert len(board.peers[1].evidence) == 2


def test_admission_needs_evidence_and_a_failure_removes_at_once():
    board = ScoreBoard(CONFIG)
    board.close_window(0, {1: good(), 2: good()}, expected_uids=[1, 2])
    assert board.admitted() == []  # one pass is not enough
    board.close_window(1, {1: good(), 2: good()}, expected_uids=[1, 2])
    assert board.admitted() == [1, 2]
    failed = MinerVerdict(reason=RejectReason.GATE_FAILED, evaluated=True, gate=FAIL)
    harmful = MinerVerdict(reason=RejectReason.HARMFUL, evaluated=True, gate=PASS, raw_reward=-1)
    board.close_window(2, {1: failed, 2: harmful}, expected_uids=[1, 2])
    assert board.admitted() == []
    assert board.scores()[1] < 1.0


def test_top_n_keeps_the_best_admitted():
    board = ScoreBoard(CONFIG.model_copy(update={"top_n": 2}))
    for window in range(2):
        board.close_window(
            window, {1: good(0.2), 2: good(1.0), 3: good(0.6)}, expected_uids=[1, 2, 3]
        )
    assert board.admitted() == [2, 3]


def test_double_updates_and_bad_scores_are_refused():
    board = ScoreBoard(CONFIG)
    board.close_window(3, {1: good()}, expected_uids=[1])
    with pytest.raises(ScoringError, match="already updated"):
        board.close_window(3, {1: good()}, expected_uids=[1])
    with pytest.raises(ScoringError, match="finite"):
        board.close_window(4, {1: good(float("nan"))}, expected_uids=[1])


async def test_scores_file_round_trip_lists_every_verdict(tmp_path):
    store = LocalStore(tmp_path)
    board = ScoreBoard(CONFIG)
    verdicts = {
        1: good(1.2),
        2: MinerVerdict(reason=RejectReason.GATE_FAILED, evaluated=True, gate=FAIL, raw_reward=0.1),
        3: MinerVerdict(reason=RejectReason.REVEAL_MISMATCH),
    }
    board.close_window(7, verdicts, expected_uids=[1, 2, 3, 4])
    key = await publish_scores(store, board)
    assert key == scores_key(7)
    document = json.loads(await store.get(key))
    assert document["verdicts"]["1"]["gate_passed"] is True
    assert document["verdicts"]["2"] == {
        "reason": "gate_failed",
        "evaluated": True,
        "gate_z": 0.2,
        "gate_passed": False,
        "raw_reward": 0.1,
        "window_score": 0.0,
    }
    assert document["verdicts"]["4"]["reason"] == "no_commitment"
    again = await read_scores(store, 7)
    assert again.scores() == board.scores()
    assert again.admitted() == board.admitted()
    assert again.peers[1].evidence == board.peers[1].evidence


@pytest.mark.parametrize(
    "text",
    [
        "[" * 5000 + "]" * 5000,
        '{"format": "tplr-scores", "version": 2, "window": 1, "config": {}, '
        '"peers": {"1": {"score": NaN}}}',
        '{"format": "tplr-scores", "version": 2, "window": 1, "config": {}, '
        '"peers": {"1": {"score": "high"}}}',
        '{"format": "tplr-scores", "version": 2, "window": 1, "config": {}, '
        '"peers": {"x1": {"score": 1}}}',
        '{"format": "tplr-scores", "version": 2, "window": -1, "config": {}, "peers": {}}',
        '{"format": "tplr-scores", "version": 1, "window": 1, "config": {}, "peers": {}}',
        '{"format": "tplr-scores", "version": 2, "window": 1, "config": {}, '
        '"peers": {"1": {"score": -3}}}',
        "\xff\xfe",
        "null",
    ],
)
def test_a_broken_scores_file_is_a_scoring_error(text):
    """Issue 10, item 7: the validator's own scores file with nesting/NaN/strings crashed it
    (and again on every restart)."""
    with pytest.raises(ScoringError) as info:
        ScoreBoard.from_json(text.encode("utf-8", "surrogateescape"), source="scores/1.json")
    assert "scores/1.json" in str(info.value) and info.value.hint


@given(st.binary(max_size=300))
def test_scores_parser_fuzz(data):
    try:
        ScoreBoard.from_json(data)
    except ScoringError:
        pass
