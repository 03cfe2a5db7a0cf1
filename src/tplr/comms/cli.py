"""``tplr fetch``, ``tplr put`` and ``tplr manifest``."""

from __future__ import annotations

import argparse
from pathlib import Path

from tplr.comms import cli_fetch, cli_put
from tplr.units import parse_size


def register(subparsers: argparse._SubParsersAction) -> None:
    cli_fetch.register(subparsers)
    cli_put.register(subparsers)
    p = subparsers.add_parser(
        "manifest",
        help="write manifest.json (sizes, per-part hashes) for local files",
        description="Hash a directory (or one file) and write manifest.json beside it.",
    )
    p.add_argument("path", type=Path, help="directory (every file below it) or a single file")
    p.add_argument(
        "--part-size", type=parse_size, default=None, help="bytes per hashed part (default 32MiB)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="manifest path (default DIR/manifest.json)"
    )
    p.set_defaults(func=_cmd_manifest)


def _cmd_manifest(args: argparse.Namespace) -> int:
    from tplr.comms.manifest import (
        DEFAULT_PART_SIZE,
        MANIFEST_NAME,
        build_manifest,
        write_manifest_atomic,
    )
    from tplr.errors import ConfigError

    path: Path = args.path
    if not path.exists():
        raise ConfigError(f"{path} does not exist", hint="pass a directory or a file")
    root, files = (path, None) if path.is_dir() else (path.parent, [path])
    manifest = build_manifest(root, files, part_size=args.part_size or DEFAULT_PART_SIZE)
    out = args.out or root / MANIFEST_NAME
    write_manifest_atomic(manifest, out)
    total = sum(e.size for e in manifest.files.values())
    print(f"wrote {out}: {len(manifest.files)} files, {total} bytes")
    return 0
