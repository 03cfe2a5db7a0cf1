"""Building the model, whole or sharded with FSDP2, and moving tensors between full and
sharded form.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is applied to every transformer block, then
to the root (embedding, final norm, head). Each parameter becomes a ``DTensor`` sharded on
dim 0 across the ranks with ``torch.chunk`` semantics: rank ``r`` of ``W`` holds rows
``[r·⌈R/W⌉, min((r+1)·⌈R/W⌉, R))`` (:func:`shard_rows`; trailing ranks may hold none). With
bf16 compute the policy gathers parameters in bf16 and reduce-scatters gradients in fp32;
the sharded parameters and the optimizer state stay fp32.

Every model starts from the same weights, whatever the device or the parallelism: it is
built on the meta device, sharded if asked, materialised on its device, and each parameter
is drawn whole on the CPU from a generator seeded with the run's seed (one tensor at a time,
so an 8B model never exists whole on one rank) and the rank's rows are copied in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from tplr.train.config import ModelConfig
from tplr.train.model.gpt import GPT, Checkpointing, init_parameter_


def shard_rows(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of dim 0 owned by ``rank`` (``torch.chunk`` semantics, as FSDP2)."""
    per_rank = -(-rows // world_size) if rows else 0
    start = min(rank * per_rank, rows)
    return start, min(start + per_rank, rows)


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own piece: the local shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_rows(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rows of a full tensor that this rank holds of ``like`` (all of them if whole)."""
    if not isinstance(like, DTensor):
        return full
    mesh = like.device_mesh
    start, stop = shard_rows(full.shape[0], mesh.get_local_rank(), mesh.size())
    piece = full[start:stop]
    if piece.shape != like.to_local().shape:  # FSDP2 changed its layout: fail loudly
        raise RuntimeError(
            f"shard of {tuple(full.shape)} is {tuple(like.to_local().shape)} on rank "
            f"{mesh.get_local_rank()}, expected rows [{start}, {stop})"
        )
    return piece


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank must call, in the same order)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def as_sharded_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Wrap a local piece as a DTensor placed like ``like`` (returns ``local`` if whole)."""
    if not isinstance(like, DTensor):
        return local
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
        stride=like.stride(),
    )  # fmt: skip


def build_model(
    config: ModelConfig,
    device: torch.device,
    *,
    seed: int,
    checkpointing: Checkpointing = "none",
    shard: Callable[[GPT], None] | None = None,
) -> GPT:
    """The model on ``device`` (sharded by ``shard`` if given), initialised from ``seed``."""
    with torch.device("meta"):
        model = GPT(config)
    model.set_checkpointing(checkpointing)
    if shard is not None:
        shard(model)
    model.to_empty(device=device)
    model.init_buffers()
    init_from_seed(model, seed)
    return model


@torch.no_grad()
def init_from_seed(model: GPT, seed: int) -> None:
    """Draw every parameter whole on the CPU (in name order) and keep this rank's rows."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        whole = torch.empty(param.shape, dtype=torch.float32)
        init_parameter_(name, whole, model.config, generator)
        target = local_part(param)
        target.copy_(local_rows(whole, param).to(target.dtype), non_blocking=True)
    if device_is_cuda(model):
        torch.cuda.synchronize()  # the CPU sources are freed on return


def device_is_cuda(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cuda"


def fsdp_sharder(
    mesh, *, compute_dtype: torch.dtype | None, compile_block: Callable[[nn.Module], None] | None
) -> Callable[[GPT], None]:
    """``fully_shard`` each block (compiled first, if asked), then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)

    def shard(model: GPT) -> None:
        for block in model.blocks:
            if compile_block is not None:
                compile_block(block)
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)

    return shard
