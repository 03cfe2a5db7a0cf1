"""Several processes (torchrun) behind one miner: rank 0 talks to the network and tells the
other ranks what to compute.

Rank 0 runs the miner. Before each computation every rank must join (a training window
under DDP, an outer step, a checkpoint restore), rank 0 broadcasts a command on a gloo
group; the parameters themselves (an aggregate, a checkpoint) follow as tensor broadcasts
on the default group (NCCL on GPU, gloo on CPU). The other ranks run :func:`follow`,
which executes the commands in the order rank 0 sent them, so every rank issues the same
collectives in the same order. A single process uses :class:`SingleProcess`, where all
of this is a no-op.

All calls here block (they are collectives): callers run them in worker threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from tplr.data.manager_catalog import RankChannel, SingleRank, TorchDistChannel
from tplr.train.parallel.distributed import DistContext
from tplr.train.parallel.sharding import is_sharded, local_rows
from tplr.train.worker import TrainWorker


@dataclass(frozen=True)
class Start:
    spec_json: str
    window: int


@dataclass(frozen=True)
class Train:
    window: int
    indices: np.ndarray  # the whole assignment; each rank trains on indices[rank::world]


@dataclass(frozen=True)
class Apply:
    lr: float  # the aggregate follows as tensors


@dataclass(frozen=True)
class Restore:
    pass  # the parameters follow as tensors


@dataclass(frozen=True)
class LoadState:
    folder: str  # a saved miner state (tplr.node.miner_state) every rank loads its rows of
    window: int
    world_size: int


@dataclass(frozen=True)
class Gather:
    pass  # every rank takes part in gathering the whole parameters to rank 0 (FSDP2)


@dataclass(frozen=True)
class Stop:
    pass


Command = Start | Train | Apply | Restore | LoadState | Gather | Stop


def gather_full_parameters(worker: TrainWorker, ranks: Ranks) -> dict[str, torch.Tensor]:
    """The whole parameters on rank 0, for a digest or a published checkpoint. Blocking.

    One process or DDP: the model's own parameters (no copy, no collective). FSDP2: the
    followers are told to join, and every shard is gathered (CPU copies on rank 0)."""
    if getattr(worker, "parallel", None) != "fsdp":
        return dict(worker.model.named_parameters())
    if ranks.has_followers:
        ranks.send(Gather())
    return worker.full_parameters(keep=ranks.context.is_main)


class Ranks(Protocol):
    context: DistContext

    @property
    def has_followers(self) -> bool:
        """True on rank 0 of a multi-process job: other ranks must be told what to compute."""
        ...

    def channel(self) -> RankChannel: ...

    def send(self, command: Command) -> None: ...

    def receive(self) -> Command: ...

    def broadcast_tensors(
        self, tensors: Mapping[str, torch.Tensor] | None, like: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]: ...


class SingleProcess:
    """One process: nobody to tell."""

    def __init__(self, context: DistContext) -> None:
        self.context = context

    @property
    def has_followers(self) -> bool:
        return False

    def channel(self) -> RankChannel:
        return SingleRank()

    def send(self, command: Command) -> None:
        return None

    def receive(self) -> Command:
        raise RuntimeError("a single process has no rank 0 to receive from")

    def broadcast_tensors(self, tensors, like) -> dict[str, torch.Tensor]:
        return dict(tensors or {})


class TorchRanks:
    """Rank 0 and its followers in one torch.distributed job (see the module doc)."""

    def __init__(self, context: DistContext) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.context = context
        self._control = dist.new_group(backend="gloo")  # collective: every rank calls it

    @property
    def has_followers(self) -> bool:
        return self.context.is_main

    def channel(self) -> RankChannel:
        return TorchDistChannel(self._control)

    def send(self, command: Command) -> None:
        self._dist.broadcast_object_list([command], src=0, group=self._control)

    def receive(self) -> Command:
        box: list[Any] = [None]
        self._dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def broadcast_tensors(
        self, tensors: Mapping[str, torch.Tensor] | None, like: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Rank 0's ``tensors`` on every rank, shaped like ``like`` (names in sorted order).

        Where ``like`` holds FSDP2-sharded parameters, each rank keeps only its own rows of
        every broadcast tensor (one whole tensor in flight at a time), which the worker's
        ``restore``/``apply_update`` take as they are."""
        device = self.context.device
        out: dict[str, torch.Tensor] = {}
        for name in sorted(like):
            reference = like[name]
            if self.context.is_main:
                assert tensors is not None
                tensor = tensors[name].to(device=device, dtype=reference.dtype).contiguous()
            else:
                tensor = torch.empty(reference.shape, dtype=reference.dtype, device=device)
            self._dist.broadcast(tensor, src=0)
            out[name] = local_rows(tensor, reference).clone() if is_sharded(reference) else tensor
        return out


def ranks_for(context: DistContext) -> Ranks:
    return TorchRanks(context) if context.distributed else SingleProcess(context)
