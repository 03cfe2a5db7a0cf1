"""Commit, then reveal: a miner binds itself to its payload before anyone can read it.

Before the commit deadline of window ``w`` a miner publishes only
``commitments/{w}/{uid}.json`` in its own bucket: the SHA-256 and size of the payload
bytes it will reveal. The payload itself (``gradients/{w}/{uid}.safetensors``) is uploaded
in the reveal phase, after every validator has taken its snapshot of the commitments.
A payload counts only if its bytes hash to the commitment observed in time, so nothing
worth copying is readable before the deadline, and a commitment cannot be changed after
it: a later version is either not seen (the snapshot is taken) or stamped late.

The evidence of "in time" is twofold, because a peer's own endpoint may lie about
``LastModified``: the validator must have *observed* the commitment before the reveal
phase opened, and (where the store's clock is trusted) its ``LastModified`` must lie in
the window before the commit deadline.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from tplr.errors import TplrError
from tplr.untrusted import MalformedInput, load_model

COMMITMENT_FORMAT = "tplr-commitment"
COMMITMENT_VERSION = 2
COMMITMENTS_PREFIX = "commitments/"
MAX_COMMITMENT_BYTES = 4096
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CommitmentInvalid(TplrError):
    """A commitment object is malformed or does not describe this window and uid."""

    hint = "the miner's commitment is ignored for this window"


class Commitment(BaseModel):
    """``commitments/{w}/{uid}.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    format: str = COMMITMENT_FORMAT
    version: int = COMMITMENT_VERSION
    run_id: str = Field(max_length=64)
    window: int = Field(ge=0, lt=1 << 40)
    uid: int = Field(ge=0, lt=1 << 31)
    payload_sha256: str = Field(pattern=_SHA256.pattern)
    payload_bytes: int = Field(ge=1, lt=1 << 40)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    def matches(self, data: bytes) -> bool:
        return len(data) == self.payload_bytes and payload_sha256(data) == self.payload_sha256


def commitment_key(window: int, uid: int) -> str:
    return f"{COMMITMENTS_PREFIX}{window}/{uid}.json"


def payload_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def commit_to(data: bytes, *, run_id: str, window: int, uid: int) -> Commitment:
    return Commitment(
        run_id=run_id,
        window=window,
        uid=uid,
        payload_sha256=payload_sha256(data),
        payload_bytes=len(data),
    )


def parse_commitment(data: bytes, *, run_id: str, window: int, uid: int) -> Commitment:
    """Validate a peer's commitment for ``(run_id, window, uid)``; CommitmentInvalid else."""
    try:
        commitment = load_model(
            data, Commitment, what="commitment", max_bytes=MAX_COMMITMENT_BYTES, max_depth=1
        )
    except MalformedInput as exc:
        raise CommitmentInvalid(exc.message) from None
    if (commitment.format, commitment.version) != (COMMITMENT_FORMAT, COMMITMENT_VERSION):
        raise CommitmentInvalid(
            f"format {commitment.format[:40]!r} version {commitment.version}, expected "
            f"{COMMITMENT_FORMAT!r} version {COMMITMENT_VERSION}"
        )
    if (commitment.run_id, commitment.window, commitment.uid) != (run_id, window, uid):
        raise CommitmentInvalid(
            f"commitment is for run {commitment.run_id!r} window {commitment.window} uid "
            f"{commitment.uid}, expected run {run_id!r} window {window} uid {uid}"
        )
    return commitment


@dataclass(frozen=True, slots=True)
class ObservedCommitment:
    """A commitment as a validator saw it: the object, its stamp, when it was read."""

    commitment: Commitment
    last_modified: datetime
    observed_at_s: float


def commitments_digest(observed: dict[int, ObservedCommitment]) -> bytes:
    """A digest of every accepted commitment of a window (uid order): the late secret's
    public half, unknown to anyone before the commit deadline."""
    hasher = hashlib.blake2b(digest_size=32)
    for uid in sorted(observed):
        hasher.update(f"{uid}:{observed[uid].commitment.payload_sha256};".encode())
    return hasher.digest()
