"""Device choice and torch.distributed setup from the launcher's environment.

Single-process runs need no torchrun: with no ``WORLD_SIZE`` in the environment the
context is rank 0 of 1 and no process group is created. Under torchrun the group uses
NCCL on GPU and gloo on CPU. Only the entry point reads the environment
(:meth:`LaunchEnv.from_environ`); everything below receives values.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tplr.train.errors import DistributedError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun told this process: its rank, the world size, its local rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> LaunchEnv:
        if "WORLD_SIZE" not in environ:
            return cls()
        try:
            env = cls(
                rank=int(environ.get("RANK", "0")),
                world_size=int(environ["WORLD_SIZE"]),
                local_rank=int(environ.get("LOCAL_RANK", "0")),
            )
        except ValueError as exc:
            raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from None
        if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
            raise DistributedError(
                f"inconsistent launch: RANK={env.rank}, WORLD_SIZE={env.world_size}, "
                f"LOCAL_RANK={env.local_rank}"
            )
        return env


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error, not a fallback."""
    if preference == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()  # asks the driver; does not initialise CUDA
    if preference == "cuda" and not available:
        raise DistributedError(
            "device 'cuda' was requested but no CUDA GPU is visible",
            hint="check nvidia-smi and CUDA_VISIBLE_DEVICES, or use --device cpu",
        )
    return torch.device("cuda", local_rank) if available else torch.device("cpu")


@contextmanager
def distributed_context(
    env: LaunchEnv, *, device: str = "auto", timeout_s: float = 1800.0
) -> Iterator[DistContext]:
    """Set the device and, for world_size > 1, create (and finally destroy) the process group."""
    target = resolve_device(device, env.local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    context = DistContext(env.rank, env.world_size, env.local_rank, target)
    if not context.distributed:
        yield context
        return
    backend = "nccl" if target.type == "cuda" else "gloo"
    try:
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=target if target.type == "cuda" else None,
        )
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"could not join the {backend} process group: {exc}") from exc
    log.info("rank %d/%d joined the %s group on %s", env.rank, env.world_size, backend, target)
    try:
        yield context
    finally:
        dist.destroy_process_group()
