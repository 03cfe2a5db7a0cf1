"""Duplicate and near-duplicate payloads, found cheaply: a content digest and a sketch.

- :func:`content_digest`: BLAKE2b of the tensor data alone (indices and values, in name
  order), so a relabelled copy (other uid, window or base in the metadata) has the same
  digest as the original.
- :func:`sketch`: a CountSketch of the sparse Δ in :data:`SKETCH_DIM` dimensions (each
  sent entry hashed to a bucket with a random sign). The cosine of two sketches estimates
  the cosine of the two Δs (standard error about ``1/sqrt(SKETCH_DIM)``), in
  ``O(entries)`` per payload instead of a dense pairwise dot; sketches are linear, so an
  aggregate's is the weighted sum of its parts'.

:func:`find_duplicates` marks every payload of the window that equals, or has a cosine of at
least the run's ``duplicate_cosine`` with, a payload of an earlier window (or an earlier
aggregate), and, among the window's own near-identical groups, every member but the one
with the strictly earliest commitment (a tie leaves none eligible). Honest Δs measured on
the test model stay below 0.65 with each other and below 0.4 with the previous aggregate,
well under the default 0.9.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import torch

from tplr.protocol.payload import GradientPayload

SKETCH_DIM = 4096
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def content_digest(payload: GradientPayload) -> str:
    hasher = hashlib.blake2b(digest_size=32)
    for name in sorted(payload.tensors):
        part = payload.tensors[name]
        hasher.update(name.encode())
        hasher.update(part.indices.contiguous().numpy().tobytes())
        hasher.update(part.values.contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def parameter_offsets(param_shapes: Mapping[str, tuple[int, ...]], chunk_size: int) -> dict:
    """Where each parameter's chunks start in one global index space (name order)."""
    offsets: dict[str, int] = {}
    position = 0
    for name in sorted(param_shapes):
        offsets[name] = position
        numel = int(np.prod(param_shapes[name], dtype=np.int64))
        position += -(-numel // chunk_size) * chunk_size
    return offsets


def _hash64(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        mixed = values.astype(np.uint64) * _GOLDEN
    mixed ^= mixed >> np.uint64(29)
    with np.errstate(over="ignore"):
        mixed *= np.uint64(0xBF58476D1CE4E5B9)
    return mixed ^ (mixed >> np.uint64(32))


def sketch(payload: GradientPayload, offsets: Mapping[str, int], chunk_size: int) -> np.ndarray:
    """The CountSketch of the payload's sparse Δ (linear: sketches add like the Δs)."""
    result = np.zeros(SKETCH_DIM, dtype=np.float64)
    for name in sorted(payload.tensors):
        part = payload.tensors[name]
        indices = part.indices.to(torch.int64).numpy()  # (n_chunks, k)
        rows = np.arange(indices.shape[0], dtype=np.int64)[:, None] * chunk_size
        positions = (offsets[name] + rows + indices).ravel()
        values = part.values.to(torch.float64).numpy().ravel()
        hashed = _hash64(positions)
        buckets = (hashed % np.uint64(SKETCH_DIM)).astype(np.int64)
        signs = 1.0 - 2.0 * (hashed >> np.uint64(63)).astype(np.float64)
        result += np.bincount(buckets, weights=signs * values, minlength=SKETCH_DIM)
    return result


@dataclass(frozen=True, slots=True)
class Fingerprint:
    digest: str
    sketch: np.ndarray
    committed_at: datetime | None = None  # None for history entries

    def cosine(self, other: Fingerprint) -> float:
        norms = float(np.linalg.norm(self.sketch)) * float(np.linalg.norm(other.sketch))
        return float(self.sketch @ other.sketch) / norms if norms > 0 else 0.0


def aggregate_fingerprint(parts: Mapping[int, Fingerprint], weights: Mapping[int, float]):
    """The fingerprint of ``Σ weights[uid] · Δ_uid`` (no content digest of its own)."""
    total = sum(weights[uid] * parts[uid].sketch for uid in sorted(parts))
    return Fingerprint(digest="aggregate", sketch=np.asarray(total, dtype=np.float64))


def _pairwise_cosines(sketches: list[np.ndarray]) -> np.ndarray:
    """Every pair's cosine at once (a zero sketch has cosine 0 with everything)."""
    if not sketches:
        return np.zeros((0, 0))
    matrix = np.stack(sketches)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    unit = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
    return unit @ unit.T


def find_duplicates(
    current: Mapping[int, Fingerprint],
    history: Mapping[str, Fingerprint],
    *,
    threshold: float,
) -> dict[int, str]:
    """``{uid: explanation}`` of the current payloads that are not eligible."""
    verdicts: dict[int, str] = {}
    for uid in sorted(current):
        mine = current[uid]
        for label, old in history.items():
            cosine = mine.cosine(old)
            if mine.digest == old.digest or cosine >= threshold:
                verdicts[uid] = f"same update as {label} (cosine {cosine:.3f})"
                break
    uids = sorted(current)
    neighbours: dict[int, set[int]] = {uid: set() for uid in uids}
    close = _pairwise_cosines([current[uid].sketch for uid in uids]) >= threshold
    for i, first in enumerate(uids):
        for j in range(i + 1, len(uids)):
            second = uids[j]
            if close[i, j] or current[first].digest == current[second].digest:
                neighbours[first].add(second)
                neighbours[second].add(first)
    seen: set[int] = set()
    for uid in uids:
        if uid in seen or not neighbours[uid]:
            continue
        group, stack = set(), [uid]
        while stack:  # the connected group of near-identical payloads
            member = stack.pop()
            if member not in group:
                group.add(member)
                stack.extend(neighbours[member] - group)
        seen |= group
        stamps = {member: current[member].committed_at for member in group}
        earliest = min(stamps.values())
        first_ones = [member for member, stamp in stamps.items() if stamp == earliest]
        keep = first_ones[0] if len(first_ones) == 1 else None
        for member in sorted(group):
            if member != keep:
                others = sorted(group - {member})
                verdicts.setdefault(
                    member, f"same update as uid(s) {others[:5]} of this window, committed earlier"
                )
    return verdicts
