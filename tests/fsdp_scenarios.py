"""Training scenarios run alike by one process (the reference, inside pytest) and by every
rank of a torchrun job (``fsdp_ranks.py``), so their results can be compared.

The global batch of every optimizer step is the same for any world size: the step's
``MICRO_PER_STEP`` micro-batches, of which rank ``r`` of ``W`` takes ``r, r + W, ...``.
"""

from __future__ import annotations

import itertools

import torch

from tplr.protocol.run_spec import RunSpec
from tplr.train.compression import CompressionSettings, ErrorFeedbackCompressor, decompress_all
from tplr.train.config import ModelConfig, TrainConfig
from tplr.train.parallel.compression_dist import compress_across_ranks
from tplr.train.parallel.distributed import DistContext
from tplr.train.synthetic import progression_batches
from tplr.train.worker import TrainWorker

VOCAB, SEQ, MICRO, MICRO_PER_STEP = 64, 32, 2, 4
TRAIN_STEPS, INNER_STEPS, WINDOWS = 3, 2, 2
COMPRESSION = CompressionSettings(chunk_size=64, topk=8, error_feedback_beta=0.9)


def model_config() -> ModelConfig:
    # GQA and SwiGLU so the sharded path sees every parameter kind; 3 heads of q, 1 of k/v
    return ModelConfig.preset(
        "llama-1b",
        vocab_size=VOCAB,
        max_seq_len=SEQ,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=64,
        ffn_hidden=96,
    )


def make_worker(context: DistContext, optimizer: str, parallel: str = "fsdp") -> TrainWorker:
    config = TrainConfig(
        optimizer=optimizer,
        lr=3e-3,
        muon_lr=0.02,
        micro_batch_size=MICRO,
        global_batch_size=MICRO * MICRO_PER_STEP,
        seq_len=SEQ,
        device="cpu",
        warmup_steps=0,
        total_steps=100,
        parallel=parallel,
    )
    return TrainWorker(model_config(), config, context=context)


def rank_batches(context: DistContext, steps: int, seed: int) -> list:
    everything = list(
        itertools.islice(progression_batches(VOCAB, MICRO, SEQ, seed=seed), steps * MICRO_PER_STEP)
    )
    return [
        everything[step * MICRO_PER_STEP + i]
        for step in range(steps)
        for i in range(context.rank, MICRO_PER_STEP, context.world_size)
    ]


def train(worker: TrainWorker, seed: int = 5) -> dict:
    """TRAIN_STEPS optimizer steps; the whole parameters afterwards (rank 0)."""
    stats = worker.train_steps(iter(rank_batches(worker.context, TRAIN_STEPS, seed)), TRAIN_STEPS)
    params = worker.full_parameters(keep=worker.context.is_main)
    return {"loss": torch.tensor(stats.loss), **{f"param/{k}": v for k, v in params.items()}}


def run_spec() -> RunSpec:
    """The run the miner state belongs to (its compression is COMPRESSION)."""
    return RunSpec(
        run_id="fsdp-run", genesis_s=0.0, window_seconds=60.0, inner_steps=INNER_STEPS,
        inner_lr=3e-3, outer_lr=1.0, micro_batch_size=MICRO,
        batch_size=MICRO * MICRO_PER_STEP, sequence_length=SEQ, model="llama-1b",
        vocab_size=VOCAB, compression_chunk_size=COMPRESSION.chunk_size,
        compression_topk=COMPRESSION.topk, error_feedback_beta=COMPRESSION.error_feedback_beta,
        windows_per_shard=100, seed=1,
    )  # fmt: skip


def new_compressor(context: DistContext) -> ErrorFeedbackCompressor:
    return ErrorFeedbackCompressor(COMPRESSION, rank=context.rank, world_size=context.world_size)


def miner_windows(worker: TrainWorker, compressor: ErrorFeedbackCompressor | None = None) -> dict:
    """WINDOWS miner windows: inner steps from θ, Δ = θ_start − θ_end, error feedback and
    top-k across ranks, restore θ_start, outer step with the decompressed payload."""
    context = worker.context
    compressor = compressor or new_compressor(context)
    out: dict[str, torch.Tensor] = {}
    for window in range(WINDOWS):
        snapshot = worker.snapshot()
        batches = rank_batches(context, INNER_STEPS, seed=100 + window)
        worker.train_steps(iter(batches), INNER_STEPS)
        delta = worker.pseudo_gradient(snapshot)
        worker.restore(snapshot)
        payload = compress_across_ranks(compressor, delta)
        worker.apply_update(decompress_all(payload, COMPRESSION.chunk_size), lr=1.0)
        for name, part in payload.items():
            out[f"w{window}/{name}/indices"] = part.indices.clone()
            out[f"w{window}/{name}/values"] = part.values.clone()
    params = worker.full_parameters(keep=context.is_main)
    out.update({f"param/{k}": v for k, v in params.items()})
    return out
