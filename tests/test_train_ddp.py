"""Distributed and device behaviour, run for real in subprocesses (torchrun + gloo on loopback)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tplr.train.config import ModelConfig, TrainConfig
from tplr.train.errors import DistributedError
from tplr.train.model.gpt import GPT
from tplr.train.parallel.distributed import LaunchEnv
from tplr.train.parallel.sharding import build_model
from tplr.train.synthetic import progression_batches
from tplr.train.worker import TrainWorker

STEPS, MICRO, MICRO_PER_STEP, VOCAB, SEQ = 3, 4, 4, 64, 32

# One rank's view: the global micro-batches of step s are all[s*4 : s*4+4]; rank r takes
# those at positions r, r + world, ... so any world size trains on the same global batches.
DDP_SCRIPT = textwrap.dedent(
    f"""
    import itertools, json, os, sys
    import torch
    from tplr.train.config import ModelConfig, TrainConfig
    from tplr.train.parallel.distributed import LaunchEnv, distributed_context
    from tplr.train.synthetic import progression_batches
    from tplr.train.worker import TrainWorker

    torch.set_num_threads(1)
    out = sys.argv[1]
    env = LaunchEnv.from_environ(os.environ)
    model_config = ModelConfig.preset("tiny", vocab_size={VOCAB}, max_seq_len={SEQ})
    config = TrainConfig(
        optimizer=sys.argv[2], lr=3e-3, micro_batch_size={MICRO},
        global_batch_size={MICRO * MICRO_PER_STEP}, seq_len={SEQ}, device="cpu",
    )
    everything = list(itertools.islice(
        progression_batches({VOCAB}, {MICRO}, {SEQ}, seed=5), {STEPS * MICRO_PER_STEP}))
    with distributed_context(env, device="cpu", timeout_s=120) as ctx:
        worker = TrainWorker(model_config, config, context=ctx)
        mine = [everything[s * {MICRO_PER_STEP} + i]
                for s in range({STEPS})
                for i in range(ctx.rank, {MICRO_PER_STEP}, ctx.world_size)]
        stats = worker.train_steps(iter(mine), {STEPS})
        worker.save_checkpoint(os.path.join(out, "ddp.pt"))
        if ctx.is_main:
            with open(os.path.join(out, "stats.json"), "w") as f:
                json.dump({{"loss": stats.loss, "accum": worker.accumulation_steps,
                           "world": ctx.world_size, "global_tokens": stats.global_tokens}}, f)
    """
)


def single_process_reference(optimizer: str) -> TrainWorker:
    torch.set_num_threads(1)
    model_config = ModelConfig.preset("tiny", vocab_size=VOCAB, max_seq_len=SEQ)
    config = TrainConfig(
        optimizer=optimizer,
        lr=3e-3,
        micro_batch_size=MICRO,
        global_batch_size=MICRO * MICRO_PER_STEP,
        seq_len=SEQ,
        device="cpu",
    )
    worker = TrainWorker(model_config, config)
    batches = itertools.islice(progression_batches(VOCAB, MICRO, SEQ, seed=5), 99)
    worker.train_steps(batches, STEPS)
    return worker


def run_torchrun(tmp_path: Path, script: str, *args: str, nproc: int = 2) -> None:
    path = tmp_path / "script.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on a free loopback port
        f"--nproc_per_node={nproc}",
        str(path),
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize("optimizer", ["muon"])
def test_two_process_ddp_equals_one_process_with_twice_the_accumulation(tmp_path, optimizer):
    run_torchrun(tmp_path, DDP_SCRIPT, str(tmp_path), optimizer)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["world"] == 2 and stats["accum"] == MICRO_PER_STEP // 2
    reference = single_process_reference(optimizer)
    assert reference.accumulation_steps == MICRO_PER_STEP
    assert stats["global_tokens"] == STEPS * MICRO_PER_STEP * MICRO * SEQ

    # The DDP run's checkpoint (unwrapped names, written by rank 0) loads into one process.
    resumed = single_process_reference(optimizer)
    resumed.load_checkpoint(tmp_path / "ddp.pt")
    assert resumed.step == STEPS
    worst = 0.0
    for (name, ddp_param), ref_param in zip(
        resumed.model.named_parameters(), reference.model.parameters(), strict=True
    ):
        torch.testing.assert_close(ddp_param, ref_param, rtol=1e-4, atol=2e-5, msg=name)
        worst = max(worst, (ddp_param - ref_param).abs().max().item())
    moved = max(
        (p - q).abs().max().item()
        for p, q in zip(reference.model.parameters(), untrained().parameters(), strict=True)
    )
    assert moved > 100 * worst  # training moved the weights far more than the DDP/1-GPU gap


def untrained() -> GPT:
    """The workers' initial model (same seed), to measure how far training moved it."""
    config = ModelConfig.preset("tiny", vocab_size=VOCAB, max_seq_len=SEQ)
    return build_model(config, torch.device("cpu"), seed=TrainConfig().seed)


NO_CUDA_SCRIPT = textwrap.dedent(
    f"""
    import sys, torch
    calls = []
    def tripwire(*args, **kwargs):
        calls.append("cuda lazy init")
        raise AssertionError("CUDA was initialised on a CPU host")
    torch.cuda._lazy_init = tripwire
    torch.cuda.init = tripwire

    from tplr.train.config import ModelConfig, TrainConfig
    from tplr.train.synthetic import progression_batches
    from tplr.train.worker import TrainWorker

    model_config = ModelConfig.preset("tiny", vocab_size={VOCAB}, max_seq_len={SEQ})
    config = TrainConfig(micro_batch_size=2, global_batch_size=4, seq_len={SEQ},
                         optimizer="muon", prefetch_batches=2)  # device "auto"
    worker = TrainWorker(model_config, config)
    batches = progression_batches({VOCAB}, 2, {SEQ}, dtype=torch.uint16)
    worker.train_steps(batches, 2)
    worker.evaluate([next(batches)])
    worker.restore(worker.snapshot())
    worker.save_checkpoint(sys.argv[1])
    worker.load_checkpoint(sys.argv[1])
    assert worker.device.type == "cpu" and worker.compile_enabled is False
    assert worker.autocast_dtype is None
    assert not torch.cuda.is_initialized() and not calls, calls
    print("ok")
    """
)


def test_no_cuda_call_on_a_cpu_host(tmp_path):
    script = tmp_path / "no_cuda.py"
    script.write_text(NO_CUDA_SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "c.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_launch_env_from_torchrun_variables():
    assert LaunchEnv.from_environ({}) == LaunchEnv(0, 1, 0)
    env = LaunchEnv.from_environ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"})
    assert env == LaunchEnv(3, 8, 3)
    with pytest.raises(DistributedError, match="inconsistent launch: RANK=8, WORLD_SIZE=8"):
        LaunchEnv.from_environ({"RANK": "8", "WORLD_SIZE": "8"})
    with pytest.raises(DistributedError, match="must be integers") as info:
        LaunchEnv.from_environ({"RANK": "x", "WORLD_SIZE": "2"})
    assert "torchrun" in info.value.hint


def test_cuda_requested_without_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    with pytest.raises(DistributedError, match="no CUDA GPU is visible"):
        TrainWorker(ModelConfig.preset("tiny", vocab_size=VOCAB), TrainConfig(device="cuda"))
