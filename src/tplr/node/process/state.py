"""What a node is doing, for ``/healthz`` and ``tplr_node_state`` (no dependencies)."""

from __future__ import annotations

from enum import StrEnum


class NodeState(StrEnum):
    """What the node is doing (``tplr_node_state{state=...}`` is 1 for exactly one)."""

    STARTING = "starting"  # opening stores, waiting for the lead or run.json
    JOINING = "joining"  # building the model, loading the lead's checkpoint
    DOWNLOADING = "downloading"  # waiting for the first dataset shard
    TRAINING = "training"  # a miner in its window loop
    VALIDATING = "validating"  # a validator in its window loop
    STALLED = "stalled"  # in the loop, but no window completed for too long (/healthz 503)
