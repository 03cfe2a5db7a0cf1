"""``tplr shards upload DIR URL``: publish a prepared dataset folder, manifest last.

Order of operations, so a reader of the prefix never sees a manifest that names a
missing or stale file:

1. check every file the local ``manifest.json`` names: its key is a safe relative key, it
   resolves (through any symlink) under the folder, and it exists with the recorded size
   (so a manifest naming ``../.env``, or a link to it, uploads nothing);
2. delete the destination's old ``manifest.json`` (if any);
3. upload the files (multipart, retried, ETag-checked: :func:`tplr.comms.upload.upload_file`),
   ``concurrency`` files at a time;
4. upload ``manifest.json``, last.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from tplr.comms.manifest import MANIFEST_NAME, Manifest, ManifestError, read_manifest
from tplr.comms.retry import retry
from tplr.comms.stores.base import ObjectStore
from tplr.comms.transfer_config import TransferConfig
from tplr.comms.upload import Progress, UploadResult, upload_file
from tplr.errors import ConfigError
from tplr.untrusted import MalformedInput, resolve_under

NOTHING_UPLOADED = "nothing was uploaded"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DatasetUpload:
    files: list[UploadResult]
    manifest: UploadResult

    @property
    def total_bytes(self) -> int:
        return sum(r.size for r in self.files) + self.manifest.size


def local_dataset(src_dir: Path) -> tuple[Manifest, dict[str, Path]]:
    """The folder's manifest and ``{key: file}`` for every file it names, each checked:
    a safe key, resolving under ``src_dir``, present with the recorded size."""
    manifest_path = src_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ConfigError(
            f"{src_dir} has no {MANIFEST_NAME}",
            hint="upload a folder written by `tplr shards prepare`/`convert`, or run "
            "`tplr manifest DIR` first",
        )
    try:
        manifest = read_manifest(_under(src_dir, MANIFEST_NAME))
    except ManifestError as exc:
        raise ManifestError(
            f"{exc.message}; {NOTHING_UPLOADED}", location=exc.location, hint=exc.hint
        ) from None
    paths: dict[str, Path] = {}
    for key, entry in manifest.files.items():
        path = _under(src_dir, key)
        if not path.is_file():
            raise ConfigError(
                f"{path} is named by {manifest_path} but does not exist",
                hint=f"re-create the dataset folder; {NOTHING_UPLOADED}",
            )
        size = path.stat().st_size
        if size != entry.size:
            raise ConfigError(
                f"{path} is {size} bytes but {manifest_path} records {entry.size}",
                hint="the folder changed after the manifest was written; regenerate it",
            )
        paths[key] = path
    return manifest, paths


def _under(src_dir: Path, key: str) -> Path:
    """``src_dir / key`` resolved, refused (ConfigError) if it is not inside ``src_dir``."""
    try:
        return resolve_under(src_dir, key, what=f"{MANIFEST_NAME} entry")
    except MalformedInput as exc:
        raise ConfigError(
            f"{exc.message}; {NOTHING_UPLOADED}",
            hint="upload only files inside the dataset folder: fix the manifest (`tplr "
            "manifest DIR`) or replace the symlink by the file itself",
        ) from None


def dataset_prefix(key: str) -> str:
    """A URL key as a folder prefix: ``""`` or ending in ``/``."""
    return key if not key or key.endswith("/") else key + "/"


async def upload_dataset(
    store: ObjectStore,
    src_dir: Path,
    prefix: str,
    *,
    config: TransferConfig | None = None,
    concurrency: int = 2,
    progress: Progress | None = None,
) -> DatasetUpload:
    """Upload the files of ``src_dir``'s manifest under ``prefix``, then the manifest."""
    config = config or TransferConfig()
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
    prefix = dataset_prefix(prefix)
    manifest, paths = await asyncio.to_thread(local_dataset, src_dir)
    manifest_key = prefix + MANIFEST_NAME
    await retry(
        lambda: store.delete(manifest_key),
        config.retry_policy(),
        describe=f"DELETE {store.url(manifest_key)}",
    )
    slots = asyncio.Semaphore(concurrency)

    async def one(name: str, path: Path) -> UploadResult:
        async with slots:
            key = prefix + name
            result = await upload_file(store, path, key, config=config, progress=progress)
            log.info("uploaded %s -> %s", path, store.url(key))
            return result

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(name, path)) for name, path in paths.items()]
    results = [task.result() for task in tasks]
    # Only now, with every file in place, does the manifest appear.
    manifest_result = await upload_file(
        store, src_dir / MANIFEST_NAME, manifest_key, config=config, progress=progress
    )
    log.info("published %s (%d files)", store.url(manifest_key), len(manifest.files))
    return DatasetUpload(results, manifest_result)


async def _upload_command(args: argparse.Namespace, config: TransferConfig) -> DatasetUpload:
    from tplr.comms.progress import make_progress
    from tplr.comms.stores.url import open_store_for_url

    _, paths = await asyncio.to_thread(local_dataset, args.src)
    files = [*paths.values(), args.src / MANIFEST_NAME]
    total = await asyncio.to_thread(lambda: sum(p.stat().st_size for p in files))
    bar = make_progress(False if args.no_progress else None)
    bar.start(f"upload {args.src.name}", total, 0)
    try:
        async with open_store_for_url(
            args.url,
            endpoint_url=args.endpoint_url,
            transfer=config,
            max_connections=max(16, args.concurrency * (config.upload_max_workers + 2)),
            access="write",
        ) as (store, key):
            return await upload_dataset(
                store,
                args.src,
                key,
                config=config,
                concurrency=args.concurrency,
                progress=bar.advance,
            )
    finally:
        bar.close()


def transfer_config_from_env() -> TransferConfig:
    """``UPLOAD_*`` / ``TRANSFER_*`` settings, with errors naming the variable."""
    try:
        return TransferConfig()
    except ValidationError as exc:
        problems = "; ".join(
            f"{str(err['loc'][0]).upper()}: {err['msg']} (got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise ConfigError(
            f"invalid transfer settings: {problems}", hint="fix or unset those variables"
        ) from None


def run_upload_command(args: argparse.Namespace) -> int:
    config = transfer_config_from_env()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        result = asyncio.run(_upload_command(args, config))
    else:
        result = uvloop.run(_upload_command(args, config))
    print(
        f"uploaded {len(result.files)} file(s) and {MANIFEST_NAME} ({result.total_bytes} bytes) "
        f"to {args.url}"
    )
    return 0
