"""Why a miner's work was left out of a window: one low-cardinality set of labels.

Every exclusion has exactly one reason, whatever the stage that found it (commitment,
reveal, fetch, payload checks, duplicates, evaluation, approval). The values are stable
metric labels (``tplr_peers_rejected_total{reason}``) and appear in the published scores
and approvals, so an honest operator can read why.
"""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    # commit, then reveal
    NO_COMMITMENT = "no_commitment"  # nothing committed (in time) for the window
    BAD_COMMITMENT = "bad_commitment"  # the commitment object is malformed
    LATE_COMMITMENT = "late_commitment"  # committed after the deadline
    NOT_REVEALED = "not_revealed"  # committed, but no payload by the reveal deadline
    LATE_REVEAL = "late_reveal"  # payload stamped outside the reveal phase
    REVEAL_MISMATCH = "reveal_mismatch"  # payload bytes differ from the commitment
    # fetching
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    UNKNOWN_PEER = "unknown_peer"
    CHANGED = "changed"  # replaced between HEAD and GET
    # the payload itself
    NOT_SAFETENSORS = "not_safetensors"
    TOO_LARGE = "too_large"
    BAD_METADATA = "bad_metadata"
    PROTOCOL_VERSION = "protocol_version"
    MISSING_KEYS = "missing_keys"
    EXTRA_KEYS = "extra_keys"
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    INDEX_OUT_OF_RANGE = "index_out_of_range"
    DUPLICATE_INDEX = "duplicate_index"
    NON_FINITE = "non_finite"
    WRONG_RUN = "wrong_run"
    WRONG_WINDOW = "wrong_window"
    WRONG_UID = "wrong_uid"
    WRONG_BASE = "wrong_base"  # computed from another model than the window's
    DIGEST_MISMATCH = "digest_mismatch"  # sample digest is not the assignment's
    ZERO_UPDATE = "zero_update"  # an all-zero Δ
    DUPLICATE = "duplicate"  # same or near-same Δ as an earlier commitment
    # evaluation and approval
    NOT_EVALUATED = "not_evaluated"  # valid, but outside this window's evaluated subset
    GATE_FAILED = "gate_failed"  # no evidence of training on the assigned rows
    HARMFUL = "harmful"  # the update raised the held-out loss
    NON_FINITE_LOSS = "non_finite_loss"
    NOT_ADMITTED = "not_admitted"  # not (yet) in the peer list: evidence still short
    INTERNAL_ERROR = "internal_error"  # our own code failed on this peer's data
