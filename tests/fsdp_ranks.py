"""One rank of the FSDP2 tests (run by test_train_fsdp.py under torchrun, gloo on CPU).

Usage: torchrun --nproc_per_node=W fsdp_ranks.py OUT_DIR [CHECKPOINT_TO_RESUME]

Rank 0 writes ``OUT_DIR/results.pt`` (whole tensors of every scenario) and, with no
checkpoint given, ``OUT_DIR/fsdp.pt`` (a checkpoint written under FSDP2). With a checkpoint
given, the ranks also load it under FSDP2, train one more step and record the parameters.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from fsdp_scenarios import (
    WINDOWS,
    make_worker,
    miner_windows,
    new_compressor,
    rank_batches,
    run_spec,
    train,
)

from tplr.node.miner_state import MinerState, SavedState
from tplr.train.parallel.distributed import LaunchEnv, distributed_context


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    resume = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    results: dict[str, torch.Tensor] = {}
    with distributed_context(
        LaunchEnv.from_environ(os.environ), device="cpu", timeout_s=120
    ) as ctx:
        for optimizer in ("adamw", "muon"):
            worker = make_worker(ctx, optimizer)
            assert worker.parallel == "fsdp"
            results.update({f"train-{optimizer}/{k}": v for k, v in train(worker).items()})
            if optimizer == "adamw" and resume is None:
                worker.save_checkpoint(out / "fsdp.pt")
        parallels = ("fsdp", "ddp") if ctx.world_size == 2 else ("fsdp",)
        for parallel in parallels:
            worker = make_worker(ctx, "adamw", parallel=parallel)
            compressor = new_compressor(ctx)
            results.update(
                {f"miner-{parallel}/{k}": v for k, v in miner_windows(worker, compressor).items()}
            )
            if parallel == "fsdp":
                carry_miner_state(worker, compressor, out, resume)
        if resume is not None:
            worker = make_worker(ctx, "adamw")
            worker.load_checkpoint(resume)
            loaded = worker.full_parameters(keep=ctx.is_main)
            results.update({f"loaded/{k}": v for k, v in loaded.items()})
            worker.train_steps(iter(rank_batches(ctx, 1, seed=9)), 1)
            after = worker.full_parameters(keep=ctx.is_main)
            results.update({f"resumed/{k}": v for k, v in after.items()})
        if ctx.is_main:
            torch.save({**results, "world_size": torch.tensor(ctx.world_size)}, out / "results.pt")


def carry_miner_state(worker, compressor, out: Path, resume: Path | None) -> None:
    """4 ranks: save the miner state. 2 ranks: load the 4 ranks' state (re-sharded), then
    save it as 2 ranks. One process (the test) loads both."""
    state = MinerState(out / "cache", run_spec())
    if resume is not None:
        four = MinerState(resume.parent / "cache", run_spec())
        saved = SavedState(four.root / f"w{WINDOWS - 1:012d}", WINDOWS - 1, 4)
        fresh = new_compressor(worker.context)
        worker.reset_optimizer_state()
        assert state.load(saved, worker, fresh)
        compressor = fresh
    assert state.save(WINDOWS - 1, worker, compressor, base_digest="xxh3_128:test") or (
        not worker.context.is_main
    )


if __name__ == "__main__":
    main()
