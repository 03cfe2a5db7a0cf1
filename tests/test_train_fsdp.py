"""FSDP2 for real: torchrun jobs of 4 and 2 gloo processes on CPU against one process.

One job per world size for the whole module (``fsdp_ranks.py``): AdamW and Muon training,
two miner windows (inner steps, pseudo-gradient, error feedback and top-k split across the
ranks, restore, outer step) under FSDP2 (and DDP at 2 ranks), a checkpoint written by the
4-rank job and loaded by the 2-rank job and by one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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
from tplr.train.parallel.distributed import DistContext

HERE = Path(__file__).parent
SINGLE = DistContext(0, 1, 0, torch.device("cpu"))
TOLERANCE = {"rtol": 1e-4, "atol": 2e-5}


def torchrun(nproc: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", str(HERE / "fsdp_ranks.py"), *args,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict[str, torch.Tensor]]:
    four, two = tmp_path_factory.mktemp("fsdp4"), tmp_path_factory.mktemp("fsdp2")
    torchrun(4, str(four))
    torchrun(2, str(two), str(four / "fsdp.pt"))
    loaded = {n: torch.load(d / "results.pt", weights_only=True) for n, d in ((4, four), (2, two))}
    loaded[4]["checkpoint"] = four / "fsdp.pt"  # type: ignore[assignment]
    for world, folder in ((4, four), (2, two)):
        loaded[world]["state"] = MinerState(folder / "cache", run_spec()).root  # type: ignore
    return loaded


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    out: dict[str, torch.Tensor] = {}
    for optimizer in ("adamw", "muon"):
        trained = train(make_worker(SINGLE, optimizer))
        out.update({f"train-{optimizer}/{k}": v for k, v in trained.items()})
    worker, compressor = make_worker(SINGLE, "adamw"), new_compressor(SINGLE)
    out.update({f"miner/{k}": v for k, v in miner_windows(worker, compressor).items()})
    out["miner-worker"], out["miner-compressor"] = worker, compressor  # type: ignore[assignment]
    return out


def params(results: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fsdp_training_matches_one_process(runs, reference, world, optimizer):
    ours = params(runs[world], f"train-{optimizer}/param/")
    theirs = params(reference, f"train-{optimizer}/param/")
    assert sorted(ours) == sorted(theirs) and len(ours) == 14
    worst = 0.0
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, **TOLERANCE, msg=name)
        worst = max(worst, (ours[name] - tensor).abs().max().item())
    start = make_worker(SINGLE, optimizer).full_parameters()
    moved = max((theirs[n] - start[n]).abs().max().item() for n in theirs)
    assert moved > 100 * worst  # training moved the weights far more than the FSDP gap
    loss = runs[world][f"train-{optimizer}/loss"]
    assert loss.item() == pytest.approx(reference[f"train-{optimizer}/loss"].item(), rel=1e-5)


def canonical(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k rows sorted by position: ``topk(sorted=False)`` may list a chunk's k entries
    in another order when the inputs differ in the last bits."""
    order = indices.to(torch.int64).argsort(dim=1)
    return indices.gather(1, order), values.gather(1, order)


@pytest.mark.parametrize("world,parallel", [(2, "fsdp"), (4, "fsdp"), (2, "ddp")])
def test_miner_window_gives_the_same_payload_and_next_model(runs, reference, world, parallel):
    ours = params(runs[world], f"miner-{parallel}/")
    theirs = params(reference, "miner/")
    payload_keys = [k for k in theirs if k.endswith("/indices")]
    assert len(payload_keys) == 2 * 14
    for key in payload_keys:
        values_key = key[: -len("indices")] + "values"
        mine = canonical(ours[key], ours[values_key])
        expected = canonical(theirs[key], theirs[values_key])
        assert torch.equal(mine[0], expected[0]), key  # the same positions in every chunk
        assert torch.equal(mine[1], expected[1]), values_key  # the same bf16 values
    for name, tensor in params(theirs, "param/").items():
        torch.testing.assert_close(ours[f"param/{name}"], tensor, **TOLERANCE, msg=name)


def test_checkpoint_of_four_fsdp_ranks_loads_on_one_and_two(runs):
    saved = params(runs[4], "train-adamw/param/")  # the 4-rank job saved right after this
    one = make_worker(SINGLE, "adamw")
    one.load_checkpoint(runs[4]["checkpoint"])
    assert one.step == 3
    for name, tensor in one.full_parameters().items():
        assert torch.equal(tensor, saved[name]), name
        assert torch.equal(runs[2][f"loaded/{name}"], saved[name]), name
    one.train_steps(iter(rank_batches(SINGLE, 1, seed=9)), 1)  # moments loaded on both
    for name, tensor in one.full_parameters().items():
        torch.testing.assert_close(runs[2][f"resumed/{name}"], tensor, **TOLERANCE, msg=name)


def moments(worker) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in worker.model.named_parameters()}
    optimizer = worker.optimizers[0]
    return {
        f"{names[id(p)]}/{key}": value
        for p, entry in optimizer.state.items()
        for key, value in entry.items()
    }


def test_miner_state_of_four_ranks_loads_on_two_and_one(runs, reference):
    """Error feedback (split by chunks) and FSDP2-sharded AdamW moments saved by 4 ranks,
    loaded and saved again by 2, load on one process: the same data, re-sharded."""
    loaded = []
    for world in (4, 2):
        worker, compressor = make_worker(SINGLE, "adamw"), new_compressor(SINGLE)
        root = runs[world]["state"]
        saved = SavedState(root / f"w{WINDOWS - 1:012d}", WINDOWS - 1, world)
        assert MinerState(root.parent, run_spec()).load(saved, worker, compressor)
        loaded.append((compressor.state_dict(), moments(worker), worker.step))
    (errors4, moments4, step4), (errors2, moments2, step2) = loaded
    assert step4 == step2 == WINDOWS * 2  # inner steps of both windows
    assert errors4.keys() == errors2.keys() and len(errors4) == 14
    assert all(torch.equal(errors4[n], errors2[n]) for n in errors4)  # re-sharding moves data
    assert moments4.keys() == moments2.keys() and len(moments4) == 3 * 14
    assert all(torch.equal(moments4[k], moments2[k]) for k in moments4)
    expected_errors = reference["miner-compressor"].state_dict()
    expected_moments = moments(reference["miner-worker"])
    for name, error in expected_errors.items():
        torch.testing.assert_close(errors4[name], error, **TOLERANCE, msg=name)
    for key, value in expected_moments.items():
        torch.testing.assert_close(moments4[key], value, rtol=1e-3, atol=1e-6, msg=key)
