"""The samples a miner trains on in a window, as miners and validators both compute them.

``samples_per_window = batch_size x inner_steps`` distinct rows of the window's shard,
drawn by :class:`~tplr.data.sampler.WindowSampler` from ``(seed, uid, window, shard)``;
the miner trains on them in draw order and reports :func:`assignment_digest` of their
sample ids (the payload's ``sample_digest``), which the validator recomputes.

For the gate (:mod:`tplr.protocol.scoring`) the validator also needs the rows that were
*not* trained on recently: :func:`recently_assigned` marks every row assigned to a known
miner in the earlier windows on the same shard (up to :data:`GATE_HISTORY_WINDOWS`), and
:func:`gate_rows` draws the secret assigned and never-assigned rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from tplr.data.dataset import SharedShardedDataset
from tplr.data.sampler import WindowSampler
from tplr.protocol.payload import sample_digest
from tplr.protocol.run_spec import RunSpec

GATE_HISTORY_WINDOWS = 8
"""How many earlier windows on the same shard count as "recently trained" for the gate."""


def samples_per_window(spec: RunSpec) -> int:
    return spec.batch_size * spec.inner_steps


@dataclass(frozen=True, slots=True)
class Assignment:
    uid: int
    window: int
    indices: np.ndarray  # rows of the shard, in training order
    digest: str  # of their sample ids

    @property
    def count(self) -> int:
        return len(self.indices)


def assigned_indices(spec: RunSpec, dataset: SharedShardedDataset, uid: int, window: int):
    sampler = WindowSampler(run_seed=spec.seed, samples_per_window=samples_per_window(spec))
    return sampler.indices(
        uid=uid, window=window, shard_index=dataset.shard_index, num_samples=len(dataset)
    )


def assignment_digest(dataset: SharedShardedDataset, indices: np.ndarray) -> str:
    return sample_digest(dataset.sample_ids(indices))


def assignment_for(
    spec: RunSpec, dataset: SharedShardedDataset, uid: int, window: int
) -> Assignment:
    indices = assigned_indices(spec, dataset, uid, window)
    return Assignment(uid, window, indices, assignment_digest(dataset, indices))


def windows_on_same_shard(spec: RunSpec, window: int) -> range:
    """The earlier windows that trained on this window's shard in this pass."""
    first = window - window % spec.windows_per_shard
    return range(max(first, window - GATE_HISTORY_WINDOWS), window)


def recently_assigned(
    spec: RunSpec, dataset: SharedShardedDataset, uids: Iterable[int], window: int
) -> np.ndarray:
    """A boolean mask over the shard's rows: assigned to any of ``uids`` in the earlier
    windows on this shard (blocking CPU work)."""
    mask = np.zeros(len(dataset), dtype=bool)
    for earlier in windows_on_same_shard(spec, window):
        for uid in uids:
            mask[assigned_indices(spec, dataset, uid, earlier)] = True
    return mask


def gate_rows(
    rng: np.random.Generator,
    own: np.ndarray,
    *,
    taken: np.ndarray,
    recent: np.ndarray,
    count: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(assigned, never_assigned)``: up to ``count`` rows of ``own`` that nobody trained
    on earlier on this shard, and as many rows that nobody was assigned now (``taken``) or
    earlier (``recent``). Either may come back short on a small, crowded shard."""
    fresh = own[~recent[own]]
    assigned = rng.choice(fresh, size=min(count, fresh.size), replace=False)
    free = np.flatnonzero(~(taken | recent))
    unassigned = rng.choice(free, size=min(assigned.size, free.size), replace=False)
    return assigned, unassigned
