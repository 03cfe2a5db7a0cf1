"""The environment and ``.env`` checked against the settings the node really reads.

pydantic-settings ignores variables it does not know, so ``DATASET_KEEP_SHARD=true`` (one
letter short) or a templar ``.env`` would silently run with defaults. Every name under the
node's namespaces (``TPLR_``, ``R2_``, ``DATASET_``) must be one that a settings class
reads, or one of :data:`HARMLESS` (read by the image, compose or scripts); otherwise it
is an error with a "did you mean" suggestion. A templar variable gets the tplr variable
that replaces it (:data:`TEMPLAR_EQUIVALENTS`, and docs/migrating-from-templar.md).

The known names are derived from the settings classes (env prefix + field name, or the
field's aliases), so a field added anywhere shows up here without editing this module.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from tplr.errors import ConfigError

CHECKED_PREFIXES = ("TPLR_", "R2_", "DATASET_")
MIGRATION_DOC = "docs/migrating-from-templar.md"

HARMLESS = {
    "TPLR_APP_DIR": "docker/entrypoint.sh: where the image keeps the code",
    "TPLR_IMAGE": "docker/compose.yml: the node image tag",
    "TPLR_TORCH_INDEX_URL": "scripts/setup_env.sh: where to install torch from",
}
"""Names under the checked prefixes that no settings class reads, on purpose."""

_AGGREGATOR = (
    "tplr has no aggregator bucket: the lead validator publishes checkpoints in its own "
    "gradients bucket, found through PEERS_FILE and TPLR_LEAD_UID; remove it"
)
_SINGLE_BUCKET = (
    "in tplr the gradients bucket is R2_GRADIENTS_ACCOUNT_ID, R2_GRADIENTS_BUCKET_NAME and "
    "R2_GRADIENTS_{READ,WRITE}_{ACCESS_KEY_ID,SECRET_ACCESS_KEY}"
)
TEMPLAR_EQUIVALENTS = {
    "TPLR_S3_PART_SIZE": "use DOWNLOAD_PART_SIZE (ranged GETs) and UPLOAD_PART_SIZE (multipart)",
    "TPLR_S3_CONCURRENCY": "use DOWNLOAD_MAX_WORKERS and UPLOAD_MAX_WORKERS",
    "TPLR_ENABLE_PROFILERS": "tplr has no profiler switch: timings are on /metrics; remove it",
    "TPLR_ENABLE_TIMER_PROFILER": "timings are tplr_*_seconds histograms on /metrics; remove it",
    "TPLR_ENABLE_SHARD_PROFILER": "shard timings are tplr_dataset_* metrics; remove it",
    "R2_DATASET_BUCKET_LIST": "tplr reads one dataset bucket (R2_DATASET_*); mirror the "
    "dataset into it with `tplr shards upload`",
    "R2_DATASET_WRITE_ACCESS_KEY_ID": "nodes only read the dataset; `tplr shards upload` takes "
    "AWS_ACCESS_KEY_ID",
    "R2_DATASET_WRITE_SECRET_ACCESS_KEY": "nodes only read the dataset; `tplr shards upload` "
    "takes AWS_SECRET_ACCESS_KEY",
    "R2_ACCOUNT_ID": _SINGLE_BUCKET,
    "R2_BUCKET_NAME": _SINGLE_BUCKET,
    "R2_ACCESS_KEY_ID": _SINGLE_BUCKET,
    "R2_SECRET_ACCESS_KEY": _SINGLE_BUCKET,
    "R2_READ_ACCESS_KEY_ID": _SINGLE_BUCKET,
    "R2_READ_SECRET_ACCESS_KEY": _SINGLE_BUCKET,
    "R2_WRITE_ACCESS_KEY_ID": _SINGLE_BUCKET,
    "R2_WRITE_SECRET_ACCESS_KEY": _SINGLE_BUCKET,
    "DATASET_ROOT": "use DATASET_LOCAL_DIR (where shards live on disk)",
}
"""templar variables under the checked prefixes -> what replaces them in tplr."""

TEMPLAR_PREFIX_EQUIVALENTS = {
    "R2_AGGREGATOR_": _AGGREGATOR,
    "R2_COLLECTOR_": "tplr has no collector bucket (scores are in each validator's bucket); "
    "remove it",
}

TEMPLAR_ELSEWHERE = {
    "WALLET_NAME": "tplr has no wallets: a node is identified by TPLR_UID",
    "WALLET_HOTKEY": "tplr has no wallets: a node is identified by TPLR_UID",
    "NETUID": "tplr has no chain: the run is the lead validator's run.json",
    "CUDA_DEVICE": "use TPLR_DEVICE (auto, cuda, cpu) and CUDA_VISIBLE_DEVICES",
    "WANDB_API_KEY": "tplr exports Prometheus metrics (/metrics); W&B is not used",
    "INFLUXDB_TOKEN": "tplr exports Prometheus metrics (/metrics); InfluxDB is not used",
}
"""templar variables outside the checked prefixes: only a warning (other tools may read them)."""


@dataclass(frozen=True)
class EnvReport:
    errors: tuple[str, ...]
    warnings: tuple[str, ...]


def field_env_names(cls: type[BaseSettings]) -> Iterator[str]:
    """Every environment variable name that ``cls`` reads (upper case)."""
    prefix = (cls.model_config.get("env_prefix") or "").upper()
    for name, info in cls.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            yield from (str(choice).upper() for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            yield alias.upper()
        else:
            yield f"{prefix}{name}".upper()


def tplr_settings_classes() -> list[type[BaseSettings]]:
    """Every pydantic-settings class of the ``tplr`` package imported so far."""
    found: list[type[BaseSettings]] = []
    pending = list(BaseSettings.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("tplr.") and cls not in found:
            found.append(cls)
    return found


def known_env_names(classes: Iterable[type[BaseSettings]]) -> set[str]:
    return {name for cls in classes for name in field_env_names(cls)}


def aliased_env_names(classes: Iterable[type[BaseSettings]]) -> dict[str, str]:
    """``prefix + FIELD`` -> the variable really read, for fields read under an alias
    (``TPLR_VALIDATOR_LEAD`` -> ``TPLR_LEAD``)."""
    renamed = {}
    for cls in classes:
        prefix = (cls.model_config.get("env_prefix") or "").upper()
        for name, info in cls.model_fields.items():
            alias = info.validation_alias
            if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
                renamed[f"{prefix}{name}".upper()] = alias.choices[0].upper()
    return renamed


def check_names(
    names: Iterable[tuple[str, str]], known: set[str], renamed: dict[str, str] | None = None
) -> EnvReport:
    """``names`` are ``(name, where)`` pairs, e.g. ``("DATASET_KEEP_SHARD", ".env")``;
    ``renamed`` maps a field's unread ``prefix + FIELD`` name to its alias."""
    errors: list[str] = []
    warnings: list[str] = []
    checked = sorted(known | set(HARMLESS))
    for name, where in names:
        upper = name.upper()
        if upper in known or upper in HARMLESS:
            continue
        if upper in TEMPLAR_ELSEWHERE:
            warnings.append(f"{upper} ({where}) is a templar setting: {TEMPLAR_ELSEWHERE[upper]}")
            continue
        if not upper.startswith(CHECKED_PREFIXES):
            continue
        templar = TEMPLAR_EQUIVALENTS.get(upper) or _templar_prefix_text(upper)
        if templar is not None:
            errors.append(f"{upper} ({where}) is a templar setting: {templar}")
            continue
        close = [renamed[upper]] if renamed and upper in renamed else None
        close = close or difflib.get_close_matches(upper, checked, n=1, cutoff=0.75)
        suggestion = f"; did you mean {close[0]}?" if close else ""
        errors.append(f"unknown setting {upper} ({where}){suggestion}")
    return EnvReport(tuple(errors), tuple(warnings))


def _templar_prefix_text(name: str) -> str | None:
    for prefix, text in TEMPLAR_PREFIX_EQUIVALENTS.items():
        if name.startswith(prefix):
            return text
    return None


def raise_for_errors(report: EnvReport) -> None:
    if report.errors:
        raise ConfigError(
            "; ".join(report.errors),
            hint=f"rename or remove it (--help lists every setting; {MIGRATION_DOC} maps every "
            "templar variable)",
        )


def check_endpoint_url(variable: str, value: str | None) -> None:
    """An endpoint must be ``http(s)://host[:port]``; a bare host gives a clear error."""
    if not value:
        return
    try:
        parts = urlsplit(value)
        port_ok = parts.port is None or parts.port > 0
    except ValueError as exc:
        raise ConfigError(
            f"invalid {variable}: {value!r}: {exc}",
            hint="write it as https://host[:port] (http:// only for a local MinIO)",
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ConfigError(
            f"invalid {variable}: {value!r} is not an http(s):// URL with a host",
            hint=f"write it as https://host[:port], e.g. {variable}=https://"
            f"{value.split('://')[-1] or 'minio.example.org:9000'}",
        )
