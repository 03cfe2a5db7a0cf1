"""Which samples a miner trains on: a pure function of ``(run_seed, uid, window, shard)``.

A validator calls the same function and gets the same indices. The generator is
numpy's PCG64 seeded from a blake2b hash of the tuple (never Python's salted
``hash()``, never global RNG state), and only its raw 64-bit output is used, with
integer arithmetic of our own on top: that output is stable across numpy releases,
while ``Generator`` methods may change their streams.

Indices are distinct, in draw order; rank ``r`` of ``world_size`` takes
``indices[r::world_size]``. :func:`sample_ids_digest` hashes the sample ids a miner
used into the receipt it publishes.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from tplr.errors import TplrError

SAMPLER_VERSION = 1
_SEED_PERSON = b"tplr-sampler"
_DIGEST_PERSON = b"tplr-samples"


class SamplerError(TplrError):
    """The sampler was asked for something impossible (more samples than exist, …)."""


def window_seed(run_seed: int, uid: int, window: int, shard_index: int) -> np.random.SeedSequence:
    """A seed derived from the tuple with blake2b (stable across processes and machines)."""
    for name, value in (("uid", uid), ("window", window), ("shard_index", shard_index)):
        if value < 0:
            raise SamplerError(f"{name} must be >= 0, got {value}")
    packed = struct.pack("<IQQQQ", SAMPLER_VERSION, run_seed % 2**64, uid, window, shard_index)
    digest = hashlib.blake2b(packed, digest_size=32, person=_SEED_PERSON).digest()
    return np.random.SeedSequence(list(struct.unpack("<8I", digest)))


def _distinct_draws(bitgen: np.random.PCG64, population: int, count: int) -> np.ndarray:
    """``count`` distinct values in ``[0, population)``, in the order first drawn."""
    if count * 4 >= population:  # dense: a full permutation by sorting random keys
        keys = bitgen.random_raw(population)
        return np.argsort(keys, kind="stable")[:count].astype(np.int64)
    chosen = np.empty(0, dtype=np.int64)
    while chosen.size < count:
        # raw % population: bias below population / 2**64, negligible for any shard
        draws = (bitgen.random_raw(2 * (count - chosen.size) + 16) % np.uint64(population)).astype(
            np.int64
        )
        merged = np.concatenate((chosen, draws))
        _, first = np.unique(merged, return_index=True)
        chosen = merged[np.sort(first)]
    return chosen[:count]


def window_sample_indices(
    *,
    run_seed: int,
    uid: int,
    window: int,
    shard_index: int,
    num_samples: int,
    count: int,
) -> np.ndarray:
    """``count`` distinct sample indices in ``[0, num_samples)`` for ``uid`` in ``window``."""
    if num_samples <= 0:
        raise SamplerError(f"the shard has no samples (num_samples={num_samples})")
    if not 0 < count <= num_samples:
        raise SamplerError(
            f"cannot draw {count} distinct samples from a shard of {num_samples}",
            hint="lower the samples per window (batch size x steps) or use larger shards",
        )
    bitgen = np.random.PCG64(window_seed(run_seed, uid, window, shard_index))
    return _distinct_draws(bitgen, num_samples, count)


def rank_share(indices: np.ndarray, *, rank: int, world_size: int) -> np.ndarray:
    """This rank's part: ``indices[rank::world_size]`` (disjoint, together complete)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise SamplerError(f"rank {rank} is not in 0..{world_size - 1}")
    return indices[rank::world_size]


def sample_ids_digest(sample_ids: np.ndarray) -> str:
    """blake2b-256 hex digest of the ids (as little-endian uint64, in order)."""
    data = np.ascontiguousarray(sample_ids, dtype="<u8").tobytes()
    return hashlib.blake2b(data, digest_size=32, person=_DIGEST_PERSON).hexdigest()


@dataclass(frozen=True, slots=True)
class WindowSampler:
    """The samples of one run: ``samples_per_window`` per (uid, window)."""

    run_seed: int
    samples_per_window: int

    def indices(self, *, uid: int, window: int, shard_index: int, num_samples: int) -> np.ndarray:
        return window_sample_indices(
            run_seed=self.run_seed,
            uid=uid,
            window=window,
            shard_index=shard_index,
            num_samples=num_samples,
            count=self.samples_per_window,
        )

    def rank_indices(
        self,
        *,
        uid: int,
        window: int,
        shard_index: int,
        num_samples: int,
        rank: int,
        world_size: int,
    ) -> np.ndarray:
        everything = self.indices(
            uid=uid, window=window, shard_index=shard_index, num_samples=num_samples
        )
        return rank_share(everything, rank=rank, world_size=world_size)
