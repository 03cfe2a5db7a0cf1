"""FLOPs per token, known GPUs' peak dense bf16 FLOP/s, and model FLOPs utilisation (MFU).

FLOPs per trained token (forward + backward) follow the PaLM appendix-B convention:
``6 x N_matmul + 12 x layers x d_model x seq_len``, where ``N_matmul`` counts the weights used
in matrix multiplies (blocks and the output head, the embedding lookup excluded) and the second
term is attention's score and value products, counted for the full T x T square.
"""

from __future__ import annotations

from tplr.train.config import ModelConfig

TFLOPS = 1e12

# Dense (no sparsity) bf16 tensor-core peak from the vendors' datasheets, in FLOP/s.
# Matched as substrings of torch.cuda.get_device_name(), most specific first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500 * TFLOPS),
    ("B200", 2250 * TFLOPS),
    ("H200", 989 * TFLOPS),
    ("GH200", 989 * TFLOPS),
    ("H100 PCIe", 756 * TFLOPS),
    ("H100 NVL", 835 * TFLOPS),
    ("H100", 989 * TFLOPS),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989 * TFLOPS),
    ("A100", 312 * TFLOPS),
    ("A800", 312 * TFLOPS),
    ("L40S", 362 * TFLOPS),
    ("L40", 181 * TFLOPS),
    ("L4", 121 * TFLOPS),
    ("RTX 4090", 165 * TFLOPS),
    ("A6000", 155 * TFLOPS),
    ("A10G", 70 * TFLOPS),
    ("A10", 125 * TFLOPS),
)


def matmul_parameters(config: ModelConfig) -> int:
    """Weights used in matrix multiplies per token: attention, MLP and the output head."""
    d, hidden = config.d_model, config.hidden_size
    qkv = d * (config.n_head + 2 * config.kv_heads) * config.head_dim
    fc = d * hidden * (2 if config.activation == "swiglu" else 1)
    per_layer = qkv + d * d + fc + hidden * d  # qkv + proj, fc + proj
    return config.n_layer * per_layer + config.padded_vocab_size * d


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length ``seq_len``."""
    attention = 12 * config.n_layer * config.d_model * seq_len
    return float(6 * matmul_parameters(config) + attention)


def peak_flops_for(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by name; None when the GPU is not in the table."""
    for marker, flops in PEAK_BF16_FLOPS:
        if marker.lower() in device_name.lower():
            return flops
    return None


def mfu(tokens_per_s: float, flops_per_token_: float, peak_flops: float | None) -> float | None:
    """Fraction of the device's peak reached (per device: pass one device's tokens/s)."""
    if peak_flops is None or peak_flops <= 0:
        return None
    return tokens_per_s * flops_per_token_ / peak_flops


def tokens_per_s_at(mfu_ratio: float, flops_per_token_: float, peak_flops: float) -> float:
    """Tokens per second one device reaches at a given MFU (the docs' figures)."""
    return mfu_ratio * peak_flops / flops_per_token_
