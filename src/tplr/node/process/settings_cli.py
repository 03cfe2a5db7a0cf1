"""Command line and environment for :class:`~tplr.node.process.settings.NodeSettings`.

One rule names everything: a setting's environment variable is its component's prefix plus
the field name (``TPLR_RUN_WINDOW_SECONDS``, ``DATASET_KEEP_SHARDS``, ``METRICS_PORT``), and
its flag is that name in lower case with dashes, without ``TPLR_`` (``--run-window-seconds``,
``--dataset-keep-shards``, ``--metrics-port``). Precedence: flag > environment > ``.env``.
Secrets have no flag. Validation errors name the variable, the flag and the allowed range.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from pydantic import AliasChoices, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from tplr.errors import ConfigError
from tplr.node.process.env_check import (
    aliased_env_names,
    check_endpoint_url,
    check_names,
    known_env_names,
    raise_for_errors,
    tplr_settings_classes,
)
from tplr.node.process.settings import COMPONENTS, LEAD_DEFAULTS, NodeSettings, Role, components_for
from tplr.protocol.run_spec import RunSpec

DEFAULT_ENV_FILE = ".env"
FLAG_ALIASES = {"DATASET_KEEP_SHARDS": ("--keep-shards",)}
_SECTION_TITLES = {
    "node": "node",
    "run": "run (written to run.json by the lead; elsewhere must match the run)",
    "gather": "gathering peers' payloads",
    "miner": "miner",
    "validator": "validator",
    "dataset": "dataset (SharedShardedDatasetManager)",
    "dataset_bucket": "dataset bucket (read-only; keys from env/.env only)",
    "gradients_bucket": "gradients bucket (this node's; keys from env/.env only)",
    "transfer": "transfers",
    "health": "metrics and health endpoint",
}
_FALLBACK_HELP = {
    "R2_DATASET_ACCOUNT_ID": "Cloudflare account id of the dataset bucket",
    "R2_DATASET_BUCKET_NAME": "dataset bucket name",
    "R2_DATASET_ENDPOINT_URL": "S3 endpoint (overrides the R2 one built from the account id)",
    "R2_DATASET_REQUESTS_PER_SECOND": "request-rate cap for the dataset bucket",
    "R2_GRADIENTS_ACCOUNT_ID": "Cloudflare account id of this node's gradients bucket",
    "R2_GRADIENTS_BUCKET_NAME": "this node's gradients bucket name",
    "R2_GRADIENTS_ENDPOINT_URL": "S3 endpoint (overrides the R2 one built from the account id)",
    "R2_GRADIENTS_REQUESTS_PER_SECOND": "request-rate cap for the gradients bucket",
    "DOWNLOAD_MAX_WORKERS": "parallel ranged GETs per download (default: by size)",
    "DOWNLOAD_PART_SIZE": "bytes per ranged GET, e.g. 64MiB (default: by size)",
    "UPLOAD_MAX_WORKERS": "parallel part uploads",
    "UPLOAD_PART_SIZE": "multipart part size, e.g. 64MiB",
    "UPLOAD_MULTIPART_THRESHOLD": "objects at least this large use multipart",
    "TRANSFER_CONNECT_TIMEOUT_S": "connect timeout per request",
    "TRANSFER_READ_TIMEOUT_S": "read timeout per request",
    "TRANSFER_MAX_ATTEMPTS": "attempts per request before giving up",
    "TRANSFER_RETRY_TOTAL_S": "time budget of one request's retries",
    "METRICS_HOST": "address of the /metrics and /healthz server",
    "METRICS_PORT": "port of /metrics and /healthz (0: any free port)",
    "HEALTH_MAX_STALLED_WINDOWS": "/healthz turns 503 after this many windows without progress",
}


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The environment variable of ``cls.field`` (its alias, else prefix + NAME)."""
    alias = cls.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0]).upper()
    if isinstance(alias, str):
        return alias.upper()
    prefix = cls.model_config.get("env_prefix", "") or ""
    return f"{prefix}{field}".upper()


def flag_name(env: str) -> str:
    return "--" + env.lower().removeprefix("tplr_").replace("_", "-")


def _is_secret(info: FieldInfo) -> bool:
    return "SecretStr" in repr(info.annotation) or info.annotation is SecretStr


def _is_bool(info: FieldInfo) -> bool:
    return info.annotation in (bool, bool | None)


def settable_fields(cls: type[BaseSettings]) -> Iterator[tuple[str, FieldInfo, str]]:
    """``(field, info, env name)`` of every field a flag may set (secrets excluded)."""
    for field, info in cls.model_fields.items():
        if not _is_secret(info):
            yield field, info, env_name(cls, field)


def _describe_default(section: str, field: str, info: FieldInfo) -> str:
    if section == "run":
        return f"the run's; a new run gets {_new_run_default(field)}"
    if info.is_required():
        return "required"
    default = info.get_default(call_default_factory=True)
    return "unset" if default is None else str(default)


def _new_run_default(field: str) -> str:
    if field in LEAD_DEFAULTS:
        return str(LEAD_DEFAULTS[field])
    spec_field = RunSpec.model_fields[field]
    if not spec_field.is_required():
        return str(spec_field.get_default())
    return {"run_id": "run-<genesis>", "genesis_s": "the start time"}.get(field, "?")


def build_parser(role: Role, *, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or f"neurons/{role}.py",
        usage="%(prog)s [--uid UID] [options]",
        description=f"tplr {role}. Every flag also reads an environment variable (shown) or "
        ".env; flags win. Bucket keys are read from the environment or .env only.",
    )
    parser.add_argument(
        "--env-file",
        default=None,
        help=f"dotenv file to read (default: {DEFAULT_ENV_FILE} when present)",
    )
    for section, cls in components_for(role).items():
        group = parser.add_argument_group(_SECTION_TITLES[section])
        for field, info, env in settable_fields(cls):
            text = info.description or _FALLBACK_HELP.get(env, field.replace("_", " "))
            help_text = f"{text} [env {env}; default: {_describe_default(section, field, info)}]"
            names = (flag_name(env), *FLAG_ALIASES.get(env, ()))
            dest = f"{section}__{field}"
            if _is_bool(info):
                group.add_argument(
                    *names,
                    dest=dest,
                    default=None,
                    action=argparse.BooleanOptionalAction,
                    help=help_text,
                )
            else:
                group.add_argument(*names, dest=dest, default=None, metavar=env, help=help_text)
    return parser


def _flag_values(args: argparse.Namespace, section: str) -> dict[str, Any]:
    prefix = f"{section}__"
    return {
        name.removeprefix(prefix): value
        for name, value in vars(args).items()
        if name.startswith(prefix) and value is not None
    }


def _resolve_env_file(given: str | None) -> Path | None:
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise ConfigError(f"--env-file {given}: no such file", hint="pass an existing file")
        return path
    default = Path(DEFAULT_ENV_FILE)
    return default if default.is_file() else None


def describe_validation_error(cls: type[BaseSettings], exc: ValidationError) -> list[str]:
    """One line per bad setting, naming its variable and flag and what is allowed."""
    problems = []
    for error in exc.errors()[:5]:
        field = str(error["loc"][0]) if error["loc"] else ""
        if field in cls.model_fields:
            env = env_name(cls, field)
            where = f"{env} (flag {flag_name(env)})"
        else:
            where = field or cls.__name__
        if error["type"] == "missing":
            problems.append(f"missing {where}")
        else:
            shown = "" if "input" not in error else f" (got {str(error['input'])[:60]!r})"
            problems.append(f"invalid {where}: {error['msg']}{shown}")
    return problems


def check_environment(environ: Mapping[str, str], env_file: Path | None) -> tuple[str, ...]:
    """Unknown or templar names in the environment or ``env_file`` are a ConfigError;
    returns the warnings (templar names outside tplr's prefixes)."""
    names = [(name, "environment") for name in environ]
    if env_file is not None:
        names += [(name, str(env_file)) for name in dotenv_values(env_file)]
    classes = [*COMPONENTS.values(), *tplr_settings_classes()]
    report = check_names(names, known_env_names(classes), aliased_env_names(classes))
    raise_for_errors(report)
    return report.warnings


def check_endpoints(settings: NodeSettings) -> None:
    check_endpoint_url("R2_DATASET_ENDPOINT_URL", settings.dataset_bucket.endpoint_url)
    check_endpoint_url("R2_GRADIENTS_ENDPOINT_URL", settings.gradients_bucket.endpoint_url)


def load_settings(
    role: Role, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> NodeSettings:
    """Parse flags, read the environment and .env, validate every component.

    Raises one :class:`ConfigError` listing every bad or missing setting, or every unknown
    variable (:mod:`tplr.node.process.env_check`).
    """
    args = build_parser(role).parse_args(argv)
    env_file = _resolve_env_file(args.env_file)
    notices = check_environment(os.environ if environ is None else environ, env_file)
    components: dict[str, BaseSettings] = {}
    problems: list[str] = []
    for section, cls in components_for(role).items():
        try:
            components[section] = cls(_env_file=env_file, **_flag_values(args, section))
        except ValidationError as exc:
            problems.extend(describe_validation_error(cls, exc))
    if problems:
        raise ConfigError(
            "; ".join(problems),
            hint="set it in the environment or .env, or pass the flag; --help lists every setting",
        )
    settings = NodeSettings(role=role, notices=notices, **components)
    check_endpoints(settings)
    return settings
