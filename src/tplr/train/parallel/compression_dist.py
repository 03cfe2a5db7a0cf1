"""Compression under torchrun: each rank compresses its chunks, the ranks join the parts.

Rank ``r`` owns the error feedback of a contiguous range of every parameter's chunks
(:class:`~tplr.train.compression.ErrorFeedbackCompressor` with ``rank``/``world_size``), so
the error buffers are split across the ranks whatever the parallelism. Per parameter, in
name order on every rank: the whole Δ (gathered first when FSDP2 shards it), one finiteness
verdict that every rank reaches alike, this rank's top-k, then an all-gather of the parts
(indices and values as bytes) into the whole compressed tensor. The result is bit-identical
to one process compressing everything with one compressor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from tplr.train.compression import CompressedTensor, CompressionError, ErrorFeedbackCompressor
from tplr.train.parallel.sharding import full_tensor, local_part, shard_rows


@torch.no_grad()
def compress_across_ranks(
    compressor: ErrorFeedbackCompressor, deltas: Mapping[str, torch.Tensor]
) -> dict[str, CompressedTensor]:
    """The whole payload on every rank. A collective: every rank calls with the same names.

    ``deltas``: whole tensors (DDP: the same on every rank) or sharded DTensors (FSDP2)."""
    if compressor.world_size == 1:
        return compressor.compress({name: full_tensor(d) for name, d in deltas.items()})
    _check_finite_everywhere(deltas)  # before any error buffer moves, the same on every rank
    joined = {}
    for name in sorted(deltas):
        whole = full_tensor(deltas[name])  # (all-gather under FSDP2)
        part = compressor.compress_one(name, whole)
        joined[name] = _join_parts(part, compressor)
    compressor.finish(local_part(d) for d in deltas.values())
    return {name: joined[name] for name in deltas}


def _check_finite_everywhere(deltas: Mapping[str, torch.Tensor]) -> None:
    names = sorted(deltas)
    flags = torch.stack([torch.isfinite(local_part(deltas[n])).all() for n in names])
    flags = flags.to(torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # every rank's rows, one verdict everywhere
    bad = [name for name, ok in zip(names, flags.tolist(), strict=True) if not ok]
    if bad:
        raise CompressionError(
            f"pseudo-gradient of parameter {bad[0]!r} holds NaN or infinity",
            hint="the inner steps diverged; lower the learning rate or restore a checkpoint",
        )


def _join_parts(part: CompressedTensor, compressor: ErrorFeedbackCompressor) -> CompressedTensor:
    settings, world = compressor.settings, compressor.world_size
    n_chunks = settings.chunk_count(part.shape.numel())
    per_rank = -(-n_chunks // world)
    k = settings.topk
    index_bytes = k * settings.index_dtype.itemsize
    value_bytes = k * settings.value_dtype.itemsize
    row_bytes = index_bytes + value_bytes
    mine = torch.zeros(per_rank, row_bytes, dtype=torch.uint8, device=part.values.device)
    rows = part.indices.shape[0]
    mine[:rows, :index_bytes] = part.indices.contiguous().view(torch.uint8).view(rows, index_bytes)
    mine[:rows, index_bytes:] = part.values.contiguous().view(torch.uint8).view(rows, value_bytes)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    pieces = []
    for rank, block in enumerate(gathered):
        start, stop = shard_rows(n_chunks, rank, world)
        pieces.append(block[: stop - start])
    everything = torch.cat(pieces)  # (n_chunks, row_bytes)
    indices = everything[:, :index_bytes].contiguous().view(settings.index_dtype)
    values = everything[:, index_bytes:].contiguous().view(settings.value_dtype)
    return CompressedTensor(indices=indices, values=values, shape=part.shape)
