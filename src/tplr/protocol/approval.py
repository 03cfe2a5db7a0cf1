"""The lead validator's approval of window ``w``: exactly which payloads the outer step sums.

``approvals/{w}.json`` in the lead's bucket lists, per approved uid, the SHA-256 and size of
the payload bytes the lead checked and its aggregation weight; per excluded uid the reason;
the model digests before (``base_digest``) and after (``result_digest``) the outer step.
The lead also copies every approved payload to ``approved/{w}/{uid}.safetensors`` in its
own bucket, so no peer can swap its bytes after approval or serve different bytes to
different nodes. Every node applies ``θ ← θ − outer_lr · Σ weight_i · Δ_i`` over the
approved set and nothing else — including in the first windows of a run — and checks the
result against ``result_digest``.

:func:`decide_approvals` is the rule (pure): a payload is approved when it passed every
check, was evaluated, and (after the bootstrap windows) its miner is admitted and passed
this window's gate, and its update lowers the held-out loss.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tplr.errors import TplrError
from tplr.protocol.reasons import RejectReason
from tplr.protocol.scoring import GateResult
from tplr.untrusted import MalformedInput, load_model

APPROVAL_FORMAT = "tplr-approval"
APPROVAL_VERSION = 2
APPROVALS_PREFIX = "approvals/"
MIRROR_PREFIX = "approved/"
MAX_APPROVAL_BYTES = 16 * 1024 * 1024
_SHA256 = r"^[0-9a-f]{64}$"
_UID_KEY = r"^(0|[1-9][0-9]{0,9})$"


class ApprovalInvalid(TplrError):
    """The approval document is malformed or not for this run and window."""

    hint = "the lead validator published a broken approval; this node resyncs from its checkpoint"


class ApprovedPayload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    sha256: str = Field(pattern=_SHA256)
    bytes: int = Field(ge=1, lt=1 << 40)
    weight: float = Field(gt=0, le=1e6)


class Approval(BaseModel):
    """``approvals/{w}.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    format: str = APPROVAL_FORMAT
    version: int = APPROVAL_VERSION
    run_id: str = Field(max_length=64)
    window: int = Field(ge=0, lt=1 << 40)
    base_digest: str = Field(max_length=128)
    result_digest: str = Field(max_length=128)
    reference_norm: float = Field(ge=0)
    bootstrap: bool = False
    approved: dict[str, ApprovedPayload] = Field(default_factory=dict)
    excluded: dict[str, str] = Field(default_factory=dict)  # uid -> RejectReason value
    published_at_s: float = Field(ge=0)

    @field_validator("approved", "excluded")
    @classmethod
    def _uid_keys(cls, value: dict) -> dict:
        for key in value:
            if not re.fullmatch(_UID_KEY, key):
                raise ValueError(f"key {key[:20]!r} is not a uid")
        return value

    def approved_uids(self) -> list[int]:
        return sorted(int(uid) for uid in self.approved)

    def entry(self, uid: int) -> ApprovedPayload:
        return self.approved[str(uid)]

    def weights(self) -> dict[int, float]:
        return {int(uid): entry.weight for uid, entry in self.approved.items()}

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def approval_key(window: int) -> str:
    return f"{APPROVALS_PREFIX}{window}.json"


def mirror_key(window: int, uid: int) -> str:
    return f"{MIRROR_PREFIX}{window}/{uid}.safetensors"


def parse_approval(data: bytes, *, run_id: str, window: int, source: str) -> Approval:
    try:
        approval = load_model(
            data, Approval, what=source, max_bytes=MAX_APPROVAL_BYTES, max_depth=3
        )
    except MalformedInput as exc:
        raise ApprovalInvalid(exc.message) from None
    if (approval.format, approval.version) != (APPROVAL_FORMAT, APPROVAL_VERSION):
        raise ApprovalInvalid(f"{source} is format {approval.format!r} v{approval.version}")
    if (approval.run_id, approval.window) != (run_id, window):
        raise ApprovalInvalid(
            f"{source} is for run {approval.run_id!r} window {approval.window}, "
            f"expected run {run_id!r} window {window}"
        )
    return approval


@dataclass(frozen=True, slots=True)
class Candidate:
    """A payload of window ``w`` that passed every check, with what evaluation found."""

    uid: int
    sha256: str
    size: int
    norm: float
    evaluated: bool = False
    gate: GateResult | None = None
    raw_reward: float | None = None
    failure: RejectReason | None = None  # the evaluation itself failed (e.g. non-finite)


def exclusion_of(candidate: Candidate, *, admitted: bool, bootstrap: bool) -> RejectReason | None:
    """Why ``candidate`` is not approved, or None when it is."""
    if candidate.failure is not None:
        return candidate.failure
    if not candidate.evaluated:
        return RejectReason.NOT_EVALUATED
    if candidate.raw_reward is None or not math.isfinite(candidate.raw_reward):
        return RejectReason.NOT_EVALUATED
    if candidate.raw_reward <= 0:
        return RejectReason.HARMFUL
    if bootstrap:
        return None
    if candidate.gate is None or not candidate.gate.passed:
        return RejectReason.GATE_FAILED
    if not admitted:
        return RejectReason.NOT_ADMITTED
    return None


def decide_approvals(
    candidates: Iterable[Candidate], *, admitted: Iterable[int], bootstrap: bool
) -> tuple[list[int], dict[int, RejectReason]]:
    """``(approved uids, {uid: reason})`` for every candidate."""
    members = set(admitted)
    approved: list[int] = []
    excluded: dict[int, RejectReason] = {}
    for candidate in sorted(candidates, key=lambda c: c.uid):
        reason = exclusion_of(candidate, admitted=candidate.uid in members, bootstrap=bootstrap)
        if reason is None:
            approved.append(candidate.uid)
        else:
            excluded[candidate.uid] = reason
    return approved, excluded


def build_approval(
    *,
    run_id: str,
    window: int,
    base_digest: str,
    result_digest: str,
    reference_norm: float,
    bootstrap: bool,
    approved: Mapping[int, Candidate],
    weights: Mapping[int, float],
    excluded: Mapping[int, RejectReason | str],
    published_at_s: float,
) -> Approval:
    return Approval(
        run_id=run_id,
        window=window,
        base_digest=base_digest,
        result_digest=result_digest,
        reference_norm=reference_norm,
        bootstrap=bootstrap,
        approved={
            str(uid): ApprovedPayload(
                sha256=approved[uid].sha256, bytes=approved[uid].size, weight=weights[uid]
            )
            for uid in sorted(approved)
        },
        excluded={str(uid): str(reason) for uid, reason in sorted(excluded.items())},
        published_at_s=published_at_s,
    )
