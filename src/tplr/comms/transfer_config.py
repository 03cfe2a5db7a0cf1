"""Transfer tuning (downloads, uploads, timeouts, retries), from env or CLI flags.

Env names: ``DOWNLOAD_MAX_WORKERS``, ``DOWNLOAD_PART_SIZE``, ``UPLOAD_MAX_WORKERS``,
``UPLOAD_PART_SIZE``, ``UPLOAD_MULTIPART_THRESHOLD``, ``TRANSFER_CONNECT_TIMEOUT_S``,
``TRANSFER_READ_TIMEOUT_S``, ``TRANSFER_MAX_ATTEMPTS``, ``TRANSFER_RETRY_TOTAL_S``.
Sizes accept units (``64MiB``). ``None`` for workers/part size means "derive from the
object size" (see :mod:`tplr.comms.download.engine`).
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tplr.comms.retry import RetryPolicy
from tplr.units import parse_size

MiB = 1024 * 1024


class TransferConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    download_max_workers: int | None = Field(default=None, ge=1, le=1024)
    download_part_size: int | None = Field(default=None, ge=64 * 1024, le=5 * 1024**3)
    upload_max_workers: int = Field(default=8, ge=1, le=256)
    upload_part_size: int = Field(default=64 * MiB, ge=5 * MiB, le=5 * 1024**3)
    upload_multipart_threshold: int = Field(default=64 * MiB, ge=5 * MiB)
    transfer_connect_timeout_s: float = Field(default=10.0, gt=0)
    transfer_read_timeout_s: float = Field(default=60.0, gt=0)
    transfer_max_attempts: int = Field(default=10, ge=1, le=100)
    transfer_retry_total_s: float = Field(default=900.0, gt=0)

    @field_validator(
        "download_part_size", "upload_part_size", "upload_multipart_threshold", mode="before"
    )
    @classmethod
    def _parse_sizes(cls, value: object) -> object:
        if isinstance(value, str) and value.strip():
            return parse_size(value)
        return value

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.transfer_max_attempts, total_timeout_s=self.transfer_retry_total_s
        )
