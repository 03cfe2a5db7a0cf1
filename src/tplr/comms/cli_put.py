"""``tplr put SRC DEST``: upload one local file to S3/R2 or a local store, verified."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from tplr.comms.transfer_config import TransferConfig
from tplr.comms.upload import UploadResult, upload_file
from tplr.errors import ConfigError
from tplr.units import format_size, parse_size

EXIT_TERMINATED = 143

_FLAG_OF_FIELD = {
    "upload_max_workers": "--workers (UPLOAD_MAX_WORKERS)",
    "upload_part_size": "--part-size (UPLOAD_PART_SIZE)",
    "upload_multipart_threshold": "--multipart-threshold (UPLOAD_MULTIPART_THRESHOLD)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "put",
        help="upload a local file to s3://BUCKET/KEY (R2, S3, MinIO) or a local store",
        description=(
            "Upload SRC to DEST: one PUT for small files, parallel multipart with equal-size"
            " parts above the threshold, every request retried, the result checked against"
            " local MD5s, and an interrupted upload aborted on the server. Credentials come"
            " from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (+ AWS_ENDPOINT_URL), or the R2_*"
            " variables of the bucket whose R2_*_BUCKET_NAME matches DEST."
        ),
    )
    p.add_argument("src", type=Path, help="the local file to upload")
    p.add_argument(
        "dest",
        help="s3://BUCKET/KEY, file:///absolute/path or a local path; a KEY that is empty"
        " or ends in '/' gets SRC's file name appended",
    )
    p.add_argument(
        "--endpoint-url",
        default=None,
        help="S3 endpoint URL; overrides AWS_ENDPOINT_URL, R2_*_ENDPOINT_URL and the R2"
        " endpoint built from the account id",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="parts uploaded in parallel (default UPLOAD_MAX_WORKERS, else 8)",
    )
    p.add_argument(
        "--part-size",
        type=parse_size,
        default=None,
        help="multipart part size, e.g. 64MiB (default UPLOAD_PART_SIZE, else 64MiB; grows"
        " by itself to keep at most 10,000 parts)",
    )
    p.add_argument(
        "--multipart-threshold",
        type=parse_size,
        default=None,
        help="files this large or larger go multipart (default UPLOAD_MULTIPART_THRESHOLD,"
        " else 64MiB)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the ETag check, for servers whose ETags are not MD5s (AWS SSE-KMS)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=_cmd_put)


def transfer_config_from_args(args: argparse.Namespace) -> TransferConfig:
    """``TransferConfig`` from the environment, with the flags given on top."""
    overrides = {
        "upload_max_workers": args.workers,
        "upload_part_size": args.part_size,
        "upload_multipart_threshold": args.multipart_threshold,
    }
    try:
        return TransferConfig(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{_FLAG_OF_FIELD.get(str(err['loc'][0]), str(err['loc'][0]).upper())}:"
            f" {err['msg']} (got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise ConfigError(
            f"invalid transfer settings: {problems}",
            hint="see 'tplr put --help' for the allowed values",
        ) from None


def destination_url(dest: str, src: Path) -> str:
    """``s3://bucket/``, ``s3://bucket/dir/`` or an existing local folder means: keep the
    source's file name."""
    if dest.endswith("/") or (dest.startswith("s3://") and "/" not in dest[5:]):
        return dest.rstrip("/") + "/" + src.name
    if "://" not in dest and Path(dest).is_dir():
        return str(Path(dest) / src.name)
    return dest


async def _put(
    args: argparse.Namespace, config: TransferConfig, url: str, size: int
) -> UploadResult:
    from tplr.comms.progress import make_progress
    from tplr.comms.stores.url import open_store_for_url

    async with open_store_for_url(
        url,
        endpoint_url=args.endpoint_url,
        transfer=config,
        max_connections=max(16, config.upload_max_workers + 2),
        access="write",
    ) as (store, key):
        progress = make_progress(False if args.no_progress else None)
        progress.start(f"put {args.src.name}", size, 0)
        try:
            return await upload_file(
                store,
                args.src,
                key,
                config=config,
                progress=progress.advance,
                verify_etag=not args.no_verify,
            )
        finally:
            progress.close()


def _cmd_put(args: argparse.Namespace) -> int:
    import uvloop

    src: Path = args.src
    if not src.is_file():
        problem = "is not a regular file" if src.exists() else "does not exist"
        raise ConfigError(f"source {src} {problem}", hint="name one local file to upload")
    config = transfer_config_from_args(args)
    url = destination_url(args.dest, src)
    size = src.stat().st_size
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:  # Ctrl-C: the Runner cancels the upload (which aborts), then KeyboardInterrupt
            result = runner.run(_put_until_sigterm(args, config, url, size))
        except asyncio.CancelledError:
            print("terminated: the upload was aborted, nothing was published", file=sys.stderr)
            return EXIT_TERMINATED
    print(
        f"put {src} -> {url}: {result.size} bytes ({format_size(result.size)}) in"
        f" {result.seconds:.2f} s, {result.megabytes_per_second:.1f} MB/s,"
        f" {result.retries} retries, {result.parts} part(s), ETag {result.etag}"
    )
    return 0


async def _put_until_sigterm(
    args: argparse.Namespace, config: TransferConfig, url: str, size: int
) -> UploadResult:
    """SIGTERM cancels the upload like Ctrl-C does, so a multipart upload gets aborted."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await _put(args, config, url, size)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
