#!/usr/bin/env python3
"""Write docker/requirements.lock: exact pins of the runtime dependencies, from a venv.

    .venv/bin/python docker/lock_requirements.py           # rewrite the lock
    .venv/bin/python docker/lock_requirements.py --check   # exit 1 if it differs from the venv

The closure starts at pyproject.toml's ``dependencies`` plus the ``gpt2`` extra (the tokenizer
the nodes use) and follows each installed distribution's requirements, with markers evaluated
for the image (Linux, x86_64, :data:`TARGET_PYTHON`). torch is left out: the Dockerfile installs
it from the CUDA wheel index (``TORCH_VERSION`` must equal the version recorded in the header),
which also brings its CUDA libraries pinned exactly by torch itself. Pure-Python dependencies of
torch stay in the lock so the image gets the versions the tests ran with.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCK_PATH = REPO_ROOT / "docker" / "requirements.lock"
CUDA_LOCK_PATH = REPO_ROOT / "docker" / "requirements-cuda.lock"
TARGET_PYTHON = "3.12"  # python3 of the image's Ubuntu 24.04 base
EXTRAS = ("gpt2",)
INSTALLED_SEPARATELY = frozenset({"torch"})
TORCH_HEADER_RE = re.compile(r"^# torch==(?P<version>\S+) ", re.MULTILINE)


class LockError(Exception):
    """The lock cannot be derived from this environment."""


def target_environment(extra: str = "") -> dict[str, str]:
    return {
        "python_version": TARGET_PYTHON,
        "python_full_version": f"{TARGET_PYTHON}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": extra,
    }


def applies(requirement: Requirement, extras: frozenset[str]) -> bool:
    """Whether ``requirement`` is needed in the image, given the extras asked of its parent."""
    if requirement.marker is None:
        return True
    candidates = extras or frozenset({""})
    return any(requirement.marker.evaluate(target_environment(e)) for e in candidates)


def top_level_requirements(pyproject: Path) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    texts = list(project["dependencies"])
    for extra in EXTRAS:
        texts += project["optional-dependencies"][extra]
    return [Requirement(text) for text in texts]


def resolve_closure(roots: list[Requirement]) -> dict[str, str]:
    """Installed ``{canonical name: version}`` of everything ``roots`` need in the image."""
    pinned: dict[str, str] = {}
    visited: set[tuple[str, frozenset[str]]] = set()  # a package again with new extras counts
    pending = [r for r in roots if applies(r, frozenset())]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        extras = frozenset(requirement.extras)
        if (name, extras) in visited:
            continue
        visited.add((name, extras))
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            raise LockError(
                f"{requirement.name} is required ({requirement}) but not installed in "
                f"{sys.prefix}; install the project first: pip install -e '.[gpt2]'"
            ) from None
        if not requirement.specifier.contains(dist.version, prereleases=True):
            raise LockError(f"installed {name}=={dist.version} does not satisfy {requirement}")
        if name not in INSTALLED_SEPARATELY:  # its own dependencies are still followed
            pinned[name] = dist.version
        for text in dist.requires or []:
            child = Requirement(text)
            if applies(child, extras):
                pending.append(child)
    return pinned


def render_lock(pinned: dict[str, str], torch_version: str) -> str:
    lines = [
        "# Runtime dependencies of the tplr image, pinned exactly. Generated from the test venv by",
        "# docker/lock_requirements.py; regenerate instead of editing.",
        f"# torch=={torch_version} is installed separately from the CUDA wheel index "
        "(Dockerfile TORCH_VERSION).",
        f"# Markers evaluated for Linux x86_64, CPython {TARGET_PYTHON}.",
    ]
    lines += [f"{name}=={version}" for name, version in sorted(pinned.items())]
    return "\n".join(lines) + "\n"


def parse_lock(text: str) -> dict[str, str]:
    """``{canonical name: version}`` of a lock file's pins."""
    pins = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def locked_torch_version(text: str) -> str:
    match = TORCH_HEADER_RE.search(text)
    if match is None:
        raise LockError("the lock's header does not record the torch version")
    return match.group("version")


def current_lock_text() -> str:
    roots = top_level_requirements(REPO_ROOT / "pyproject.toml")
    torch_version = metadata.version("torch").split("+", 1)[0]  # drop +cpu / +cu130
    return render_lock(resolve_closure(roots), torch_version)


def cuda_constraints_text(report_path: Path) -> str:
    """Pins of torch's CUDA wheels, from ``pip install --dry-run --report`` of the image set."""
    report = json.loads(report_path.read_text())
    main_pins = parse_lock(LOCK_PATH.read_text())
    pins = {}
    for item in report["install"]:
        name = canonicalize_name(item["metadata"]["name"])
        if name not in main_pins and name not in INSTALLED_SEPARATELY:
            pins[name] = item["metadata"]["version"]
    if not pins:
        raise LockError(f"{report_path} lists no CUDA wheels beyond the main lock")
    lines = [
        "# Constraints for the CUDA wheels torch pulls in (nvidia-*, triton, cuda-*), from",
        "# pip install --dry-run --report of torch plus requirements.lock for the image's Python.",
        "# Regenerate: docker/lock_requirements.py --cuda-report REPORT.json",
        "# (the command that makes REPORT.json is in docs/operators.md)",
    ]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the lock is stale")
    parser.add_argument(
        "--cuda-report", type=Path, help="write requirements-cuda.lock from this pip report"
    )
    args = parser.parse_args(argv)
    if args.cuda_report:
        CUDA_LOCK_PATH.write_text(cuda_constraints_text(args.cuda_report))
        print(f"wrote {CUDA_LOCK_PATH}")
        return 0
    try:
        text = current_lock_text()
    except LockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        old = LOCK_PATH.read_text() if LOCK_PATH.exists() else ""
        if old != text:
            print(f"{LOCK_PATH} differs from this venv; run docker/lock_requirements.py")
            return 1
        print(f"{LOCK_PATH.name} matches the venv ({len(parse_lock(text))} pins)")
        return 0
    LOCK_PATH.write_text(text)
    print(f"wrote {LOCK_PATH} ({len(parse_lock(text))} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
