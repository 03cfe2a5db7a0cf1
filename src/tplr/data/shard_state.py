"""Shard lifecycle states and the one function allowed to change them.

::

    REMOTE ──► DOWNLOADING ──► READY ──► ACTIVE ──► RETIRED
      ▲            │             ▲                     │
      └────────────┘ (failed)    └── (kept on disk) ───┤
      ▲                                                │
      └──────────────── (files deleted) ───────────────┘

- REMOTE: only in the bucket (or partially on disk with a resume journal).
- DOWNLOADING: rank 0 is fetching and verifying it (other ranks wait for its marker).
- READY: every file on disk, verified, and mapped; can become active instantly.
- ACTIVE: the shard the current windows train on.
- RETIRED: the schedule moved past it; rank 0 deletes its files unless keep is set.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tplr.errors import TplrError


class ShardState(enum.Enum):
    REMOTE = "remote"
    DOWNLOADING = "downloading"
    READY = "ready"
    ACTIVE = "active"
    RETIRED = "retired"


STATE_CODES = {state: code for code, state in enumerate(ShardState)}
"""Numeric code per state, for the ``tplr_dataset_shard_state`` gauge."""

ALLOWED_TRANSITIONS: dict[ShardState, frozenset[ShardState]] = {
    ShardState.REMOTE: frozenset({ShardState.DOWNLOADING, ShardState.READY}),
    ShardState.DOWNLOADING: frozenset({ShardState.READY, ShardState.REMOTE}),
    ShardState.READY: frozenset({ShardState.ACTIVE, ShardState.REMOTE}),
    ShardState.ACTIVE: frozenset({ShardState.RETIRED}),
    ShardState.RETIRED: frozenset({ShardState.READY, ShardState.REMOTE}),
}


class InvalidTransition(TplrError):
    """A bug: code tried to move a shard along an edge the lifecycle does not have."""


@dataclass
class ShardSlot:
    """The manager's record of one shard of the schedule."""

    index: int
    keys: tuple[str, ...]
    size_bytes: int
    state: ShardState = ShardState.REMOTE
    ready_at: float | None = None
    history: list[tuple[ShardState, float]] = field(default_factory=list)

    def transition(self, new_state: ShardState) -> ShardState:
        """Move to ``new_state`` (the only place a state changes); returns the old state."""
        old = self.state
        if new_state not in ALLOWED_TRANSITIONS[old]:
            raise InvalidTransition(
                f"shard {self.index}: {old.value} -> {new_state.value} is not a valid transition"
            )
        now = time.monotonic()
        self.state = new_state
        self.history.append((new_state, now))
        if new_state is ShardState.READY:
            self.ready_at = now
        elif new_state is not ShardState.ACTIVE:
            self.ready_at = None
        return old
