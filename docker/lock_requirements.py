#!/usr/bin/env python3
"""Write docker/requirements.lock and requirements-cuda.lock with uv, for the image's platform.

    .venv/bin/python docker/lock_requirements.py             # resolve (needs PyPI), rewrite both
    .venv/bin/python docker/lock_requirements.py --upgrade   # ... taking newer versions too
    .venv/bin/python docker/lock_requirements.py --check     # offline: locks agree with the venv

Resolution is ``uv pip compile`` of pyproject.toml's dependencies plus the ``gpt2`` and ``gpu``
extras and
``torch==<the version the tests run with>``, for CPython :data:`TARGET_PYTHON` on
:data:`TARGET_PLATFORM` (the image: Ubuntu 24.04, x86_64) — no hand-written platform list,
and the existing pins are kept unless ``--upgrade``. The result is split in two: torch's CUDA
wheels (``nvidia-*``, ``cuda-*``, ``triton``) go to requirements-cuda.lock, which constrains
the Dockerfile's torch install from the CUDA index; everything else but torch goes to
requirements.lock. scripts/setup_env.sh installs the test venv with these pins as
constraints, so the tests run the versions the image ships; ``--check`` verifies that.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCK_PATH = REPO_ROOT / "docker" / "requirements.lock"
CUDA_LOCK_PATH = REPO_ROOT / "docker" / "requirements-cuda.lock"
TARGET_PYTHON = "3.12"  # python3 of the image's Ubuntu 24.04 base
TARGET_PLATFORM = "x86_64-manylinux_2_28"  # uv's name; Ubuntu 24.04 has glibc 2.39
EXTRAS = ("gpt2", "gpu")
INSTALLED_SEPARATELY = frozenset({"torch"})
CUDA_WHEEL = re.compile(r"^(nvidia-(?!ml-py$).*|cuda-.*|triton)$")  # not NVML (gpu extra)
TORCH_HEADER_RE = re.compile(r"^# torch==(?P<version>\S+) ", re.MULTILINE)
DEFAULT_INDEX = "https://pypi.org/simple"


class LockError(Exception):
    """The locks cannot be made or do not match."""


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


def parse_lock(text: str) -> dict[str, str]:
    """``{canonical name: version}`` of a lock file's pins."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name.split("[", 1)[0])] = version.split(";", 1)[0].strip()
    return pins


def locked_torch_version(text: str) -> str:
    match = TORCH_HEADER_RE.search(text)
    if match is None:
        raise LockError("the lock's header does not record the torch version")
    return match.group("version")


def tested_torch_version() -> str:
    return metadata.version("torch").split("+", 1)[0]  # drop +cpu / +cu130


def uv_command(
    uv: str, output: Path, torch_version: str, *, upgrade: bool, index_url: str
) -> list[str]:
    """``uv pip compile`` for the image's Python and platform (pins kept unless upgrade)."""
    command = [uv, "pip", "compile", str(REPO_ROOT / "pyproject.toml")]
    command += [arg for extra in EXTRAS for arg in ("--extra", extra)]
    command += ["--python-version", TARGET_PYTHON, "--python-platform", TARGET_PLATFORM]
    command += ["--index-url", index_url, "--no-header", "--no-annotate", "--quiet"]
    command += ["--output-file", str(output)]
    if upgrade:
        command.append("--upgrade")
    return command


def split_pins(pins: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(main, cuda)``: torch's CUDA wheels apart; torch itself in neither."""
    main = {
        n: v for n, v in pins.items() if not CUDA_WHEEL.match(n) and n not in INSTALLED_SEPARATELY
    }
    cuda = {n: v for n, v in pins.items() if CUDA_WHEEL.match(n)}
    return main, cuda


def render_lock(pins: dict[str, str], torch_version: str) -> str:
    lines = [
        "# Runtime dependencies of the tplr image, pinned exactly: `uv pip compile` for CPython",
        f"# {TARGET_PYTHON} on {TARGET_PLATFORM}, by docker/lock_requirements.py (regenerate,",
        "# do not edit). scripts/setup_env.sh installs the test venv with these as constraints.",
        f"# torch=={torch_version} is installed separately from the CUDA wheel index "
        "(Dockerfile TORCH_VERSION).",
    ]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    return "\n".join(lines) + "\n"


def render_cuda_lock(pins: dict[str, str], torch_version: str) -> str:
    lines = [
        f"# Constraints for the CUDA wheels torch=={torch_version} pulls in (nvidia-*, cuda-*,",
        "# triton), from the same `uv pip compile` as requirements.lock; regenerate with",
        "# docker/lock_requirements.py.",
    ]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    return "\n".join(lines) + "\n"


def seed_file(folder: Path, torch_version: str) -> Path:
    """The current pins plus the tested torch, so uv keeps them (a pip-tools style seed)."""
    seed = folder / "seed.txt"
    old = {}
    for path in (LOCK_PATH, CUDA_LOCK_PATH):
        if path.exists():
            old |= parse_lock(path.read_text())
    old["torch"] = torch_version
    seed.write_text("".join(f"{name}=={version}\n" for name, version in sorted(old.items())))
    return seed


def resolve(torch_version: str, *, upgrade: bool, index_url: str) -> dict[str, str]:
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(uv).exists() and shutil.which("uv") is None:
        raise LockError("uv is not installed; pip install uv (it is in the dev extra)")
    with tempfile.TemporaryDirectory() as folder:
        output = seed_file(Path(folder), torch_version)
        constraint = Path(folder) / "torch.txt"
        constraint.write_text(f"torch=={torch_version}\n")
        command = uv_command(uv, output, torch_version, upgrade=upgrade, index_url=index_url)
        command += ["--constraint", str(constraint)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise LockError(f"uv pip compile failed:\n{result.stderr[-3000:]}")
        return parse_lock(output.read_text())


def check_against_venv() -> list[str]:
    """Offline: the locks are well-formed and the venv runs exactly the locked versions."""
    problems = []
    text = LOCK_PATH.read_text()
    torch_locked = locked_torch_version(text)
    if torch_locked != tested_torch_version():
        problems.append(f"lock records torch {torch_locked}, the venv has {tested_torch_version()}")
    for name, version in parse_lock(text).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}=={version} is locked but not installed")
            continue
        if installed != version:
            problems.append(f"{name}: locked {version}, installed {installed}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="offline: locks match the venv")
    parser.add_argument("--upgrade", action="store_true", help="allow newer versions")
    parser.add_argument("--index-url", default=DEFAULT_INDEX, help="package index (a mirror)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check_against_venv()
            for problem in problems:
                print(problem, file=sys.stderr)
            if problems:
                print("regenerate: docker/lock_requirements.py, then scripts/setup_env.sh")
                return 1
            print(
                f"{LOCK_PATH.name} matches the venv ({len(parse_lock(LOCK_PATH.read_text()))} pins)"
            )
            return 0
        torch_version = tested_torch_version()
        main_pins, cuda_pins = split_pins(
            resolve(torch_version, upgrade=args.upgrade, index_url=args.index_url)
        )
    except LockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    LOCK_PATH.write_text(render_lock(main_pins, torch_version))
    CUDA_LOCK_PATH.write_text(render_cuda_lock(cuda_pins, torch_version))
    print(
        f"wrote {LOCK_PATH.name} ({len(main_pins)} pins), {CUDA_LOCK_PATH.name} ({len(cuda_pins)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
