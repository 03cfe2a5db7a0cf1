"""The download engine: parallel, resumable, verified downloads of one object to a file.

``await download(store, key, dest)`` does, in order:

1. HEAD the object for its size and ETag (retried like every request).
2. Pick the verification (manifest part hashes, MD5 ETag, or size) and the part layout
   (:mod:`tplr.comms.download.plan`).
3. Resume from ``DEST.partial`` + its journal if they describe this object version, else
   check the free disk space and start afresh (:mod:`tplr.comms.download.sidecar`).
4. Fetch the missing parts concurrently, each one ranged GET pinned to the ETag with
   ``If-Match``, streamed into the sidecar by positioned writes in worker threads and
   hashed as it streams. A part that fails is retried alone with the one retry policy
   (:mod:`tplr.comms.retry`), sleeping outside its concurrency slot; a part whose hash
   mismatches the manifest is re-fetched alone. Progress is journaled in batches, after
   ``fdatasync``.
5. Verify the whole object (size, and ETag when that is the check), then publish by
   atomic rename. If the object was replaced meanwhile (``If-Match`` failed), the
   download starts over from HEAD; two versions are never mixed.

Cancellation (task cancel, SIGINT/SIGTERM in the CLI) stops every part task, writes a
final checkpoint so the next run resumes, and never leaves a file under the final name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from tplr.comms.buffers import BufferPool, TransferSlots
from tplr.comms.diskspace import FreeSpaceProbe
from tplr.comms.download.etag import parse_md5_etag, part_size_candidates
from tplr.comms.download.journal import JournalHeader
from tplr.comms.download.parts import (
    ObjectIntegrityError,
    ObjectReplaced,
    PartFetcher,
    Verification,
)
from tplr.comms.download.plan import (
    STREAM_FALLBACK_BUFFER_BYTES,
    DownloadPlan,
    plan_download,
)
from tplr.comms.download.sidecar import Resumed, Sidecar
from tplr.comms.download.source import range_source
from tplr.comms.download.streams import AdaptiveStreams
from tplr.comms.errors import IntegrityError, PreconditionFailed
from tplr.comms.manifest import Manifest
from tplr.comms.progress import Progress, make_progress
from tplr.comms.retry import reason_of, retry
from tplr.comms.stores.base import ObjectInfo, ObjectStore
from tplr.comms.transfer_config import TransferConfig
from tplr.comms.transfer_metrics import TransferMetrics, default_transfer_metrics
from tplr.errors import ConfigError

log = logging.getLogger(__name__)

VerifyMode = Literal["none", "size", "etag", "manifest", "auto"]
VERIFY_MODES = ("none", "size", "etag", "manifest", "auto")
MAX_RESTARTS = 3
DEFAULT_CHECKPOINT_INTERVAL_S = 5.0


@dataclass(frozen=True, slots=True)
class DownloadResult:
    key: str
    path: Path
    size: int  # bytes of the object
    fetched_bytes: int  # bytes fetched by this run (resumed parts excluded)
    seconds: float
    retries: int
    parts_resumed: int
    etag: str
    verified: str  # what was checked: "manifest", "etag", "size" or "none"
    note: str = ""  # why a requested check could not be made, if so
    resumed_bytes: int = 0  # bytes kept from an earlier run (re-verified from disk)
    reverify_seconds: float = 0.0  # time spent re-hashing them
    peak_streams: int = 0  # the most requests in flight at once

    @property
    def megabytes_per_second(self) -> float:
        return self.fetched_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def resolve_dest(dest: Path | str, key: str) -> Path:
    """``dest``, or ``dest/basename(key)`` when ``dest`` is an existing folder."""
    path = Path(dest).expanduser()
    if path.is_dir():
        return path / PurePosixPath(key).name
    return path


def manifest_entry_name(manifest: Manifest, key: str, manifest_key: str | None) -> str:
    """The manifest entry describing ``key``: ``manifest_key`` if given, else the key
    itself, else the longest entry that ends the key (entries are relative paths)."""
    if manifest_key is not None:
        manifest.entry(manifest_key)  # raises IntegrityError naming it if absent
        return manifest_key
    if key in manifest.files:
        return key
    matches = [name for name in manifest.files if key.endswith("/" + name)]
    if not matches:
        raise IntegrityError(
            f"the manifest has no entry for {key!r}",
            location=key,
            hint="pass the entry name (manifest_key / --manifest-key) or the right manifest",
        )
    return max(matches, key=len)


def default_config() -> TransferConfig:
    """Built-in defaults without reading the environment (callers pass env-built configs)."""
    return TransferConfig.model_construct()


async def download(
    store: ObjectStore,
    key: str,
    dest: Path | str,
    *,
    config: TransferConfig | None = None,
    manifest: Manifest | None = None,
    manifest_key: str | None = None,
    verify: VerifyMode = "auto",
    metrics: TransferMetrics | None = None,
    progress: Progress | bool | None = None,
    free_space_probe: FreeSpaceProbe | None = None,
    slots: TransferSlots | None = None,
    checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S,
    fsync_on_publish: bool = False,
) -> DownloadResult:
    """Download ``key`` from ``store`` to ``dest`` (see the module doc).

    ``slots`` shares one concurrency budget between several downloads (default: one of
    ``workers`` slots for this download). ``fsync_on_publish`` also flushes the data to
    disk before the rename (durable against power loss, at the cost of a full flush).
    Raises ``NotFound``/``AccessDenied``/``InvalidRequest`` at once, ``IntegrityError``
    on a mismatch that persists, ``InsufficientSpace`` before writing if the disk is too
    small, and the last transient error once the retry budget is spent.
    """
    if verify not in VERIFY_MODES:
        raise ConfigError(f"verify={verify!r} is not one of {', '.join(VERIFY_MODES)}")
    if verify == "manifest" and manifest is None:
        raise ConfigError(
            "verify='manifest' needs a manifest", hint="pass --manifest FILE_OR_URL or verify=etag"
        )
    if not key or key.endswith("/"):
        raise ConfigError(
            f"{store.url(key)} names a folder, not an object", hint="name one object's key"
        )
    if not checkpoint_interval_s > 0:
        raise ConfigError(f"checkpoint_interval_s must be > 0, got {checkpoint_interval_s}")
    job = _Download(
        store,
        key,
        await asyncio.to_thread(resolve_dest, dest, key),
        config=config or default_config(),
        manifest=manifest if verify in ("manifest", "auto") else None,
        manifest_key=manifest_key,
        verify=verify,
        metrics=metrics or default_transfer_metrics(),
        progress=make_progress(progress),
        probe=free_space_probe,
        slots=slots,
        checkpoint_interval_s=checkpoint_interval_s,
        fsync_on_publish=fsync_on_publish,
    )
    with job.metrics.track_active("download"):
        return await job.run()


class _Download:
    """One download, possibly restarted from HEAD if the object is replaced meanwhile."""

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        dest: Path,
        *,
        config: TransferConfig,
        manifest: Manifest | None,
        manifest_key: str | None,
        verify: VerifyMode,
        metrics: TransferMetrics,
        progress: Progress,
        probe: FreeSpaceProbe | None,
        slots: TransferSlots | None,
        checkpoint_interval_s: float,
        fsync_on_publish: bool,
    ) -> None:
        self.store, self.key, self.dest = store, key, dest
        self.config = config
        self.manifest, self.manifest_key = manifest, manifest_key
        self.verify = verify
        self.metrics = metrics
        self.progress = progress
        self.probe = probe
        self.shared_slots = slots
        self.checkpoint_interval_s = checkpoint_interval_s
        self.fsync_on_publish = fsync_on_publish
        self.policy = config.retry_policy()
        self.location = store.url(key)
        self.retries = 0

    def on_retry(self, error: Exception, attempt: int, delay_s: float) -> None:
        self.retries += 1
        reason = "integrity" if isinstance(error, IntegrityError) else reason_of(error)
        self.metrics.observe_retry("download", reason)
        log.info("%s: retrying in %.1fs after: %s", self.location, delay_s, error)

    async def run(self) -> DownloadResult:
        started = time.monotonic()
        for restart in range(MAX_RESTARTS + 1):
            try:
                return await self.run_once(started)
            except ObjectReplaced as exc:
                if restart == MAX_RESTARTS:
                    raise PreconditionFailed(
                        f"{self.location} kept changing while it was downloaded"
                        f" ({MAX_RESTARTS + 1} attempts)",
                        location=self.location,
                        hint="wait until the object is no longer being rewritten, then retry",
                    ) from exc
                log.warning("%s was replaced during the download; starting over", self.location)
        raise AssertionError("unreachable")

    async def head(self) -> ObjectInfo:
        async def attempt() -> ObjectInfo:
            self.metrics.observe_request("download")
            return await self.store.head(self.key)

        return await retry(attempt, self.policy, describe=f"HEAD {self.location}")

    async def run_once(self, started: float) -> DownloadResult:
        info = await self.head()
        verification = self.choose_verification(info)
        plan = plan_download(
            info.size,
            part_size=self.config.download_part_size,
            workers=self.config.download_max_workers,
            fixed_part_size=verification.fixed_part_size(self.config.download_part_size),
        )
        sidecar = Sidecar(self.dest, JournalHeader(self.key, info.size, info.etag, plan.part_size))
        await asyncio.to_thread(self.dest.parent.mkdir, parents=True, exist_ok=True)
        resumed = await asyncio.to_thread(
            sidecar.open,
            self.probe,
            md5=verification.wants_part_md5(plan.part_size),
            expected=verification.expected_part_hash,
        )
        kept = resumed.kept_bytes(sidecar.header)
        if kept:
            log.info(
                "%s: resuming with %d bytes (%d of %d parts complete), re-verified in %.2f s",
                self.location,
                kept,
                len(resumed.done),
                plan.part_count,
                resumed.verify_seconds,
            )
        self.progress.start(PurePosixPath(self.key).name, info.size, kept)
        try:
            checked, note, streams = await self.transfer(info, plan, verification, sidecar, resumed)
        except (ObjectReplaced, ObjectIntegrityError):
            await asyncio.to_thread(sidecar.discard)  # nothing of it can be trusted
            raise
        finally:
            self.progress.close()
            await asyncio.to_thread(sidecar.close)
        return DownloadResult(
            key=self.key,
            path=self.dest,
            size=info.size,
            fetched_bytes=info.size - kept,
            seconds=time.monotonic() - started,
            retries=self.retries,
            parts_resumed=len(resumed.done),
            etag=info.etag,
            verified=checked,
            note=note,
            resumed_bytes=kept,
            reverify_seconds=resumed.verify_seconds,
            peak_streams=streams,
        )

    async def transfer(
        self,
        info: ObjectInfo,
        plan: DownloadPlan,
        verification: Verification,
        sidecar: Sidecar,
        resumed: Resumed,
    ) -> tuple[str, str, int]:
        """Fetch the missing parts, verify the object and publish it."""
        slots = self.shared_slots or TransferSlots(plan.workers)
        streams = min(slots.limit, plan.workers)
        async with range_source(self.store, self.key, self.config, streams=streams) as source:
            fetcher = PartFetcher(
                store=self.store,
                key=self.key,
                etag=info.etag,
                sidecar=sidecar,
                verification=verification,
                part_md5=verification.wants_part_md5(plan.part_size),
                policy=self.policy,
                metrics=self.metrics,
                progress=self.progress,
                slots=slots,
                pool=BufferPool(slots.limit, min(plan.piece_size, STREAM_FALLBACK_BUFFER_BYTES)),
                source=source,
                on_retry=self.on_retry,
                piece_size=plan.piece_size or plan.part_size,
            )
            missing = [p for p in plan.parts() if p.index not in resumed.done]
            queue = fetcher.requests(missing, resumed)
            streams = AdaptiveStreams(
                queue,
                lambda run: fetcher.fetch(run, queue),
                take=fetcher.take,
                max_streams=plan.workers,
                bytes_done=lambda: fetcher.written_bytes,
            )
            await self.fetch(streams, sidecar)
        records = {**resumed.done, **fetcher.completed}
        checked, note = await verification.verify_object(sidecar, info, records, plan)
        await asyncio.to_thread(sidecar.publish, fsync=self.fsync_on_publish)
        return checked, note, streams.peak_streams

    def choose_verification(self, info: ObjectInfo) -> Verification:
        mode = self.verify
        if mode == "auto":
            mode = "manifest" if self.manifest is not None else "etag"
        entry = None
        if mode == "manifest":
            assert self.manifest is not None
            name = manifest_entry_name(self.manifest, self.key, self.manifest_key)
            entry = self.manifest.entry(name)
            if entry.size != info.size:
                raise IntegrityError(
                    f"the manifest says {name} has {entry.size} bytes but {self.location}"
                    f" has {info.size}",
                    location=self.location,
                    hint="the manifest is stale: fetch the current manifest or regenerate it",
                )
        etag = parse_md5_etag(info.etag) if mode == "etag" else None
        note = ""
        if mode == "etag" and etag is None:
            note = f"the ETag {info.etag!r} is not MD5-based, so only the size was verified"
            (log.warning if self.verify == "etag" else log.info)("%s: %s", self.location, note)
            mode = "size"
        candidates = part_size_candidates(info.size, etag.parts) if etag and etag.parts else []
        return Verification(
            mode=mode,
            location=self.location,
            manifest_part_size=self.manifest.part_size if entry is not None else None,
            manifest_parts=entry.parts if entry is not None else None,
            etag=etag,
            etag_part_sizes=candidates,
            note=note,
            metrics=self.metrics,
        )

    async def fetch(self, streams: AdaptiveStreams, sidecar: Sidecar) -> None:
        """Run the streams; flush progress periodically and on any exit but success."""
        all_fetched = asyncio.Event()

        async def checkpoint_periodically() -> None:
            while not all_fetched.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.checkpoint_interval_s):
                        await all_fetched.wait()
                if not all_fetched.is_set():
                    await asyncio.to_thread(sidecar.checkpoint)

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(checkpoint_periodically())
                await streams.run()
                all_fetched.set()
        except BaseException as exc:
            # Keep what was written for the next run, even while being cancelled.
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.to_thread(sidecar.checkpoint))
            if isinstance(exc, BaseExceptionGroup):
                raise first_error(exc) from None
            raise


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real failure in a task group's exceptions (not a sibling's cancellation)."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending[:0] = list(exc.exceptions)
        else:
            leaves.append(exc)
    for leaf in leaves:
        if not isinstance(leaf, asyncio.CancelledError):
            return leaf
    return leaves[0]
