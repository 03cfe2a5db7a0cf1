"""Bucket settings (env names compatible with existing templar deployments)."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from tplr.errors import ConfigError


class BucketConfig(BaseModel):
    """Everything needed to talk to one bucket with one credential set."""

    model_config = ConfigDict(frozen=True)

    bucket_name: str
    access_key_id: SecretStr
    secret_access_key: SecretStr
    account_id: str | None = None
    endpoint_url: str | None = None
    region: str = "auto"
    requests_per_second: float | None = Field(default=None, gt=0)

    def resolved_endpoint(self) -> str:
        """``*_ENDPOINT_URL`` wins; else the R2 endpoint built from the account id."""
        if self.endpoint_url:
            return self.endpoint_url
        if self.account_id:
            return f"https://{self.account_id}.r2.cloudflarestorage.com"
        raise ConfigError(
            f"bucket {self.bucket_name!r} has neither an account id nor an endpoint URL",
            hint="set R2_<BUCKET>_ACCOUNT_ID (Cloudflare R2) or R2_<BUCKET>_ENDPOINT_URL",
        )


def _require(prefix: str, **values: object) -> None:
    missing = [f"{prefix}{name.upper()}" for name, value in values.items() if not value]
    if missing:
        raise ConfigError(
            "missing bucket settings: " + ", ".join(missing),
            hint="set them in .env or the environment (see .env.example)",
        )


class DatasetBucketSettings(BaseSettings):
    """Read-only dataset bucket: ``R2_DATASET_*`` and ``DATASET_BINS_PATH``."""

    model_config = SettingsConfigDict(env_prefix="R2_DATASET_", extra="ignore")

    account_id: str | None = None
    bucket_name: str | None = None
    read_access_key_id: SecretStr | None = None
    read_secret_access_key: SecretStr | None = None
    endpoint_url: str | None = None
    requests_per_second: float | None = Field(default=None, gt=0)
    source_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATASET_SOURCE_URL"),
        description="read the dataset from an https:// base URL or hf://datasets/OWNER/REPO"
        " (read-only; DATASET_BINS_PATH is the folder in it) instead of a bucket",
    )
    hf_endpoint: str = Field(
        default="https://huggingface.co",
        validation_alias=AliasChoices("HF_ENDPOINT"),
        description="the dataset hub's base URL for hf:// sources",
    )
    hf_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("HF_TOKEN"),
        description="token for private or gated hub datasets (sent to the hub only)",
    )
    ca_bundle: str | None = Field(
        default=None,
        validation_alias=AliasChoices("TPLR_CA_BUNDLE"),
        description="CA bundle (PEM) to trust for https:// sources besides the system's",
    )

    def configured(self) -> bool:
        """True when any key is set: the node then uses R2/S3 instead of the local store."""
        return bool(self.bucket_name or self.read_access_key_id)

    def read_bucket(self) -> BucketConfig:
        prefix = "R2_DATASET_"
        _require(
            prefix,
            bucket_name=self.bucket_name,
            read_access_key_id=self.read_access_key_id,
            read_secret_access_key=self.read_secret_access_key,
        )
        return BucketConfig(
            bucket_name=self.bucket_name or "",
            access_key_id=self.read_access_key_id or SecretStr(""),
            secret_access_key=self.read_secret_access_key or SecretStr(""),
            account_id=self.account_id,
            endpoint_url=self.endpoint_url,
            requests_per_second=self.requests_per_second,
        )


class GradientsBucketSettings(BaseSettings):
    """A node's own gradients bucket: ``R2_GRADIENTS_*`` (read and write keys)."""

    model_config = SettingsConfigDict(env_prefix="R2_GRADIENTS_", extra="ignore")

    account_id: str | None = None
    bucket_name: str | None = None
    read_access_key_id: SecretStr | None = None
    read_secret_access_key: SecretStr | None = None
    write_access_key_id: SecretStr | None = None
    write_secret_access_key: SecretStr | None = None
    endpoint_url: str | None = None
    requests_per_second: float | None = Field(default=None, gt=0)

    def configured(self) -> bool:
        return bool(self.bucket_name or self.write_access_key_id)

    def _bucket(self, kind: str, key_id: SecretStr | None, secret: SecretStr | None):
        _require(
            "R2_GRADIENTS_",
            bucket_name=self.bucket_name,
            **{f"{kind}_access_key_id": key_id, f"{kind}_secret_access_key": secret},
        )
        return BucketConfig(
            bucket_name=self.bucket_name or "",
            access_key_id=key_id or SecretStr(""),
            secret_access_key=secret or SecretStr(""),
            account_id=self.account_id,
            endpoint_url=self.endpoint_url,
            requests_per_second=self.requests_per_second,
        )

    def read_bucket(self) -> BucketConfig:
        return self._bucket("read", self.read_access_key_id, self.read_secret_access_key)

    def write_bucket(self) -> BucketConfig:
        return self._bucket("write", self.write_access_key_id, self.write_secret_access_key)
