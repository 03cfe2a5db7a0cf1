"""``tplr fetch URL DEST``: download one object with the transfer engine.

Credentials come from the environment (see :mod:`tplr.comms.stores.url`); ``file://``
URLs and plain paths read a local store, ``https://`` and ``hf://`` URLs a web server or
the dataset hub. Tuning comes from ``DOWNLOAD_MAX_WORKERS`` /
``DOWNLOAD_PART_SIZE`` and the ``TRANSFER_*`` variables, overridden by the flags.
The last line is a summary (bytes, seconds, MB/s, retries); a failure is one line and a
hint (``tplr.cli.main`` prints it), and an interrupted fetch resumes when run again.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from tplr.errors import ConfigError
from tplr.units import format_size, parse_size

EXIT_TERMINATED = 143
DEFAULT_CHECKPOINT_INTERVAL_S = (
    5.0  # as in tplr.comms.download.engine, not imported for --help speed
)
_FLAG_FOR_FIELD = {"download_max_workers": "--workers", "download_part_size": "--part-size"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fetch",
        help="download one object (parallel, resumable, verified)",
        description="Download s3://BUCKET/KEY, https://HOST/PATH or"
        " hf://datasets/OWNER/REPO/PATH (or file:///path) to DEST. A DEST that is a"
        " folder means DEST/basename(KEY). Interrupted downloads resume from DEST.partial."
        " hf:// uses HF_ENDPOINT and HF_TOKEN; TPLR_CA_BUNDLE adds a CA to trust.",
    )
    p.add_argument(
        "url",
        help="s3://BUCKET/KEY, https://HOST/PATH, hf://datasets/OWNER/REPO[@REV]/PATH,"
        " file:///abs/path or a local path",
    )
    p.add_argument(
        "dest",
        help="destination file, or a folder (an existing one, or any path ending in '/')",
    )
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (overrides the env's)")
    p.add_argument("--workers", type=int, default=None, help="parallel part requests")
    p.add_argument("--part-size", default=None, help="bytes per part, e.g. 32MiB")
    p.add_argument(
        "--verify",
        choices=["auto", "none", "size", "etag", "manifest"],
        default="auto",
        help="auto: manifest if given, else the MD5 ETag when it has one, else size",
    )
    p.add_argument("--manifest", default=None, help="manifest.json: a local file or a URL")
    p.add_argument(
        "--manifest-key",
        default=None,
        help="the object's entry in the manifest (default: found from the key)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    p.add_argument(
        "--fsync", action="store_true", help="flush the file to disk before publishing it"
    )
    p.add_argument(
        "--checkpoint-interval",
        type=float,
        default=DEFAULT_CHECKPOINT_INTERVAL_S,
        metavar="SECONDS",
        help="how often completed parts are made durable and journaled for resume"
        f" (default {DEFAULT_CHECKPOINT_INTERVAL_S:g})",
    )
    p.set_defaults(func=_cmd_fetch)


def transfer_config_from(args: argparse.Namespace):
    """``TransferConfig`` from the environment, with the flags given on top, validated."""
    from tplr.comms.transfer_config import TransferConfig

    overrides: dict[str, object] = {}
    if args.workers is not None:
        overrides["download_max_workers"] = args.workers
    if args.part_size is not None:
        try:
            overrides["download_part_size"] = parse_size(args.part_size)
        except ValueError as exc:
            raise ConfigError(f"--part-size: {exc}") from None
    try:
        return TransferConfig(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "?"
        names = f"{field.upper()} / {_FLAG_FOR_FIELD[field]}" if field in _FLAG_FOR_FIELD else field
        raise ConfigError(
            f"invalid {names}: {error['msg']} (got {error.get('input')!r})",
            hint="fix the environment variable or the flag",
        ) from None


def _cmd_fetch(args: argparse.Namespace) -> int:
    import uvloop

    config = transfer_config_from(args)
    if not args.checkpoint_interval > 0:
        raise ConfigError(
            "--checkpoint-interval must be a positive number of seconds,"
            f" got {args.checkpoint_interval}"
        )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            return runner.run(_fetch_until_signal(args, config))
        except asyncio.CancelledError:
            _print_kept(args)
            return EXIT_TERMINATED
        except KeyboardInterrupt:
            _print_kept(args)
            raise


def _print_kept(args: argparse.Namespace) -> None:
    print(
        f"interrupted: progress kept beside {args.dest}; run the same command to resume",
        file=sys.stderr,
    )


async def _fetch_until_signal(args: argparse.Namespace, config) -> int:
    """Run the fetch; SIGTERM cancels it cleanly (SIGINT is handled by asyncio.Runner)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await _fetch(args, config)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _read_local_manifest(source: str, read_manifest):
    path = Path(source.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise ConfigError(f"manifest {source} does not exist", hint="pass a manifest.json")
    return read_manifest(path)


async def _load_manifest(source: str, endpoint_url: str | None, config):
    from tplr.comms.manifest import Manifest, read_manifest
    from tplr.comms.stores.url import open_store_for_url

    if "://" not in source or source.startswith("file:"):
        return await asyncio.to_thread(_read_local_manifest, source, read_manifest)
    opened = open_store_for_url(
        source, endpoint_url=endpoint_url, transfer=config, signed_reads=True
    )
    async with opened as (s, k):
        return Manifest.from_json(await s.get(k), source=source)


async def _fetch(args: argparse.Namespace, config) -> int:
    from tplr.comms.download.engine import download
    from tplr.comms.download.plan import MAX_AUTO_WORKERS
    from tplr.comms.stores.url import open_store_for_url

    dest = Path(args.dest)
    if args.dest.endswith(("/", os.sep)):
        # "DIR/" names a folder, new or not
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
    manifest = None
    if args.manifest:
        manifest = await _load_manifest(args.manifest, args.endpoint_url, config)
    connections = (config.download_max_workers or MAX_AUTO_WORKERS) + 2  # parts + a HEAD
    async with open_store_for_url(
        args.url,
        endpoint_url=args.endpoint_url,
        transfer=config,
        max_connections=connections,
        signed_reads=True,  # presigned HEAD and GETs: no S3 client to start
    ) as (store, key):
        gc.freeze()  # imports and the client's service model: never garbage, never rescanned
        result = await download(
            store,
            key,
            dest,
            config=config,
            manifest=manifest,
            manifest_key=args.manifest_key,
            verify=args.verify,
            progress=False if args.no_progress else None,
            fsync_on_publish=args.fsync,
            checkpoint_interval_s=args.checkpoint_interval,
        )
    resumed = ""
    if result.resumed_bytes:
        resumed = (
            f", {result.parts_resumed} parts resumed ({format_size(result.resumed_bytes)} kept,"
            f" re-verified in {result.reverify_seconds:.2f} s)"
        )
    note = f" ({result.note})" if result.note else ""
    print(
        f"fetched {store.url(key)} -> {result.path}: {format_size(result.size)}"
        f" ({result.size} bytes) in {result.seconds:.2f} s, {result.megabytes_per_second:.1f}"
        f" MB/s, {result.retries} retries, verified: {result.verified}{note}{resumed}"
    )
    return 0
