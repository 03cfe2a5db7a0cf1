"""The memory estimator: its activation count against the tensors autograd really saves,
its total against measured CPU peaks, the refusal at start, and the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tplr.errors import ConfigError
from tplr.train.config import ModelConfig, TrainConfig
from tplr.train.entry import main
from tplr.train.model.gpt import GPT
from tplr.train.model.memory import (
    GIB,
    MemorySetup,
    block_activation_bytes,
    estimate,
    fitting_alternatives,
)
from tplr.train.parallel.distributed import DistContext

HERE = Path(__file__).parent
REPO = HERE.parent
GPT_SHAPE = {"n_layer": 1, "n_head": 4, "d_model": 128}
LLAMA_SHAPE = {"n_layer": 1, "n_head": 4, "n_kv_head": 2, "d_model": 128, "ffn_hidden": 256}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def saved_bytes_per_token(config: ModelConfig, bf16: bool) -> float:
    """Bytes of the tensors one block saves for backward (deduplicated by storage), per
    token; weights and their casts are left out (counted per parameter, not per token)."""
    model = GPT(config)
    batch, seq = 3, 64  # 192 tokens: no weight has 3 or 192 rows
    x = model.embed(torch.randint(0, config.vocab_size, (batch, seq))).detach().requires_grad_()
    cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        per_token_shape = tensor.ndim >= 2 and tensor.numel() >= batch * seq
        if per_token_shape and tensor.shape[0] in (batch, batch * seq):
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model.blocks[0](x, cos, sin)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in weights) / (batch * seq)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("preset,shape", [("tiny", GPT_SHAPE), ("llama-1b", LLAMA_SHAPE)])
def test_block_activations_are_what_autograd_saves(preset, shape, bf16):
    config = ModelConfig.preset(preset, vocab_size=256, max_seq_len=64, **shape)
    measured = saved_bytes_per_token(config, bf16)
    assert block_activation_bytes(config, "none", bf16) == pytest.approx(measured, rel=0.02)


CONFIGS = {
    "gpt-adamw-none": {
        "preset": "tiny", "vocab": 8192, "seq": 128, "micro": 16, "optimizer": "adamw",
        "checkpointing": "none", "shape": {"n_layer": 4, "n_head": 4, "d_model": 256},
    },
    "llama-muon-full-chunked": {
        "preset": "llama-1b", "vocab": 16384, "seq": 128, "micro": 16, "optimizer": "muon",
        "checkpointing": "full", "loss_chunk_tokens": 512,
        "shape": {"n_layer": 4, "n_head": 4, "n_kv_head": 2, "d_model": 256, "ffn_hidden": 640},
    },
    "llama-adamw-selective": {
        "preset": "llama-1b", "vocab": 8192, "seq": 128, "micro": 16, "optimizer": "adamw",
        "checkpointing": "selective",
        "shape": {"n_layer": 6, "n_head": 4, "n_kv_head": 2, "d_model": 256, "ffn_hidden": 640},
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_estimate_within_25_percent_of_the_measured_cpu_peak(name):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, str(HERE / "memory_peak.py"), json.dumps(CONFIGS[name])],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = result["estimated_bytes"] / result["measured_bytes"]
    assert 0.75 <= ratio <= 1.25, (name, result)
    assert result["measured_bytes"] > 150e6  # large enough to mean something


def test_node_start_refuses_what_does_not_fit_and_names_what_would():
    from tplr.node.worker_setup import check_memory

    model = ModelConfig.preset("1b", vocab_size=50257)
    config = TrainConfig(micro_batch_size=16, global_batch_size=64, seq_len=2048, device="cpu")
    cuda = DistContext(0, 2, 0, torch.device("cpu"))
    with pytest.raises(ConfigError) as info:
        check_memory(model, config, cuda, error_feedback=True, capacity_bytes=40 * GIB)
    text = str(info.value)
    assert "needs about" in text and "GiB per device" in text and "has 40.0 GiB" in text
    assert "TPLR_ACTIVATION_CHECKPOINTING=" in info.value.hint
    setup = MemorySetup.for_training(model, config, parallel="ddp", world_size=2, cuda=False)
    for alternative in fitting_alternatives(setup, 40 * GIB):
        assert estimate(alternative).total <= 40 * GIB
    huge = ModelConfig.preset("llama-8b", vocab_size=128256)
    with pytest.raises(ConfigError, match="no setting of this node fits") as info:
        check_memory(huge, config.model_copy(update={"micro_batch_size": 1}), cuda,
                     error_feedback=True, capacity_bytes=8 * GIB)  # fmt: skip
    checked = check_memory(model, config, cuda, error_feedback=True, capacity_bytes=1 << 50)
    assert checked.parallel == "ddp"


def test_estimate_memory_cli(capsys):
    args = ["--estimate-memory", "--model", "llama-8b", "--micro-batch-size", "1"]
    args += ["--global-batch-size", "8", "--seq-len", "8192"]
    assert main([*args, "--world-size", "8", "--parallel", "fsdp",
                 "--activation-checkpointing", "full"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "8.03B parameters" in out and "fsdp x8" in out and "fits in 80 GiB" in out
    assert main(args) == 1  # one H100 cannot hold 8B with AdamW
    out = capsys.readouterr().out
    assert "does NOT fit in 80 GiB" in out


def test_docs_memory_table_matches_the_estimator():
    """Every preset has a row in docs/training.md, with the estimator's current figures."""
    docs = (REPO / "docs" / "training.md").read_text()
    rows = re.findall(
        r"^\| `([\w-]+)` \| (\d+) \| ([\w ]+) \| (\d+) \| ([\w]+) \| ([\d.]+) GiB \|", docs, re.M
    )
    presets = {row[0] for row in rows}
    assert presets >= {"tiny", "small", "medium", "1b", "llama-1b", "llama-3b", "llama-8b"}
    for preset, micro, parallel, gpus, checkpointing, quoted in rows:
        model = ModelConfig.preset(preset, vocab_size=ModelConfig.default_vocab_size(preset))
        config = TrainConfig(
            micro_batch_size=int(micro), global_batch_size=int(micro) * int(gpus),
            seq_len=model.max_seq_len, activation_checkpointing=checkpointing,
        )  # fmt: skip
        setup = MemorySetup.for_training(
            model, config, parallel=parallel.split()[0], world_size=int(gpus), cuda=True,
            error_feedback=True,
        )  # fmt: skip
        assert estimate(setup).total / GIB == pytest.approx(float(quoted), abs=0.051), preset
