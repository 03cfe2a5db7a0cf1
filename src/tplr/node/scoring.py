"""The validator's score board: moving scores, admission evidence, ``scores/{w}.json``.

The rules are in :mod:`tplr.protocol.scoring`; this module keeps their state across
windows and publishes it. Per miner it keeps the moving score (EMA of window scores; a
miner that committed nothing decays by ``missing_decay``), the outcomes of its last
``admission_windows`` evaluations (the admission evidence), and the last window's
verdict. Each ``scores/{w}.json`` also lists every miner's verdict for window ``w`` —
the reason it was left out (or none), its gate statistic, raw and relative reward — so
an honest operator can see why. Reading the file back (after a restart) goes through a
strict, bounded parser: a broken file is a :class:`ScoringError`, never a crash.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from tplr.comms.stores.base import ObjectStore
from tplr.protocol.reasons import RejectReason
from tplr.protocol.scoring import (
    Evidence,
    GateResult,
    ScoringConfig,
    ScoringError,
    admitted,
    ema,
    evidence_of,
)
from tplr.untrusted import MalformedInput, load_model

SCORES_FORMAT = "tplr-scores"
SCORES_VERSION = 2
MAX_SCORES_BYTES = 32 * 1024 * 1024
NOT_COMMITTED = {RejectReason.NO_COMMITMENT}
"""Exclusions that mean "posted nothing": the score decays instead of taking a zero."""


@dataclass(frozen=True, slots=True)
class MinerVerdict:
    """What the validator concluded about one miner in one window."""

    reason: RejectReason | None  # None: approved
    evaluated: bool = False
    gate: GateResult | None = None
    raw_reward: float | None = None
    window_score: float = 0.0

    @property
    def approved(self) -> bool:
        return self.reason is None


class _Verdict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    reason: RejectReason | None = None
    evaluated: bool = False
    gate_z: float | None = None
    gate_passed: bool | None = None
    raw_reward: float | None = None
    window_score: float = Field(default=0.0, ge=0)


class PeerScore(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)

    score: float = Field(default=0.0, ge=0)
    evidence: list[Evidence] = Field(default_factory=list, max_length=1000)
    last_window_seen: int | None = Field(default=None, ge=0)
    last_window_updated: int | None = Field(default=None, ge=0)
    last_reason: RejectReason | None = None
    last_window_score: float | None = Field(default=None, ge=0)


class _ScoresDocument(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    format: str
    version: int
    window: int | None = Field(ge=0)
    config: ScoringConfig
    peers: dict[str, PeerScore] = Field(max_length=1 << 20)
    verdicts: dict[str, _Verdict] = Field(default_factory=dict, max_length=1 << 20)


@dataclass
class ScoreBoard:
    """Scores per uid; :meth:`close_window` applies one window's verdicts."""

    config: ScoringConfig = field(default_factory=ScoringConfig)
    peers: dict[int, PeerScore] = field(default_factory=dict)
    window: int | None = None  # last window closed
    verdicts: dict[int, MinerVerdict] = field(default_factory=dict)  # of ``window``

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

    def record(self, uid: int, window: int, verdict: MinerVerdict) -> None:
        if not (math.isfinite(verdict.window_score) and verdict.window_score >= 0):
            raise ScoringError(f"window score of uid {uid} must be finite and >= 0")
        entry = self._entry(uid, window)
        if verdict.reason in NOT_COMMITTED:
            entry.score *= self.config.missing_decay
            entry.last_window_score = None
            entry.last_reason = verdict.reason
            return
        entry.last_window_seen = window
        entry.last_reason = verdict.reason
        if verdict.evaluated:
            history = [*entry.evidence, evidence_of(verdict.gate, verdict.raw_reward)]
            entry.evidence = history[-self.config.admission_windows :]
        if verdict.reason is RejectReason.NOT_EVALUATED:
            return  # no measurement this window: the score stands
        entry.score = ema(entry.score, verdict.window_score, self.config.ema_alpha)
        entry.last_window_score = verdict.window_score

    def close_window(
        self, window: int, verdicts: Mapping[int, MinerVerdict], *, expected_uids: Iterable[int]
    ) -> None:
        """Apply one window's verdicts; expected uids without one posted nothing."""
        complete = dict(verdicts)
        for uid in set(expected_uids) - set(complete):
            complete[uid] = MinerVerdict(reason=RejectReason.NO_COMMITMENT)
        for uid in sorted(complete):
            self.record(uid, window, complete[uid])
        self.window = window
        self.verdicts = complete

    def scores(self) -> dict[int, float]:
        return {uid: entry.score for uid, entry in sorted(self.peers.items())}

    def admitted(self) -> list[int]:
        """Up to ``top_n`` admitted uids, best moving score first (ties by uid)."""
        members = [
            (uid, entry.score)
            for uid, entry in self.peers.items()
            if admitted(entry.evidence, self.config)
        ]
        members.sort(key=lambda item: (-item[1], item[0]))
        return sorted(uid for uid, _ in members[: self.config.top_n])

    def evidence_counts(self) -> dict[int, int]:
        return {uid: len(entry.evidence) for uid, entry in self.peers.items()}

    def to_json(self) -> bytes:
        document = _ScoresDocument(
            format=SCORES_FORMAT,
            version=SCORES_VERSION,
            window=self.window,
            config=self.config,
            peers={str(uid): entry for uid, entry in sorted(self.peers.items())},
            verdicts={
                str(uid): _Verdict(
                    reason=verdict.reason,
                    evaluated=verdict.evaluated,
                    gate_z=None if verdict.gate is None else verdict.gate.z,
                    gate_passed=None if verdict.gate is None else verdict.gate.passed,
                    raw_reward=verdict.raw_reward,
                    window_score=verdict.window_score,
                )
                for uid, verdict in sorted(self.verdicts.items())
            },
        )
        return document.model_dump_json(indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = "scores") -> ScoreBoard:
        """Parse a scores file; anything wrong with it is a :class:`ScoringError`."""
        hint = "start scoring afresh (the file is ignored) or fix the file"
        try:
            document = load_model(
                data, _ScoresDocument, what=source, max_bytes=MAX_SCORES_BYTES, max_depth=4
            )
        except MalformedInput as exc:
            message = f"not a valid scores file: {exc.message}"
            raise ScoringError(message, hint=hint) from None
        if (document.format, document.version) != (SCORES_FORMAT, SCORES_VERSION):
            raise ScoringError(
                f"{source} is format {document.format[:40]!r} version {document.version}, "
                f"expected {SCORES_FORMAT!r} version {SCORES_VERSION}",
                hint=hint,
            )
        peers: dict[int, PeerScore] = {}
        for key, entry in document.peers.items():
            if not key.isascii() or not key.isdigit() or len(key) > 10:
                raise ScoringError(f"{source}: peer key {key[:20]!r} is not a uid", hint=hint)
            peers[int(key)] = entry
        return cls(config=document.config, peers=peers, window=document.window)


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
    info = await store.head(key)
    if info.size > MAX_SCORES_BYTES:
        raise ScoringError(f"{store.url(key)} is {info.size} bytes; too large for a scores file")
    return ScoreBoard.from_json(await store.get(key), source=store.url(key))
