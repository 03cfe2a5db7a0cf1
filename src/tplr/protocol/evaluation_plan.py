"""What a validator evaluates in a window, drawn from a secret nobody knows beforehand.

The window's evaluation seed (:func:`window_seed`) mixes the validator's private secret
with the digest of every commitment accepted for the window, so it exists only after the
commit deadline: no miner can know in advance which rows score it, or whether it is
evaluated at all. When more miners posted valid payloads than the validator can evaluate
in its phase, :func:`choose_evaluated` draws a secret subset, weighted towards miners with
little evidence so far (weight ``1 / (1 + evaluations in the admission window)``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence

import numpy as np

_PERSON = b"tplr-eval-seed"


def window_seed(secret: bytes, run_id: str, window: int, commitments_digest: bytes) -> int:
    hasher = hashlib.blake2b(digest_size=16, key=secret[:64], person=_PERSON)
    hasher.update(run_id.encode())
    hasher.update(struct.pack("<Q", window))
    hasher.update(commitments_digest)
    return int.from_bytes(hasher.digest(), "little")


def window_rng(seed: int, purpose: str, *extra: int) -> np.random.Generator:
    """An independent stream per purpose (gate rows of uid, held-out rows, subset)."""
    tag = int.from_bytes(hashlib.blake2b(purpose.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed & ((1 << 64) - 1), seed >> 64, tag, *extra])


def choose_evaluated(
    uids: Sequence[int],
    evidence_counts: Mapping[int, int],
    capacity: int,
    rng: np.random.Generator,
) -> list[int]:
    """All of ``uids`` if they fit in ``capacity``, else a weighted secret subset."""
    ordered = sorted(set(uids))
    if len(ordered) <= capacity:
        return ordered
    weights = np.array([1.0 / (1 + evidence_counts.get(uid, 0)) for uid in ordered])
    chosen = rng.choice(len(ordered), size=capacity, replace=False, p=weights / weights.sum())
    return sorted(ordered[i] for i in chosen)
