"""Settings of the SharedShardedDatasetManager (env ``DATASET_*``, flags override)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tplr.units import parse_size

GiB = 1024**3


class DatasetConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DATASET_", extra="ignore", frozen=True)

    bins_path: str = Field(
        default="remote/tokenized/",
        description="key prefix of the shards in the dataset bucket (and default local folder)",
    )
    local_dir: Path | None = Field(
        default=None, description="where shards live on disk (default: DATASET_BINS_PATH)"
    )
    keep_shards: bool = Field(
        default=False, description="keep retired shards on disk (self-hosters with large disks)"
    )
    prefetch_shards: int = Field(
        default=1, ge=0, le=8, description="shards downloaded ahead of the active one"
    )
    val_shards: int | None = Field(
        default=None,
        ge=0,
        description="last K shards held out for validation (default: the manifest's, else 1)",
    )
    disk_margin: int = Field(
        default=2 * GiB, ge=0, description="free space kept beyond the next shard's size"
    )
    disk_retry_s: float = Field(
        default=30.0, gt=0, description="wait before re-checking disk space after a refusal"
    )
    rank_wait_timeout_s: float = Field(
        default=6 * 3600.0, gt=0, description="how long non-zero ranks wait for rank 0's shard"
    )
    rank_poll_s: float = Field(default=0.2, gt=0, description="ready-marker poll interval")

    @field_validator("disk_margin", mode="before")
    @classmethod
    def _parse_margin(cls, value: object) -> object:
        if isinstance(value, str) and value.strip():
            return parse_size(value)
        return value

    @property
    def prefix(self) -> str:
        """The bucket prefix, normalised to end with ``/`` (empty for the bucket root)."""
        stripped = self.bins_path.strip("/")
        return f"{stripped}/" if stripped else ""

    def local_path(self) -> Path:
        return self.local_dir if self.local_dir is not None else Path(self.bins_path or ".")
