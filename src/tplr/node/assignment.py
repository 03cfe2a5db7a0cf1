"""The samples a miner trains on in a window, as miners and validators both compute them.

``samples_per_window = batch_size x inner_steps`` distinct rows of the window's shard,
drawn by :class:`~tplr.data.sampler.WindowSampler` from ``(seed, uid, window, shard)``;
the miner trains on them in draw order and reports :func:`assignment_digest` of their
sample ids (the payload's ``sample_digest``), which the validator recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tplr.data.dataset import SharedShardedDataset
from tplr.data.sampler import WindowSampler
from tplr.node.payload import sample_digest
from tplr.node.run_spec import RunSpec


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
