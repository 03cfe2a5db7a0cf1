#!/usr/bin/env python3
"""Generate README.md's configuration table and .env.example from the settings models.

    python scripts/gen_config_table.py           # rewrite both
    python scripts/gen_config_table.py --check   # exit 1 (and say what drifted) if either is stale

Every pydantic-settings model under ``src/tplr`` is found by importing the package's modules
(no module has import-time side effects), so a new setting shows up here without editing this
script. A field's text is its ``Field(description=...)``; :data:`FALLBACK_DESCRIPTIONS` covers
the models that carry none. A setting with neither is an error: undocumented settings fail CI.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import inspect
import pkgutil
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import AliasChoices, BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT / "src") not in sys.path:  # run from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO_ROOT / "src"))

from tplr.errors import ConfigError  # noqa: E402

START_MARKER = "<!-- config-table:start -->"
END_MARKER = "<!-- config-table:end -->"
EXIT_STALE = 1
_KiB, _MiB, _GiB = 1024, 1024**2, 1024**3

FALLBACK_DESCRIPTIONS: dict[str, str] = {
    "R2_DATASET_ACCOUNT_ID": "Cloudflare account id of the dataset bucket (builds the R2 endpoint)",
    "R2_DATASET_BUCKET_NAME": "dataset bucket; empty with no keys = the embedded local store",
    "R2_DATASET_READ_ACCESS_KEY_ID": "read-only access key id for the dataset bucket",
    "R2_DATASET_READ_SECRET_ACCESS_KEY": "read-only secret key for the dataset bucket",
    "R2_DATASET_ENDPOINT_URL": "S3 endpoint overriding the R2 one (MinIO, self-hosting, tests)",
    "R2_DATASET_REQUESTS_PER_SECOND": "request-rate cap for the dataset bucket; unset = no cap",
    "R2_GRADIENTS_ACCOUNT_ID": "Cloudflare account id of this node's gradients bucket",
    "R2_GRADIENTS_BUCKET_NAME": "this node's own gradients bucket (it writes, peers read)",
    "R2_GRADIENTS_READ_ACCESS_KEY_ID": "read key id of the gradients bucket (shared with peers)",
    "R2_GRADIENTS_READ_SECRET_ACCESS_KEY": "read secret of the gradients bucket",
    "R2_GRADIENTS_WRITE_ACCESS_KEY_ID": "write key id of the gradients bucket (keep private)",
    "R2_GRADIENTS_WRITE_SECRET_ACCESS_KEY": "write secret of the gradients bucket (keep private)",
    "R2_GRADIENTS_ENDPOINT_URL": "S3 endpoint overriding the R2 one (MinIO, self-hosting)",
    "R2_GRADIENTS_REQUESTS_PER_SECOND": "request-rate cap for the gradients bucket; unset = no cap",
    "DOWNLOAD_MAX_WORKERS": "parallel ranged GETs per download; unset = derived from object size",
    "DOWNLOAD_PART_SIZE": "bytes per ranged GET (e.g. 64MiB); unset = derived from object size",
    "UPLOAD_MAX_WORKERS": "parts uploaded in parallel",
    "UPLOAD_PART_SIZE": "multipart part size (equal parts; grows to stay within 10,000 parts)",
    "UPLOAD_MULTIPART_THRESHOLD": "objects this large or larger are uploaded in parts",
    "TRANSFER_CONNECT_TIMEOUT_S": "HTTP connect timeout per request, seconds",
    "TRANSFER_READ_TIMEOUT_S": "HTTP read timeout per request (no byte for this long), seconds",
    "TRANSFER_MAX_ATTEMPTS": "tries per request before the transfer fails",
    "TRANSFER_RETRY_TOTAL_S": "total time budget for retrying one request, seconds",
    "METRICS_HOST": "address the /metrics and /healthz server binds",
    "METRICS_PORT": "port of /metrics and /healthz (0 picks a free port)",
    "HEALTH_MAX_STALLED_WINDOWS": "/healthz turns 503 after this many windows without progress",
}
"""Descriptions for settings whose model gives none (keyed by env var name)."""

EXTRA_VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("NODE_TYPE", "miner", "docker image: which node the entrypoint starts (miner or validator)"),
    ("NPROC_PER_NODE", "1", "docker image: processes (GPUs) per node; above 1 runs torchrun"),
    ("AWS_ACCESS_KEY_ID", "", "tplr put/fetch on buckets that are not the R2_* ones"),
    ("AWS_SECRET_ACCESS_KEY", "", "secret for AWS_ACCESS_KEY_ID"),
    ("AWS_ENDPOINT_URL", "", "S3 endpoint for the AWS_* keys (R2, MinIO)"),
)
"""Variables read outside the settings models (entrypoint, CLI tools): documented, commented."""


@dataclass(frozen=True, slots=True)
class Setting:
    """One environment variable of one settings model, ready to print."""

    env_name: str
    flag: str  # "" = environment / .env only
    type_text: str
    default_text: str  # "" = unset
    allowed_text: str
    description: str
    required: bool
    fill_in: bool  # bucket names, keys, endpoints: listed uncommented (empty) in .env.example


@dataclass(frozen=True, slots=True)
class SettingsGroup:
    title: str
    model_path: str  # "tplr.comms.config.DatasetBucketSettings"
    settings: tuple[Setting, ...]


def discover_settings_models(package: str = "tplr") -> list[type[BaseSettings]]:
    """Every BaseSettings subclass defined in ``package``, in module then source order."""
    root = importlib.import_module(package)
    found: list[type[BaseSettings]] = []
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if info.name.endswith(".__main__"):  # running it is the only thing it does
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == info.name and issubclass(obj, BaseSettings):
                found.append(obj)
    node_order = list(_node_components().values())
    return sorted(found, key=lambda cls: _position(cls, node_order))


def _node_components() -> dict[str, type[BaseSettings]]:
    """The node's settings components, in the order its ``--help`` shows them ({} before
    the node layer exists, so the lower layers' settings can be documented on their own)."""
    if importlib.util.find_spec("tplr.node.process.settings") is None:
        return {}
    from tplr.node.process.settings import COMPONENTS

    return dict(COMPONENTS)


def _position(cls: type, node_order: list[type]) -> tuple[int, str, int]:
    """Node components first (in their order), then any other model by module and line."""
    rank = node_order.index(cls) if cls in node_order else len(node_order)
    try:
        line = inspect.getsourcelines(cls)[1]
    except (OSError, TypeError):  # made by create_model: no source
        line = 0
    return rank, cls.__module__, line


def env_name_for(model: type[BaseSettings], field_name: str, field: FieldInfo) -> str:
    """The variable that sets ``field``: its alias (the first choice), else prefix + name."""
    alias = field.validation_alias or field.alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0].upper()
    if isinstance(alias, str):
        return alias.upper()
    if alias is not None:
        raise ConfigError(
            f"{model.__name__}.{field_name} has an alias this script cannot name: {alias!r}",
            hint="use a plain alias or AliasChoices of strings",
        )
    prefix = model.model_config.get("env_prefix", "") or ""
    return f"{prefix}{field_name}".upper()


def flags_of(model: type[BaseSettings]) -> dict[str, str]:
    """``{env name: flag}`` for the settings a node flag can set (not secrets, not others)."""
    if model not in _node_components().values():
        return {}
    from tplr.node.process.settings_cli import FLAG_ALIASES, flag_name, settable_fields

    flags = {}
    for _, _, env in settable_fields(model):
        flags[env] = ", ".join((flag_name(env), *FLAG_ALIASES.get(env, ())))
    return flags


def _strip_optional(annotation: Any) -> Any:
    """``X`` from ``X | None``, ``Optional[Annotated[X, ...]]`` or ``Annotated[X, ...]``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else annotation
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def _constraints(field: FieldInfo) -> list[Any]:
    """The field's metadata plus any ``Annotated`` metadata inside ``Optional[...]``."""
    found = list(field.metadata)
    for arg in typing.get_args(field.annotation) or ():
        if typing.get_origin(arg) is typing.Annotated:
            found += list(arg.__metadata__)
    return found


def _is_size_field(model: type[BaseModel], field_name: str) -> bool:
    """True when a 'before' validator of the model parses this field with ``parse_size``."""
    for decorator in model.__pydantic_decorators__.field_validators.values():
        if field_name in decorator.info.fields:
            try:
                source = inspect.getsource(decorator.func)
            except (OSError, TypeError):
                continue
            if "parse_size" in source:
                return True
    return False


def format_bytes(value: int) -> str:
    for unit, size in (("GiB", _GiB), ("MiB", _MiB), ("KiB", _KiB)):
        if value and value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


def _type_text(annotation: Any, is_size: bool) -> str:
    inner = _strip_optional(annotation)
    if typing.get_origin(inner) is Literal:
        return "choice"
    if is_size:
        return "size"
    names = {bool: "bool", int: "integer", float: "number", str: "text", Path: "path"}
    if inner is SecretStr:
        return "secret"
    return names.get(inner, getattr(inner, "__name__", str(inner)))


def _value_text(value: Any, is_size: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if is_size and isinstance(value, int):
        return format_bytes(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _allowed_text(field: FieldInfo, annotation: Any, is_size: bool) -> str:
    inner = _strip_optional(annotation)
    if typing.get_origin(inner) is Literal:
        return ", ".join(str(a) for a in typing.get_args(inner))
    bounds = []
    symbols = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}
    for item in _constraints(field):
        for attr, symbol in symbols.items():
            if isinstance(item, annotated_types.BaseMetadata) and hasattr(item, attr):
                bounds.append(f"{symbol} {_value_text(getattr(item, attr), is_size)}")
    if inner is bool:
        return "true, false"
    return ", ".join(bounds)


def settings_of(model: type[BaseSettings]) -> tuple[Setting, ...]:
    """One :class:`Setting` per env var the model reads (nested models are skipped)."""
    rows: list[Setting] = []
    flags = flags_of(model)
    for field_name, field in model.model_fields.items():
        annotation = field.annotation
        inner = _strip_optional(annotation)
        if inspect.isclass(inner) and issubclass(inner, BaseModel):
            continue  # a nested component config: documented by its own model
        env_name = env_name_for(model, field_name, field)
        description = field.description or FALLBACK_DESCRIPTIONS.get(env_name)
        if not description:
            raise ConfigError(
                f"setting {env_name} ({model.__module__}.{model.__name__}.{field_name}) "
                "has no description",
                hint="add Field(description=...) to the model, or an entry to "
                "FALLBACK_DESCRIPTIONS in scripts/gen_config_table.py",
            )
        is_size = _is_size_field(model, field_name)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        rows.append(
            Setting(
                env_name=env_name,
                flag=flags.get(env_name, ""),
                type_text=_type_text(annotation, is_size),
                default_text=_value_text(default, is_size),
                allowed_text=_allowed_text(field, annotation, is_size),
                description=description.rstrip("."),
                required=field.is_required(),
                fill_in=env_name.startswith("R2_") and default is None and inner is not float,
            )
        )
    return tuple(rows)


def _title_of(model: type[BaseSettings]) -> str:
    """The model's own docstring's first line, else its name and env prefix."""
    own_doc = model.__dict__.get("__doc__")
    if not own_doc:
        prefix = model.model_config.get("env_prefix", "") or ""
        return f"{model.__name__} (`{prefix}*`)" if prefix else model.__name__
    return inspect.cleandoc(own_doc).splitlines()[0].rstrip(".").replace("``", "`")


def collect_groups(models: list[type[BaseSettings]] | None = None) -> list[SettingsGroup]:
    """The settings groups to document; an env var read by two models is listed once."""
    seen: set[str] = set()
    groups = []
    for model in discover_settings_models() if models is None else models:
        rows = tuple(s for s in settings_of(model) if s.env_name not in seen)
        seen.update(s.env_name for s in rows)
        if rows:
            path = f"{model.__module__}.{model.__name__}"
            groups.append(SettingsGroup(_title_of(model), path, rows))
    return groups


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") if text else "—"


def render_table(groups: list[SettingsGroup]) -> str:
    """The Markdown that goes between the README markers."""
    lines = [
        "<!-- Generated by scripts/gen_config_table.py from the settings models; do not edit. -->",
        "",
        "Every setting is an environment variable (or a line in `.env`); `.env.example` lists "
        "them all.",
        "Node flags (`neurons/miner.py --help`) win over the environment, which wins over `.env`;",
        "bucket keys have no flag. Sizes accept units (`64MiB`, `2GiB`); `—` means unset.",
    ]
    for group in groups:
        lines += ["", f"**{group.title}** (`{group.model_path}`)", ""]
        lines += ["| Variable | Flag | Type | Default | Allowed | Description |"]
        lines += ["|---|---|---|---|---|---|"]
        for s in group.settings:
            default = "**required**" if s.required else s.default_text
            flag = f"`{s.flag}`" if s.flag else ""
            cells = [f"`{s.env_name}`", flag, s.type_text, default, s.allowed_text]
            cells = [_cell(c) for c in cells] + [_cell(s.description)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_env_example(groups: list[SettingsGroup]) -> str:
    """The whole .env.example: fill-in variables empty, the rest commented with their default."""
    lines = [
        "# tplr settings: copy to .env (cp .env.example .env) and fill in what you need.",
        "# Generated by scripts/gen_config_table.py from the settings models; do not edit.",
        "# A commented-out line shows the default; uncomment it to change the value.",
        "# With no R2 bucket names or keys set, the node uses the embedded local store.",
    ]
    for group in groups:
        lines += ["", f"# === {group.title} ===", f"# ({group.model_path})"]
        for s in group.settings:
            allowed = f"; allowed {s.allowed_text}" if s.allowed_text else ""
            required = "REQUIRED; " if s.required else ""
            comment = f"{s.description} ({required}{s.type_text}{allowed})"
            lines += textwrap.wrap(comment, 98, initial_indent="# ", subsequent_indent="#   ")
            listed = s.fill_in or s.required
            lines.append(f"{s.env_name}=" if listed else f"# {s.env_name}={s.default_text}")
    lines += [
        "",
        "# === Read elsewhere (docker image, compose, tplr put/fetch) ===",
    ]
    for name, default, description in EXTRA_VARIABLES:
        lines += [f"# {description}", f"# {name}={default}"]
    return "\n".join(lines) + "\n"


def replace_between_markers(readme: str, body: str) -> str:
    start, end = readme.find(START_MARKER), readme.find(END_MARKER)
    if start < 0 or end < start:
        raise ConfigError(
            f"README.md lacks the markers {START_MARKER} ... {END_MARKER}",
            hint="put both marker lines, in that order, where the table belongs",
        )
    return readme[: start + len(START_MARKER)] + "\n" + body + "\n" + readme[end:]


def _diff(name: str, old: str, new: str) -> str:
    lines = difflib.unified_diff(
        old.splitlines(),
        new.splitlines(),
        f"{name} (committed)",
        f"{name} (generated)",
        lineterm="",
    )
    return "\n".join(list(lines)[:60])


def run(repo_root: Path, *, check: bool) -> int:
    """Regenerate (or, with ``check``, compare) README.md's table and .env.example."""
    groups = collect_groups()
    readme_path, env_path = repo_root / "README.md", repo_root / ".env.example"
    readme_old = readme_path.read_text()
    env_old = env_path.read_text() if env_path.exists() else ""
    outputs = {
        readme_path: (readme_old, replace_between_markers(readme_old, render_table(groups))),
        env_path: (env_old, render_env_example(groups)),
    }
    stale = [path for path, (old, new) in outputs.items() if old != new]
    if check:
        for path in stale:
            print(_diff(path.name, *outputs[path]), file=sys.stderr)
            print(f"{path.name} is out of date with the settings models", file=sys.stderr)
        if stale:
            print("fix: python scripts/gen_config_table.py (then commit both)", file=sys.stderr)
        return EXIT_STALE if stale else 0
    for path in stale:
        path.write_text(outputs[path][1])
        print(f"updated {path.relative_to(repo_root)}")
    count = sum(len(g.settings) for g in groups)
    print(f"{count} settings in {len(groups)} models; {len(stale)} file(s) changed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is out of date")
    parser.add_argument("--repo-root", type=Path, default=REPO_ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        return run(args.repo_root, check=args.check)
    except ConfigError as exc:
        print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
