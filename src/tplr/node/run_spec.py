"""The run's hyperparameters (``run.json``): written once by the lead validator, read by all.

Every node of a run takes its window length, batch geometry, compression settings, seed
and so on from ``run.json`` so they all agree. A node started with a local setting that
disagrees with the run refuses to start (:class:`RunSpecConflict` names the field, the
run's value and the local value).

Creation is write-if-absent and atomic: ``ObjectStore.put_if_absent`` (S3 ``PutObject``
with ``If-None-Match: *``, supported by AWS S3 and Cloudflare R2; a hard link on a local
directory). When two creators race, exactly one wins and the other adopts its spec.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from tplr.comms.errors import AlreadyExists
from tplr.comms.store import ObjectStore
from tplr.errors import ConfigError, TplrError
from tplr.node.clock import Clock, WindowClock
from tplr.node.scoring import ScoringConfig
from tplr.train.compression import VALUE_DTYPES, CompressionSettings

log = logging.getLogger(__name__)

RUN_SPEC_KEY = "run.json"
RUN_SPEC_FORMAT = "tplr-run"


class RunSpecError(TplrError):
    """``run.json`` is missing, invalid, or disagrees with local settings."""


class RunSpecInvalid(RunSpecError):
    hint = "fix or delete run.json in the lead validator's bucket (only before the run starts)"


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

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["tplr-run"] = RUN_SPEC_FORMAT
    version: Literal[1] = 1
    run_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    genesis_s: float = Field(ge=0, description="unix time at which window 0 starts")
    window_seconds: float = Field(gt=0, le=86_400)
    upload_deadline_fraction: float = Field(default=0.75, gt=0, le=1)
    inner_steps: int = Field(ge=1, le=100_000)
    inner_lr: float = Field(gt=0, le=10)
    outer_lr: float = Field(gt=0, le=10)
    micro_batch_size: int = Field(ge=1, le=65_536)
    batch_size: int = Field(ge=1, le=1 << 24, description="sequences per inner step")
    sequence_length: int = Field(ge=2, le=1 << 20)
    model: str = Field(min_length=1, description="model config name, e.g. 'small'")
    vocab_size: int = Field(default=50_257, ge=2, le=1 << 24)
    compression_chunk_size: int = Field(default=4096, ge=1, le=1 << 31)
    compression_topk: int = Field(default=32, ge=1)
    compression_value_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    error_feedback_beta: float = Field(default=0.95, ge=0, le=1)
    windows_per_shard: int = Field(ge=1)
    seed: int = Field(ge=0, lt=1 << 63)
    checkpoint_every_windows: int = Field(default=10, ge=1)
    peers_top_n: int = Field(default=32, ge=1)
    peers_min_score: float = Field(default=0.0, ge=0)
    score_ema_alpha: float = Field(default=0.2, gt=0, le=1)
    score_missing_decay: float = Field(default=0.9, ge=0, le=1)

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
        return self

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = RUN_SPEC_KEY) -> RunSpec:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or '(document)'}: {error['msg']}"
                for error in exc.errors()[:5]
            )
            raise RunSpecInvalid(f"{source} is not a valid run spec: {problems}") from exc

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    def compression_settings(self) -> CompressionSettings:
        return CompressionSettings(
            chunk_size=self.compression_chunk_size,
            topk=self.compression_topk,
            error_feedback_beta=self.error_feedback_beta,
            value_dtype=VALUE_DTYPES[self.compression_value_dtype],
        )

    def scoring_config(self) -> ScoringConfig:
        return ScoringConfig(
            ema_alpha=self.score_ema_alpha,
            missing_decay=self.score_missing_decay,
            top_n=self.peers_top_n,
            min_score=self.peers_min_score,
        )

    def window_clock(self, clock: Clock | None = None) -> WindowClock:
        return WindowClock(
            genesis_s=self.genesis_s,
            window_seconds=self.window_seconds,
            upload_deadline_fraction=self.upload_deadline_fraction,
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


@dataclass(frozen=True, slots=True)
class PublishedRunSpec:
    spec: RunSpec  # the spec in effect (ours, or the one already there)
    created: bool  # True if this call wrote run.json
    location: str


async def read_run_spec(store: ObjectStore, key: str = RUN_SPEC_KEY) -> RunSpec:
    """Read and validate run.json; ``NotFound`` if it is not there yet."""
    data = await store.get(key)
    return RunSpec.from_json(data, source=store.url(key))


async def publish_run_spec(
    store: ObjectStore,
    spec: RunSpec,
    *,
    key: str = RUN_SPEC_KEY,
) -> PublishedRunSpec:
    """Create run.json unless it exists; never overwrite. Returns the spec in effect."""
    location = store.url(key)
    try:
        await store.put_if_absent(key, spec.to_json())
    except AlreadyExists:
        existing = await read_run_spec(store, key)
        log.info("run.json already exists at %s; using run %s", location, existing.run_id)
        return PublishedRunSpec(existing, created=False, location=location)
    log.info("created run.json at %s for run %s", location, spec.run_id)
    return PublishedRunSpec(spec, created=True, location=location)
