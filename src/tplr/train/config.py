"""Model and training settings: pydantic models validated when built.

``ModelConfig.preset("small", vocab_size=50257)`` gives GPT-2 small (124M). ``TrainConfig`` holds
everything the worker needs besides the model shape. Build either with :func:`build_config` to get
a :class:`~tplr.train.errors.TrainConfigError` that names the field, its flag and the allowed
range instead of a raw pydantic error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tplr.train.errors import TrainConfigError

VOCAB_PAD_MULTIPLE = 128

_LLAMA: dict[str, Any] = {
    "activation": "swiglu",
    "qk_norm": False,
    "rope_base": 500000.0,
    "norm_eps": 1e-5,
    "max_seq_len": 8192,
}
_PRESETS: dict[str, dict[str, Any]] = {
    # GPT presets. Sizes quoted with the GPT-2 vocabulary (50257, padded to 50304).
    "tiny": {"n_layer": 2, "n_head": 2, "d_model": 64, "max_seq_len": 256},
    "small": {"n_layer": 12, "n_head": 12, "d_model": 768, "max_seq_len": 1024},  # 124M
    "medium": {"n_layer": 24, "n_head": 16, "d_model": 1024, "max_seq_len": 1024},  # 350M
    "1b": {"n_layer": 18, "n_head": 16, "d_model": 2048, "max_seq_len": 2048},  # 1.1B untied
    # Llama-3 shapes (RoPE, RMSNorm, SwiGLU, grouped-query attention), sizes with the
    # Llama-3 vocabulary (128256): 1.24B, 3.21B, 8.03B.
    "llama-1b": {**_LLAMA, "n_layer": 16, "n_head": 32, "n_kv_head": 8, "d_model": 2048,
                 "ffn_hidden": 8192},
    "llama-3b": {**_LLAMA, "n_layer": 28, "n_head": 24, "n_kv_head": 8, "d_model": 3072,
                 "ffn_hidden": 8192},
    "llama-8b": {**_LLAMA, "n_layer": 32, "n_head": 32, "n_kv_head": 8, "d_model": 4096,
                 "ffn_hidden": 14336, "tie_embeddings": False},
}  # fmt: skip
_PRESET_ALIASES = {"gpt2": "small", "124m": "small", "350m": "medium", "gpt2-medium": "medium"}
_PRESET_UNTIED = {"1b"}
GPT2_VOCAB_SIZE = 50257
LLAMA3_VOCAB_SIZE = 128256


class _TypedErrors(BaseModel):
    """Direct construction raises TrainConfigError (naming field, flag, range), too."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _config_error(type(self), exc) from None


class ModelConfig(_TypedErrors):
    """Shape of the GPT. ``vocab_size`` is the data's vocabulary, padded internally to 128."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(ge=2, le=1 << 24)
    n_layer: int = Field(default=12, ge=1, le=256)
    n_head: int = Field(default=12, ge=1, le=256)
    n_kv_head: int | None = Field(default=None, ge=1, le=256)  # None: n_head (no GQA)
    d_model: int = Field(default=768, ge=8, le=65536)
    mlp_ratio: int = Field(default=4, ge=1, le=16)
    ffn_hidden: int | None = Field(default=None, ge=1, le=1 << 20)  # None: mlp_ratio x d
    max_seq_len: int = Field(default=1024, ge=2, le=1 << 20)
    activation: Literal["relu2", "gelu", "swiglu"] = "relu2"
    tie_embeddings: bool = True
    qk_norm: bool = True
    rope_base: float = Field(default=10000.0, gt=1.0)
    norm_eps: float = Field(default=1e-6, gt=0.0, lt=1e-2)

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim d_model/n_head = {self.head_dim} must be even (rotary)")
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: fewer than ``n_head`` is grouped-query attention."""
        return self.n_kv_head or self.n_head

    @property
    def hidden_size(self) -> int:
        """Width of the MLP's hidden layer (per branch for SwiGLU)."""
        return self.ffn_hidden or self.mlp_ratio * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to a multiple of 128 (tensor-core friendly head matmul)."""
        return -(-self.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @classmethod
    def preset_names(cls) -> list[str]:
        return sorted(_PRESETS) + sorted(_PRESET_ALIASES)

    @classmethod
    def preset(cls, name: str, *, vocab_size: int, **overrides: Any) -> ModelConfig:
        """A named shape (tiny, small/gpt2/124m, medium/350m, 1b, llama-1b/3b/8b) with
        optional overrides."""
        key = _preset_key(name)
        values: dict[str, Any] = {"tie_embeddings": key not in _PRESET_UNTIED, **_PRESETS[key]}
        values.update(overrides, vocab_size=vocab_size)
        return build_config(cls, values)

    @classmethod
    def default_vocab_size(cls, name: str) -> int:
        """The vocabulary a preset is usually trained with (GPT-2's, or Llama-3's)."""
        return LLAMA3_VOCAB_SIZE if _preset_key(name).startswith("llama") else GPT2_VOCAB_SIZE


def _preset_key(name: str) -> str:
    key = _PRESET_ALIASES.get(name.lower(), name.lower())
    if key not in _PRESETS:
        raise TrainConfigError(
            f"unknown model preset {name!r}",
            hint="use one of: " + ", ".join(ModelConfig.preset_names()),
        )
    return key


class TrainConfig(_TypedErrors):
    """How to train: optimizer, schedule, batch geometry, device fast path, logging."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = Field(default=6e-4, gt=0.0, le=10.0)
    muon_lr: float = Field(default=0.02, gt=0.0, le=10.0)
    muon_momentum: float = Field(default=0.95, ge=0.0, lt=1.0)
    muon_ns_steps: int = Field(default=5, ge=1, le=20)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.95, ge=0.0, lt=1.0)
    eps: float = Field(default=1e-8, gt=0.0, le=1e-2)
    weight_decay: float = Field(default=0.1, ge=0.0, le=1.0)
    grad_clip_norm: float | None = Field(default=1.0, gt=0.0)
    warmup_steps: int = Field(default=0, ge=0)
    total_steps: int = Field(default=10_000, ge=1)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    micro_batch_size: int = Field(default=16, ge=1, le=65536)
    global_batch_size: int = Field(default=512, ge=1, le=1 << 24)
    seq_len: int = Field(default=1024, ge=2, le=1 << 20)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool | None = None
    compile_backend: str = "inductor"
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # auto: DDP when a full replica fits the device, else FSDP2 (see tplr.train.model.memory)
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # None: chunk the loss when one micro-batch's logits would be large; 0: never
    loss_chunk_tokens: int | None = Field(default=None, ge=0, le=1 << 24)
    log_every_steps: int = Field(default=0, ge=0)
    prefetch_batches: int | None = Field(default=None, ge=0, le=64)  # None: 2 on CUDA, 0 on CPU
    validate_batches: bool = True
    peak_tflops: float | None = Field(default=None, gt=0.0)
    seed: int = Field(default=1337, ge=0, lt=1 << 63)
    dist_timeout_s: float = Field(default=1800.0, gt=0.0)

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainConfig:
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must not exceed total_steps "
                f"({self.total_steps})"
            )
        return self

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step so that micro x world x accum == global batch."""
        per_step = self.micro_batch_size * world_size
        if world_size < 1 or self.global_batch_size % per_step:
            raise TrainConfigError(
                f"global_batch_size ({self.global_batch_size}) is not divisible by "
                f"micro_batch_size ({self.micro_batch_size}) x world size ({world_size}) "
                f"= {per_step}",
                hint="make --global-batch-size a multiple of --micro-batch-size x "
                f"--nproc_per_node, e.g. {-(-self.global_batch_size // per_step) * per_step}",
            )
        return self.global_batch_size // per_step


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def flag_for(field: str) -> str:
    """The flag that sets ``field``: ``micro_batch_size`` -> ``--micro-batch-size``."""
    return "--" + field.replace("_", "-")


def build_config(cls: type[ConfigT], values: Mapping[str, Any]) -> ConfigT:
    """Validate ``values`` into ``cls``; raise TrainConfigError naming field, flag and range."""
    try:
        return cls.model_validate(dict(values))
    except ValidationError as exc:
        raise _config_error(cls, exc) from None


def _config_error(cls: type[BaseModel], exc: ValidationError) -> TrainConfigError:
    problems = []
    for error in exc.errors()[:4]:
        field = ".".join(str(part) for part in error["loc"]) or "(settings)"
        shown = f"{field}={error['input']!r}" if error["loc"] else field
        flag = f" (flag {flag_for(field)})" if error["loc"] else ""
        problems.append(f"{shown}{flag}: {error['msg']}")
    return TrainConfigError(
        f"invalid {cls.__name__}: " + "; ".join(problems),
        hint="fix the value(s) named above; the message gives the allowed range",
    )
