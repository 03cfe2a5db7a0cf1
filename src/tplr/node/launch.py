"""Process entry of the nodes: one process, or a miner under torchrun (rank 0 + followers)."""

from __future__ import annotations

from collections.abc import Mapping

from tplr.errors import TplrError
from tplr.node.process.lifecycle import exit_code_for, report_error, run_node
from tplr.node.process.settings import NodeSettings


def run_miner_process(settings: NodeSettings, environ: Mapping[str, str]) -> int:
    """Join torchrun's process group when launched by it; rank 0 mines, the others follow."""
    from tplr.node.follower import FOLLOWER_GRACE_S, follow
    from tplr.node.miner import run_miner
    from tplr.node.ranks import ranks_for
    from tplr.node.runtime import resolve_node_device
    from tplr.train.parallel.distributed import LaunchEnv, distributed_context

    try:
        launch = LaunchEnv.from_environ(environ)
        if launch.rank == 0:
            resolve_node_device(settings.node.device, launch.local_rank)  # warns on a fallback
        with distributed_context(launch, device=settings.node.device) as context:
            ranks = ranks_for(context)
            if context.is_main:
                return run_node(
                    lambda shutdown: run_miner(settings, shutdown, ranks),
                    grace_s=settings.node.stop_grace_s,
                )
            return run_node(
                lambda shutdown: follow(settings, shutdown, ranks), grace_s=FOLLOWER_GRACE_S
            )
    except TplrError as exc:  # e.g. TPLR_DEVICE=cuda without a visible GPU: exit 1
        report_error(exc)
        return exit_code_for(exc)
