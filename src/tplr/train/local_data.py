"""Local token shards for the standalone trainer, read with ``tplr.data``.

The folder holds llm.c ``.bin`` or templar ``.npy`` + ``sample_ids`` shards and optionally
the ``manifest.json`` written by ``tplr shards prepare``. Shards named ``val`` (or else the
last one) are held out for validation. Every optimizer step draws ``global_batch_size``
distinct samples from one training shard (shard ``step mod N``) with the node's sampler,
seeded by ``(seed, step)``; rank ``r`` of ``W`` trains on ``samples[r::W]``. The global
batch of a step is therefore the same for any world size, and a resumed run sees the same
data as one that never stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tplr.comms.manifest import MANIFEST_NAME, Manifest, read_manifest
from tplr.data.dataset import SharedShardedDataset
from tplr.data.dataset_manifest import dataset_info, entry_metadata
from tplr.data.formats import open_shard
from tplr.data.layout import ShardGroup, plan_layout
from tplr.data.loader import BatchLoader, LoaderConfig
from tplr.data.sampler import rank_share, window_sample_indices
from tplr.train.model.vocab import DataVocab, vocab_from_manifest

# Loader threads keep this many batches in flight; BatchFeed holds up to its depth + 2.
_LOADER_PREFETCH = 2


@dataclass(frozen=True)
class LocalDataset:
    root: Path
    train: tuple[SharedShardedDataset, ...]
    val: tuple[SharedShardedDataset, ...]

    @property
    def context_len(self) -> int:
        """``T`` of every sample (the trainer's ``seq_len``)."""
        return self.train[0].context_len


def read_local_manifest(root: Path) -> Manifest | None:
    path = root / MANIFEST_NAME
    return read_manifest(path) if path.is_file() else None


def data_vocab(manifest: Manifest | None) -> DataVocab:
    return vocab_from_manifest(manifest) if manifest is not None else DataVocab()


@dataclass(frozen=True)
class RecordedLength:
    """The sequence length a dataset records, and whether its shards store rows of it."""

    seq_len: int
    fixed_rows: bool  # templar shards: rows of exactly seq_len tokens
    source: str


def recorded_seq_len(root: Path, manifest: Manifest | None) -> RecordedLength | None:
    """From the first training shard (templar rows, read from its sample ids), else from the
    manifest's ``dataset.seq_len`` (a token stream's context). None when neither says."""
    keys = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
    layout = plan_layout(keys, manifest=manifest)
    if layout.train and layout.train[0].ids_key:
        group = layout.train[0]
        shard = open_shard(root / group.tokens_key, ids_path=root / group.ids_key)
        if shard.seq_len is not None:
            return RecordedLength(shard.seq_len, True, f"{group.tokens_key} and its sample ids")
    info = dataset_info(manifest) if manifest is not None else None
    if info is not None:
        return RecordedLength(info.seq_len, False, f"seq_len in {root / MANIFEST_NAME}")
    return None


def _open_group(
    root: Path, group: ShardGroup, *, seq_len: int, vocab_size: int, manifest: Manifest | None
) -> SharedShardedDataset:
    recorded = entry_metadata(manifest, group.tokens_key).get("max_token_id") if manifest else None
    return SharedShardedDataset.open(
        root / group.tokens_key,
        seq_len=seq_len,
        shard_index=group.index,
        ids_path=root / group.ids_key if group.ids_key else None,
        vocab_size=vocab_size,
        recorded_max_token_id=recorded if isinstance(recorded, int) else None,
    )


def open_local_dataset(
    root: Path,
    *,
    seq_len: int,
    vocab_size: int,
    manifest: Manifest | None,
    val_shards: int | None = None,
) -> LocalDataset:
    """Map every shard under ``root`` (no tokens read beyond a sampled vocab check)."""
    keys = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
    layout = plan_layout(keys, val_shards=val_shards, manifest=manifest)

    def open_all(groups: tuple[ShardGroup, ...]) -> tuple[SharedShardedDataset, ...]:
        return tuple(
            _open_group(root, g, seq_len=seq_len, vocab_size=vocab_size, manifest=manifest)
            for g in groups
        )

    return LocalDataset(root, open_all(layout.train), open_all(layout.val))


@dataclass(frozen=True)
class BatchPlan:
    """How one rank cuts the data: its place in the world and the batch geometry."""

    seed: int
    global_batch_size: int
    micro_batch_size: int
    rank: int
    world_size: int
    device: torch.device
    hold_batches: int  # batches the consumer holds at once (BatchFeed depth + 2)


def train_batches(data: LocalDataset, plan: BatchPlan, first_step: int, steps: int) -> Iterator:
    """This rank's micro-batches for optimizer steps ``first_step .. first_step + steps - 1``."""
    on_cuda = plan.device.type == "cuda"
    config = LoaderConfig(
        batch_size=plan.micro_batch_size,
        prefetch_batches=_LOADER_PREFETCH,
        output="host" if on_cuda else "int64",
        hold_batches=plan.hold_batches,
    )
    for step in range(first_step, first_step + steps):
        dataset = data.train[step % len(data.train)]
        everyone = window_sample_indices(
            run_seed=plan.seed,
            uid=0,
            window=step,
            shard_index=dataset.shard_index,
            num_samples=len(dataset),
            count=plan.global_batch_size,
        )
        mine = rank_share(everyone, rank=plan.rank, world_size=plan.world_size)
        with BatchLoader(dataset, mine, config=config, device=plan.device) as loader:
            yield from loader


def validation_batches(data: LocalDataset, plan: BatchPlan, batches_per_rank: int) -> Iterator:
    """A fixed set of validation micro-batches (the same at every evaluation)."""
    dataset = data.val[0]
    count = min(len(dataset), batches_per_rank * plan.micro_batch_size * plan.world_size)
    everyone = window_sample_indices(
        run_seed=plan.seed,
        uid=0,
        window=0,
        shard_index=dataset.shard_index,
        num_samples=len(dataset),
        count=count,
    )
    mine = rank_share(everyone, rank=plan.rank, world_size=plan.world_size)
    config = LoaderConfig(batch_size=plan.micro_batch_size, output="int64")
    with BatchLoader(dataset, mine, config=config, device=plan.device) as loader:
        yield from loader
