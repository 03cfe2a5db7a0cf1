"""Node settings: one pydantic-settings model per component, nested into :class:`NodeSettings`.

Every setting has an environment variable and a command-line flag (see
:mod:`tplr.node.process.settings_cli`); flags win over the environment, the environment wins over
``.env``. Secrets (bucket keys) are read from the environment or ``.env`` only, never from
flags (they would show in ``ps``).

Components and their env prefixes:

- :class:`NodeConfig` (``TPLR_``, plus ``PEERS_FILE``): identity, embedded home, device.
- :class:`RunSettings` (``TPLR_RUN_``): the run's hyperparameters. The lead validator
  writes them into ``run.json``; on every other node a value set here must equal the
  run's, or the node refuses to start.
- :class:`GatherConfig` (``TPLR_GATHER_``): fetching peers' payloads.
- :class:`MinerConfig` (``TPLR_MINER_``) and :class:`ValidatorConfig` (``TPLR_VALIDATOR_``).
- Reused from lower layers: ``DatasetConfig`` (``DATASET_*``), ``DatasetBucketSettings``
  (``R2_DATASET_*``), ``GradientsBucketSettings`` (``R2_GRADIENTS_*``), ``TransferConfig``
  (``DOWNLOAD_*``, ``UPLOAD_*``, ``TRANSFER_*``) and ``HealthConfig`` (``METRICS_*``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from tplr.comms.config import DatasetBucketSettings, GradientsBucketSettings
from tplr.comms.transfer_config import TransferConfig
from tplr.data.manager_config import DatasetConfig
from tplr.errors import ConfigError
from tplr.node.process.health import HealthConfig
from tplr.protocol.run_spec import RunSpec

Role = Literal["miner", "validator"]
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class NodeConfig(BaseSettings):
    """Who this node is and where it keeps local state."""

    model_config = SettingsConfigDict(env_prefix="TPLR_", extra="ignore", frozen=True)

    uid: int = Field(ge=0, lt=1 << 31, description="this node's uid (unique in the run)")
    home: Path = Field(
        default=Path(".tplr"),
        description="local state: the embedded store (no R2 keys) and caches",
    )
    peers_file: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("PEERS_FILE", "peers_file"),
        description="YAML/JSON list of peers' gradients buckets and read keys "
        "(needed with R2/S3 gradients; the embedded store discovers peers itself)",
    )
    lead_uid: int | None = Field(
        default=None,
        ge=0,
        lt=1 << 31,
        description="uid of the lead validator (default: the lowest validator uid)",
    )
    gradients_prefix: str = Field(
        default="", description="key prefix of this node's objects in its gradients bucket"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where the model runs (auto: cuda when available)"
    )
    torch_threads: int | None = Field(
        default=None, ge=1, le=1024, description="CPU threads torch may use (default: torch's)"
    )
    run_wait_timeout_s: float | None = Field(
        default=None, gt=0, description="give up waiting for run.json after this long"
    )
    poll_interval_s: float = Field(
        default=5.0, gt=0, le=3600, description="how often to look for run.json / checkpoints"
    )
    stop_grace_s: float = Field(
        default=30.0, ge=0, le=3600, description="on SIGTERM, time to finish the current step"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="logging level (any case)"
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="log lines as text, or JSON with uid, role, run_id, window and rank",
    )
    debug_wire: bool = Field(
        default=False,
        description="also log HTTP/S3 request dumps (contain access key ids and signatures)",
    )

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        stripped = value.strip()
        return stripped.upper() if stripped.upper() in _LOG_LEVELS else stripped.lower()

    # -- training parallelism and memory (tplr.train) ------------------------------------
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        default="auto",
        description="under torchrun: ddp (a model replica per GPU) or fsdp (FSDP2 shards "
        "parameters, gradients and optimizer state); auto: fsdp when a replica does not fit",
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        default="none",
        description="recompute activations in the backward pass: full (keep block inputs "
        "only), selective (also matmul and attention outputs), none",
    )
    memory_check: bool = Field(
        default=True,
        description="refuse to start when the estimated peak memory exceeds the device",
    )


class GatherConfig(BaseSettings):
    """Fetching peers' payloads (miners and validators)."""

    model_config = SettingsConfigDict(env_prefix="TPLR_GATHER_", extra="ignore", frozen=True)

    timeout_s: float = Field(default=30.0, gt=0, le=3600, description="deadline per peer")
    max_concurrency: int = Field(default=16, ge=1, le=1024, description="peers fetched at once")
    check_upload_time: bool = Field(
        default=True,
        description="also check the store's LastModified of commitments and payloads against "
        "the window's phases (turn off only when the node's clock is not the store's, as in "
        "simulations; commitments must be observed in time either way)",
    )


class MinerConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TPLR_MINER_", extra="ignore", frozen=True)

    retention_windows: int = Field(
        default=24,
        ge=2,
        le=100_000,
        description="keep this many windows of own payloads (late joiners replay from them)",
    )
    # -- durable state and error feedback (tplr.node.miner_state) --------------------------
    state_every_windows: int = Field(
        default=1,
        ge=0,
        le=100_000,
        description="save error feedback and optimizer state every N windows for a restart "
        "to resume (0: never)",
    )
    error_feedback_offload: bool = Field(
        default=False,
        description="keep the error-feedback buffers in pinned host memory between windows "
        "(CUDA; saves 4 bytes per parameter / GPUs of GPU memory)",
    )


class ValidatorConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TPLR_VALIDATOR_", extra="ignore", frozen=True)

    lead: bool = Field(
        default=False,
        validation_alias=AliasChoices("TPLR_LEAD", "lead"),
        description="this is the lead validator: it creates run.json, publishes checkpoints",
    )
    max_miners_per_window: int = Field(
        default=64,
        ge=1,
        le=1 << 20,
        description="miners evaluated per window at most (a secret subset when more post)",
    )
    init_model: Path | None = Field(
        default=None,
        description="lead only: start a new run from this checkpoint file instead of a "
        "fresh model (e.g. the latest checkpoint of an older run)",
    )
    checkpoints_kept: int = Field(default=3, ge=1, le=1000, description="checkpoints kept")
    retention_windows: int = Field(
        default=48,
        ge=2,
        le=100_000,
        description="keep this many windows of scores, peer lists and reports",
    )


# --- run settings: every RunSpec field, optional -------------------------------------------

RUN_SETTING_FIELDS = tuple(
    name for name in RunSpec.model_fields if name not in ("format", "version")
)
_RUN_HELP = {
    "run_id": "name of the run",
    "genesis_s": "unix time at which window 0 starts (lead default: now)",
    "window_seconds": "length of a window",
    "commit_deadline_fraction": "share of the window by which miners commit (train + commit)",
    "reveal_open_fraction": "share of the window at which miners may reveal their payloads",
    "reveal_deadline_fraction": "share of the window by which payloads must be revealed",
    "approval_deadline_fraction": "share of the window by which the lead approves",
    "inner_steps": "optimizer steps per window",
    "inner_lr": "inner (AdamW) learning rate",
    "outer_lr": "step size of the aggregated outer update",
    "micro_batch_size": "sequences per forward pass",
    "batch_size": "sequences per inner step",
    "sequence_length": "stored sequence length of the dataset (lead default: the dataset's)",
    "model": "model preset: tiny, small, medium, 1b",
    "vocab_size": "vocabulary of the data (lead default: the dataset's)",
    "compression_chunk_size": "chunk size of top-k compression",
    "compression_topk": "values kept per chunk",
    "compression_value_dtype": "dtype of the sent values",
    "error_feedback_beta": "decay of the error-feedback buffer",
    "windows_per_shard": "windows trained on one dataset shard",
    "seed": "seed of the sample assignment and the model init",
    "checkpoint_every_windows": "the lead publishes a checkpoint this often",
    "peers_top_n": "admitted miners in each published peer list, at most",
    "score_ema_alpha": "weight of the newest window in the moving-average score",
    "score_missing_decay": "score factor for a window without a payload",
    "gate_alpha": "significance level of the trained-on-assigned-data gate",
    "gate_samples": "assigned and never-assigned rows compared by the gate",
    "heldout_samples": "held-out rows of the reward's gradient",
    "reward_cap": "largest window score, relative to the window's median reward",
    "admission_passes": "gate passes needed in the admission window to be admitted",
    "admission_windows": "evaluations the admission rule looks back over",
    "bootstrap_windows": "first windows approved on held-out improvement alone",
    "duplicate_cosine": "cosine from which two updates count as the same",
}
LEAD_DEFAULTS: dict[str, Any] = {
    "window_seconds": 120.0,
    "inner_steps": 20,
    "inner_lr": 6e-4,
    "outer_lr": 0.7,
    "micro_batch_size": 8,
    "batch_size": 64,
    "sequence_length": 1024,
    "model": "small",
    "windows_per_shard": 50,
    "seed": 1337,
}
"""What the lead proposes for a setting it was not given (RunSpec defaults cover the rest)."""


class _RunSettingsBase(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TPLR_RUN_", extra="ignore", frozen=True)

    def given(self) -> dict[str, Any]:
        """The settings that were set (by env, .env or flag)."""
        return {name: value for name, value in self.model_dump().items() if value is not None}

    def proposed_spec(self, *, dataset_defaults: dict[str, Any], now_s: float) -> RunSpec:
        """The spec a lead creates: given values, else the dataset's, else defaults."""
        values: dict[str, Any] = {**LEAD_DEFAULTS, **dataset_defaults, **self.given()}
        values.setdefault("genesis_s", float(int(now_s)))
        values.setdefault("run_id", f"run-{int(values['genesis_s'])}")
        try:
            return RunSpec.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(_describe_run_error(error) for error in exc.errors()[:4])
            raise ConfigError(
                f"the run this lead would create is invalid: {problems}",
                hint="fix the TPLR_RUN_* settings (or --run-* flags) named above",
            ) from None


def _describe_run_error(error: Any) -> str:
    if not error["loc"]:
        return error["msg"].removeprefix("Value error, ")
    name = str(error["loc"][0])
    return f"TPLR_RUN_{name.upper()} (--run-{name.replace('_', '-')}): {error['msg']}"


def _optional_run_field(name: str) -> tuple[Any, Any]:
    """The RunSpec field as an optional setting with the same type and bounds."""
    spec_field = RunSpec.model_fields[name]
    constrained = spec_field.annotation
    if spec_field.metadata:
        constrained = Annotated[constrained, *spec_field.metadata]
    return (Optional[constrained], Field(default=None, description=_RUN_HELP.get(name, name)))  # noqa: UP045


RunSettings = create_model(
    "RunSettings",
    __base__=_RunSettingsBase,
    __doc__="The run's hyperparameters (``TPLR_RUN_*``); unset ones come from run.json.",
    **{name: _optional_run_field(name) for name in RUN_SETTING_FIELDS},
)


# --- the node's settings ---------------------------------------------------------------------


class NodeSettings(BaseModel):
    """Every component's settings for one node process (each component gets only its own)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    role: Role
    node: NodeConfig
    run: _RunSettingsBase
    gather: GatherConfig
    dataset: DatasetConfig
    dataset_bucket: DatasetBucketSettings
    gradients_bucket: GradientsBucketSettings
    transfer: TransferConfig
    health: HealthConfig
    miner: MinerConfig | None = None
    validator: ValidatorConfig | None = None
    notices: tuple[str, ...] = ()  # warnings about the environment, logged at start

    @property
    def is_lead(self) -> bool:
        return self.validator is not None and self.validator.lead


COMPONENTS: dict[str, type[BaseSettings]] = {
    "node": NodeConfig,
    "run": RunSettings,
    "gather": GatherConfig,
    "miner": MinerConfig,
    "validator": ValidatorConfig,
    "dataset": DatasetConfig,
    "dataset_bucket": DatasetBucketSettings,
    "gradients_bucket": GradientsBucketSettings,
    "transfer": TransferConfig,
    "health": HealthConfig,
}
"""Component name -> settings class, in the order ``--help`` shows them."""


def components_for(role: Role) -> dict[str, type[BaseSettings]]:
    skip = "validator" if role == "miner" else "miner"
    return {name: cls for name, cls in COMPONENTS.items() if name != skip}


def build_settings(role: Role, **components: BaseSettings) -> NodeSettings:
    """Assemble settings; components not given are read from the environment alone."""
    values: dict[str, Any] = {}
    for name, cls in components_for(role).items():
        values[name] = components.get(name) or cls()
    return NodeSettings(role=role, **values)
