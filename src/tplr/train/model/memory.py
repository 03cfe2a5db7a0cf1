"""Peak memory per device, by arithmetic, before a byte is allocated.

``estimate(setup)`` adds up what one rank holds at the peak of a training step (the
backward pass of a micro-step after the first, when gradients already exist):

- parameters (fp32 master weights), their gradients (fp32) and the optimizer state
  (AdamW: two fp32 moments; Muon: one fp32 momentum for the hidden matrices, AdamW for the
  rest), all divided by the world size under FSDP2;
- the miner's error-feedback buffers (fp32, always split across the ranks by chunks;
  nothing on the device when offloaded to host memory between windows);
- under FSDP2, the gathered compute-dtype copies: the root (embedding, head) for the whole
  step plus two blocks (the current one and the prefetched one) with their gradients;
- under bf16 autocast without FSDP2, the bf16 copies of the weights that autocast keeps for
  the backward pass;
- activations: the tensors each block saves for its backward pass, counted per token from
  the model's shape (see :func:`block_activation_bytes`), for ``none``, ``selective`` (the
  block input plus the matmul and attention outputs) or ``full`` (the block input only)
  activation checkpointing, plus one block recomputed in the backward pass;
- the loss: full logits and their fp32 copies, or one chunk of them (``tplr.train.model.loss``);
- on CUDA, the context, cuBLAS/cuDNN workspaces and allocator slack (a flat 1.5 GiB).

Tests compare the sum with measured CPU peaks (RSS); GPU figures are arithmetic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Literal

from tplr.train.config import ModelConfig, TrainConfig
from tplr.train.model.loss import auto_chunk_tokens

GIB = 1 << 30
CUDA_OVERHEAD_BYTES = 3 * GIB // 2
Parallel = Literal["single", "ddp", "fsdp"]


@dataclass(frozen=True)
class MemorySetup:
    """What decides the peak: model, batch geometry, optimizer, parallelism, precision."""

    model: ModelConfig
    micro_batch_size: int
    seq_len: int
    optimizer: Literal["adamw", "muon"] = "adamw"
    parallel: Parallel = "single"
    world_size: int = 1
    checkpointing: Literal["none", "full", "selective"] = "none"
    bf16: bool = True  # bf16 autocast (the CUDA default); False: fp32 everywhere
    cuda: bool = True
    loss_chunk_tokens: int | None = None  # the TrainConfig setting (None = auto)
    error_feedback: bool = False  # a miner's compressor buffers
    error_feedback_offload: bool = False

    @classmethod
    def for_training(
        cls,
        model: ModelConfig,
        config: TrainConfig,
        *,
        parallel: Parallel,
        world_size: int,
        cuda: bool,
        error_feedback: bool = False,
        error_feedback_offload: bool = False,
    ) -> MemorySetup:
        bf16 = config.dtype == "bfloat16" or (config.dtype == "auto" and cuda)
        return cls(
            model=model,
            micro_batch_size=config.micro_batch_size,
            seq_len=config.seq_len,
            optimizer=config.optimizer,
            parallel=parallel,
            world_size=world_size,
            checkpointing=config.activation_checkpointing,
            bf16=bf16,
            cuda=cuda,
            loss_chunk_tokens=config.loss_chunk_tokens,
            error_feedback=error_feedback,
            error_feedback_offload=error_feedback_offload,
        )

    def describe(self) -> str:
        parts = [
            f"micro-batch {self.micro_batch_size} x seq {self.seq_len}",
            self.optimizer,
            f"{self.parallel}" + (f" x{self.world_size}" if self.world_size > 1 else ""),
            f"activation checkpointing {self.checkpointing}",
            "bf16" if self.bf16 else "fp32",
        ]
        if self.error_feedback:
            parts.append(
                "error feedback " + ("offloaded" if self.error_feedback_offload else "on device")
            )
        return ", ".join(parts)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device at the peak of a step, by component; ``host_bytes`` beside it."""

    parameters: int
    gradients: int
    optimizer_state: int
    error_feedback: int
    gathered: int  # FSDP2 unsharded copies, or autocast's weight copies
    activations: int
    loss: int
    overhead: int
    host_bytes: int  # pinned snapshot (+ offloaded error feedback), per rank

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name not in ("host_bytes",))

    def table(self) -> list[tuple[str, int]]:
        rows = [(f.name.replace("_", " "), getattr(self, f.name)) for f in fields(self)]
        return [*rows[:-1], ("peak per device", self.total), rows[-1]]


# -- counting --------------------------------------------------------------------------
def parameter_counts(model: ModelConfig) -> dict[str, int]:
    """Parameters by role: ``blocks`` (per block), ``hidden_matrices`` (all blocks' 2-D
    weights: Muon's share), ``root`` (embedding, head, final norm) and ``total``."""
    d, hidden = model.d_model, model.hidden_size
    qkv = d * (model.n_head + 2 * model.kv_heads) * model.head_dim
    fc = d * hidden * (2 if model.activation == "swiglu" else 1)
    matrices = qkv + d * d + fc + hidden * d
    block = matrices + 2 * d  # two RMSNorm gains
    embed = model.padded_vocab_size * d
    root = embed * (1 if model.tie_embeddings else 2) + d
    return {
        "block": block,
        "hidden_matrices": model.n_layer * matrices,
        "root": root,
        "total": model.n_layer * block + root,
    }


def block_activation_bytes(model: ModelConfig, mode: str, bf16: bool) -> float:
    """Bytes one block saves for its backward pass, per token.

    Counted from the saved tensors of this model's forward (checked against
    ``torch.autograd.graph.saved_tensors_hooks`` in the tests): each RMSNorm keeps its input,
    its normalised input (fp32) and its output (the next matmul's input, as a bf16 copy under
    autocast); attention keeps q/k/v, the rotated q and k, the output, its log-sum-exp and
    the projection's input; the MLP keeps two tensors of width F (ReLU², GELU) or four
    (SwiGLU: the fused gate/up output counts twice)."""
    d, heads, head_dim = model.d_model, model.n_head, model.head_dim
    kv = model.kv_heads * head_dim
    hidden = model.hidden_size
    c = 2 if bf16 else 4  # bytes of a compute-dtype element
    if mode == "full":
        return 4 * d  # the block's input (fp32 residual stream)
    matmul_outputs = (heads * head_dim + 2 * kv) + d + d  # qkv, attention out, proj out
    matmul_outputs += (2 * hidden if model.activation == "swiglu" else hidden) + d  # fc, proj
    if mode == "selective":
        return 4 * d + c * matmul_outputs + 4 * heads
    norms = 2 * (8 * d + c * d + 4)  # fp32 input, normalised input, 1/rms; output (compute)
    attention = c * ((heads * head_dim + 2 * kv) + heads * head_dim + kv + d + d) + 4 * heads
    if model.qk_norm:
        attention += 8 * heads  # the q and k norms' inverse RMS
        if bf16:
            attention += 4 * (heads * head_dim + kv)  # autocast runs them on fp32 copies
    mlp_width = 4 if model.activation == "swiglu" else 2
    return norms + attention + c * mlp_width * hidden


def loss_bytes(model: ModelConfig, tokens: int, chunk_setting: int | None, bf16: bool) -> int:
    """Peak of the loss: all logits with their fp32 copy and gradient, or one chunk."""
    vocab = model.padded_vocab_size
    chunk = auto_chunk_tokens(tokens, vocab, chunk_setting)
    c = 2 if bf16 else 4
    if chunk is None:
        per_logit = (c + 4 + 4) if bf16 else (4 + 4 + 4)  # logits, fp32 log-softmax, its grad
        return tokens * vocab * per_logit
    per_logit = (c + 4 + c) if bf16 else (4 + 4)  # chunk logits, fp32 softmax, grad cast
    return chunk * vocab * per_logit + tokens * model.d_model * 4  # + the hidden gradient


def estimate(setup: MemorySetup) -> MemoryEstimate:
    model = setup.model
    counts = parameter_counts(model)
    total = counts["total"]
    shards = setup.world_size if setup.parallel == "fsdp" else 1
    muon = counts["hidden_matrices"] if setup.optimizer == "muon" else 0
    optimizer_per_param = (4 * muon + 8 * (total - muon)) / total
    tokens = setup.micro_batch_size * setup.seq_len
    c = 2 if setup.bf16 else 4
    if setup.parallel == "fsdp":
        # root gathered for the whole step; two blocks gathered, with gradients in compute
        # dtype and fp32 for the reduce-scatter
        gathered = counts["root"] * (c + c + 4) + 2 * counts["block"] * (c + c + 4)
    else:
        gathered = 2 * total if setup.bf16 else 0  # autocast's saved bf16 weight copies
    per_block = block_activation_bytes(model, setup.checkpointing, setup.bf16)
    recompute = (
        0.0 if setup.checkpointing == "none" else block_activation_bytes(model, "none", setup.bf16)
    )
    final_norm = 12 * model.d_model
    activations = tokens * (model.n_layer * per_block + recompute + final_norm)
    error_feedback = 4 * total // setup.world_size if setup.error_feedback else 0
    on_device_ef = 0 if setup.error_feedback_offload else error_feedback
    return MemoryEstimate(
        parameters=4 * total // shards,
        gradients=4 * total // shards,
        optimizer_state=int(optimizer_per_param * total) // shards,
        error_feedback=on_device_ef,
        gathered=int(gathered),
        activations=int(activations),
        loss=loss_bytes(model, tokens, setup.loss_chunk_tokens, setup.bf16),
        overhead=CUDA_OVERHEAD_BYTES if setup.cuda else 0,
        host_bytes=4 * total // shards + (error_feedback - on_device_ef),
    )


# -- fitting -----------------------------------------------------------------------------
def alternatives(setup: MemorySetup, *, micro_batches: bool = True) -> list[MemorySetup]:
    """Settings to try, cheapest change first: checkpointing, FSDP2, offload, and (with
    ``micro_batches``) smaller micro-batches (more accumulation, the same global batch)."""
    modes = ("none", "selective", "full")
    parallels = ["fsdp"] if setup.world_size > 1 and setup.parallel != "fsdp" else []
    candidates = [
        replace(setup, checkpointing=m) for m in modes[modes.index(setup.checkpointing) + 1 :]
    ]
    for parallel in parallels:
        candidates += [replace(setup, parallel=parallel, checkpointing=m) for m in modes]
    if setup.error_feedback and not setup.error_feedback_offload:
        candidates.append(replace(setup, error_feedback_offload=True, checkpointing="full"))
    micro = setup.micro_batch_size // 2 if micro_batches else 0
    while micro >= 1:
        candidates.append(replace(setup, micro_batch_size=micro, checkpointing="full"))
        micro //= 2
    return candidates


def fitting_alternatives(
    setup: MemorySetup, capacity: int, limit: int = 3, *, micro_batches: bool = True
) -> list[MemorySetup]:
    candidates = alternatives(setup, micro_batches=micro_batches)
    return [c for c in candidates if estimate(c).total <= capacity][:limit]


def device_capacity_bytes(device) -> int:
    """Memory of ``device``: the GPU's total, or the host's available memory."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return host_available_bytes()


def host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def choose_parallel(model: ModelConfig, config: TrainConfig, context) -> Parallel:
    """``single`` for one process; else the configured strategy, where ``auto`` is DDP when
    a full replica fits the device and FSDP2 when it does not."""
    if not context.distributed:
        return "single"
    if config.parallel != "auto":
        return config.parallel
    cuda = context.device.type == "cuda"
    replica = MemorySetup.for_training(
        model, config, parallel="ddp", world_size=context.world_size, cuda=cuda
    )
    if cuda and estimate(replica).total > device_capacity_bytes(context.device):
        return "fsdp"
    return "ddp"
