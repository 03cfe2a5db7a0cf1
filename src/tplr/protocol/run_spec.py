"""The run's hyperparameters (``run.json``) as a model, and the rules every node checks.

Every node of a run takes its window length and phases, batch geometry, compression,
scoring and seed from ``run.json`` so they all agree. ``version`` is the **protocol
version** (2: commit-reveal, validator-approved aggregation, gated scoring); a run.json
of another version is refused with a message that says how to upgrade. A node started
with a local setting that disagrees with the run refuses to start
(:class:`RunSpecConflict` names the field, the run's value and the local value).

Publishing and reading run.json is I/O and lives in :mod:`tplr.node.network.run_spec`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from tplr.errors import ConfigError, TplrError
from tplr.protocol import scoring
from tplr.protocol.clock import Clock, Phases, WindowClock
from tplr.protocol.scoring import ScoringConfig
from tplr.train.compression import VALUE_DTYPES, CompressionSettings
from tplr.untrusted import MalformedInput, load_json

RUN_SPEC_KEY = "run.json"
RUN_SPEC_FORMAT = "tplr-run"
PROTOCOL_VERSION = 2
MAX_RUN_SPEC_BYTES = 64 * 1024
_SCORING = ScoringConfig()  # the defaults of the scoring fields
UPGRADE_HINT = (
    "a run keeps its protocol version for life: finish it with nodes of that version, or "
    "start a new run (a fresh run.json, e.g. a new bucket or prefix) and seed it with the old "
    "run's latest checkpoint via TPLR_VALIDATOR_INIT_MODEL (see docs/protocol.md, Upgrading)"
)


class RunSpecError(TplrError):
    """``run.json`` is missing, invalid, or disagrees with local settings."""


class RunSpecInvalid(RunSpecError):
    hint = "fix or delete run.json in the lead validator's bucket (only before the run starts)"


class ProtocolMismatch(RunSpecError):
    """run.json speaks another protocol version than this node."""

    hint = UPGRADE_HINT


class RunSpecConflict(RunSpecError):
    """Local settings disagree with the run. ``conflicts`` is ``[(field, run, local), …]``."""

    hint = "remove the local override or set it to the run's value; run.json is authoritative"

    def __init__(self, conflicts: list[tuple[str, Any, Any]], *, source: str) -> None:
        described = "; ".join(
            f"{name}: run has {run!r}, local setting is {local!r}" for name, run, local in conflicts
        )
        super().__init__(f"local settings conflict with the run ({source}): {described}")
        self.conflicts = conflicts
        self.source = source


class RunSpec(BaseModel):
    """Hyperparameters every node of a run must agree on."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    format: Literal["tplr-run"] = RUN_SPEC_FORMAT
    version: Literal[2] = PROTOCOL_VERSION
    run_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    genesis_s: float = Field(ge=0, le=1e11, description="unix time at which window 0 starts")
    window_seconds: float = Field(ge=1, le=86_400)
    commit_deadline_fraction: float = Field(default=0.60, gt=0, lt=1)
    reveal_open_fraction: float = Field(default=0.65, gt=0, lt=1)
    reveal_deadline_fraction: float = Field(default=0.75, gt=0, lt=1)
    approval_deadline_fraction: float = Field(default=0.95, gt=0, le=1)
    inner_steps: int = Field(ge=1, le=100_000)
    inner_lr: float = Field(gt=0, le=10)
    outer_lr: float = Field(gt=0, le=10)
    micro_batch_size: int = Field(ge=1, le=65_536)
    batch_size: int = Field(ge=1, le=1 << 24, description="sequences per inner step")
    sequence_length: int = Field(ge=2, le=1 << 20)
    model: str = Field(min_length=1, max_length=64, description="model preset, e.g. 'small'")
    vocab_size: int = Field(default=50_257, ge=2, le=1 << 24)
    compression_chunk_size: int = Field(default=4096, ge=1, le=1 << 31)
    compression_topk: int = Field(default=32, ge=1)
    compression_value_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    error_feedback_beta: float = Field(default=0.95, ge=0, le=1)
    windows_per_shard: int = Field(ge=1, le=1 << 20)
    seed: int = Field(ge=0, lt=1 << 63)
    checkpoint_every_windows: int = Field(default=10, ge=1, le=1 << 20)
    peers_top_n: scoring.TopN = _SCORING.top_n
    score_ema_alpha: scoring.EmaAlpha = _SCORING.ema_alpha
    score_missing_decay: scoring.Decay = _SCORING.missing_decay
    gate_alpha: scoring.GateAlpha = _SCORING.gate_alpha
    gate_samples: scoring.GateSamples = _SCORING.gate_samples
    heldout_samples: scoring.HeldoutSamples = _SCORING.heldout_samples
    reward_cap: scoring.RewardCap = _SCORING.reward_cap
    admission_passes: scoring.AdmissionCount = _SCORING.admission_passes
    admission_windows: scoring.AdmissionCount = _SCORING.admission_windows
    bootstrap_windows: scoring.BootstrapWindows = _SCORING.bootstrap_windows
    duplicate_cosine: scoring.Cosine = _SCORING.duplicate_cosine

    @model_validator(mode="after")
    def _check_relations(self) -> RunSpec:
        if self.compression_topk > self.compression_chunk_size:
            raise ValueError(
                f"compression_topk ({self.compression_topk}) must not exceed "
                f"compression_chunk_size ({self.compression_chunk_size})"
            )
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of "
                f"micro_batch_size ({self.micro_batch_size})"
            )
        try:
            self.phases()
            self.scoring_config()
        except (ConfigError, ValidationError) as exc:
            raise ValueError(str(exc)) from None
        return self

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = RUN_SPEC_KEY) -> RunSpec:
        """Parse run.json; typed errors only (:class:`RunSpecInvalid`, ProtocolMismatch)."""
        try:
            document = load_json(data, what=source, max_bytes=MAX_RUN_SPEC_BYTES, max_depth=4)
        except MalformedInput as exc:
            raise RunSpecInvalid(f"{source} is not a valid run spec: {exc.message}") from None
        if not isinstance(document, dict):
            raise RunSpecInvalid(f"{source} is not a JSON object")
        version = document.get("version")
        if document.get("format") == RUN_SPEC_FORMAT and version != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"{source} is a protocol v{str(version)[:8]} run; this node speaks protocol "
                f"v{PROTOCOL_VERSION}"
            )
        try:
            return cls.model_validate(document)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or '(document)'}: {error['msg']}"
                for error in exc.errors()[:5]
            )
            raise RunSpecInvalid(f"{source} is not a valid run spec: {problems}") from None

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    def phases(self) -> Phases:
        return Phases(
            commit=self.commit_deadline_fraction,
            reveal_open=self.reveal_open_fraction,
            reveal=self.reveal_deadline_fraction,
            approval=self.approval_deadline_fraction,
        )

    def compression_settings(self) -> CompressionSettings:
        return CompressionSettings(
            chunk_size=self.compression_chunk_size,
            topk=self.compression_topk,
            error_feedback_beta=self.error_feedback_beta,
            value_dtype=VALUE_DTYPES[self.compression_value_dtype],
        )

    def scoring_config(self) -> ScoringConfig:
        return ScoringConfig(
            gate_alpha=self.gate_alpha,
            gate_samples=self.gate_samples,
            heldout_samples=self.heldout_samples,
            reward_cap=self.reward_cap,
            admission_passes=self.admission_passes,
            admission_windows=self.admission_windows,
            bootstrap_windows=self.bootstrap_windows,
            ema_alpha=self.score_ema_alpha,
            missing_decay=self.score_missing_decay,
            top_n=self.peers_top_n,
            duplicate_cosine=self.duplicate_cosine,
        )

    def window_clock(self, clock: Clock | None = None) -> WindowClock:
        return WindowClock(
            genesis_s=self.genesis_s,
            window_seconds=self.window_seconds,
            phases=self.phases(),
            clock=clock,
        )


def check_local_overrides(
    spec: RunSpec, overrides: Mapping[str, Any], *, source: str = RUN_SPEC_KEY
) -> None:
    """Raise :class:`RunSpecConflict` if any local setting (``None`` = unset) differs.

    Local values are coerced with the field's type first, so ``"30"`` from an env var
    equals ``30`` in run.json.
    """
    conflicts: list[tuple[str, Any, Any]] = []
    for name, local in overrides.items():
        if local is None:
            continue
        field = RunSpec.model_fields.get(name)
        if field is None:
            raise ConfigError(
                f"unknown run setting {name!r}",
                hint="run settings are: " + ", ".join(sorted(RunSpec.model_fields)),
            )
        try:
            coerced = TypeAdapter(field.annotation).validate_python(local)
        except ValidationError:
            coerced = local
        run_value = getattr(spec, name)
        if coerced != run_value:
            conflicts.append((name, run_value, local))
    if conflicts:
        raise RunSpecConflict(conflicts, source=source)
