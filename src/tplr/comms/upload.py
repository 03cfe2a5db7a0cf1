"""Uploads: a single PUT for small objects, parallel multipart with equal-size parts above
``upload_multipart_threshold``; every request retried by :mod:`tplr.comms.retry`, every
result checked against local MD5s, and nothing left behind on failure.

Multipart in detail:

- Parts are all ``part_size`` bytes except a smaller last one (R2 rejects anything else).
  The part size starts at ``upload_part_size`` and grows, in whole MiB, so that an object
  never needs more than 10,000 parts.
- Parts are read with positioned reads (``os.pread``) and hashed in worker threads; at
  most ``upload_max_workers + 2`` parts are in memory at once, so memory stays at
  ``(workers + 2) * part_size`` whatever the file size.
- At most ``upload_max_workers`` part requests are in flight. A part waiting to retry
  sleeps outside that slot. A part whose ETag is not its MD5 (corrupted in transit) is
  sent again.
- If the source file changes while it is being uploaded, or a part fails for good, or the
  task is cancelled, the multipart upload is aborted: no orphaned parts keep costing money.
- The final ETag must equal ``md5(concat(part md5 digests))-N``, else ``IntegrityError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from tplr.comms.errors import IntegrityError, InvalidRequest, NotFound, StoreError
from tplr.comms.retry import RetryPolicy, reason_of, retry
from tplr.comms.stores.base import CompletedPart, ObjectInfo, ObjectStore
from tplr.comms.stores.local import multipart_etag
from tplr.comms.transfer_config import TransferConfig

T = TypeVar("T")
log = logging.getLogger(__name__)

MiB = 1024 * 1024
MAX_PARTS = 10_000
MAX_PART_SIZE = 5 * 1024**3
MAX_SINGLE_PUT = 5 * 1024**3
EXTRA_PARTS_IN_MEMORY = 2
_ABORT_POLICY = RetryPolicy(max_attempts=3, base_delay_s=0.2, max_delay_s=1.0, total_timeout_s=15.0)

Progress = Callable[[int], None]
"""Called with the number of bytes just uploaded (increments, not totals)."""


class UploadMetrics(Protocol):
    """What the upload reports (``direction="upload"``); implemented by
    :class:`tplr.comms.transfer_metrics.TransferMetrics`."""

    def observe_part(self, direction: str, size_bytes: int, seconds: float) -> None: ...

    def observe_request(self, direction: str) -> None: ...

    def observe_retry(self, direction: str, reason: str) -> None: ...

    def observe_integrity_failure(self, direction: str) -> None: ...

    def track_active(self, direction: str) -> contextlib.AbstractContextManager[None]: ...


class _NoMetrics:
    def observe_part(self, direction: str, size_bytes: int, seconds: float) -> None:
        return None

    def observe_request(self, direction: str) -> None:
        return None

    def observe_retry(self, direction: str, reason: str) -> None:
        return None

    def observe_integrity_failure(self, direction: str) -> None:
        return None

    def track_active(self, direction: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


_NO_METRICS = _NoMetrics()


@dataclass(frozen=True, slots=True)
class UploadResult:
    key: str
    size: int
    etag: str
    seconds: float
    retries: int
    parts: int = 1

    @property
    def megabytes_per_second(self) -> float:
        return self.size / 1e6 / self.seconds if self.seconds > 0 else 0.0


def plan_part_size(size: int, configured_part_size: int) -> int:
    """Equal part size for ``size`` bytes: the configured one, grown in whole MiB so the
    object needs at most 10,000 parts."""
    needed = -(-size // MAX_PARTS)
    if needed <= configured_part_size:
        return configured_part_size
    part_size = -(-needed // MiB) * MiB
    if part_size > MAX_PART_SIZE:
        raise InvalidRequest(
            f"{size} bytes is too large for one object (at most {MAX_PARTS} parts of 5 GiB)",
            hint="split the file into several objects",
        )
    return part_size


class _Attempts:
    """Counts retries (for the result) and forwards them to metrics."""

    def __init__(self, metrics: UploadMetrics) -> None:
        self.retries = 0
        self._metrics = metrics

    def on_retry(self, error: StoreError, attempt: int, delay_s: float) -> None:
        self.retries += 1
        self._metrics.observe_request("upload")  # the failed attempt
        self._metrics.observe_retry("upload", reason_of(error))


async def upload_bytes(
    store: ObjectStore,
    data: bytes,
    key: str,
    *,
    config: TransferConfig | None = None,
    policy: RetryPolicy | None = None,
    metrics: UploadMetrics | None = None,
    verify_etag: bool = True,
) -> UploadResult:
    """One retried PUT of an in-memory payload (up to 5 GiB), checked against its MD5."""
    if len(data) > MAX_SINGLE_PUT:
        raise InvalidRequest(
            f"{len(data)} bytes is too large for one PUT to {store.url(key)}",
            hint="write it to a file and use upload_file (multipart)",
        )
    policy = policy or (config or TransferConfig()).retry_policy()
    metrics = metrics or _NO_METRICS
    attempts = _Attempts(metrics)
    started = time.monotonic()
    md5 = await asyncio.to_thread(lambda: hashlib.md5(data).hexdigest())

    async def attempt() -> ObjectInfo:
        info = await store.put(key, data)
        if verify_etag:
            _check_etag(store, key, got=info.etag, expected=md5, metrics=metrics)
        return info

    info = await retry(
        attempt,
        policy,
        describe=f"PUT {store.url(key)}",
        on_retry=attempts.on_retry,
        retry_on=(IntegrityError,),
    )
    seconds = time.monotonic() - started
    metrics.observe_part("upload", len(data), seconds)
    return UploadResult(key, len(data), info.etag, seconds, attempts.retries)


async def upload_file(
    store: ObjectStore,
    src: Path | str,
    key: str,
    *,
    config: TransferConfig | None = None,
    policy: RetryPolicy | None = None,
    metrics: UploadMetrics | None = None,
    progress: Progress | None = None,
    verify_etag: bool = True,
) -> UploadResult:
    """Upload ``src`` to ``key``: single PUT below the multipart threshold, else multipart.

    ``verify_etag=False`` is for servers whose ETags are not MD5s (AWS SSE-KMS/SSE-C).
    """
    config = config or TransferConfig()
    metrics = metrics or _NO_METRICS
    src = Path(src)
    before = await asyncio.to_thread(_stat_source, src)
    with metrics.track_active("upload"):
        if before.st_size < min(config.upload_multipart_threshold, MAX_SINGLE_PUT):
            data = await asyncio.to_thread(src.read_bytes)
            await asyncio.to_thread(_check_unchanged, src, before)
            result = await upload_bytes(
                store,
                data,
                key,
                config=config,
                policy=policy,
                metrics=metrics,
                verify_etag=verify_etag,
            )
            if progress is not None:
                progress(len(data))
            return result
        upload = _MultipartUpload(
            store,
            src,
            key,
            before,
            config=config,
            policy=policy or config.retry_policy(),
            metrics=metrics,
            progress=progress,
            verify_etag=verify_etag,
        )
        return await upload.run()


def _stat_source(src: Path) -> os.stat_result:
    try:
        st = src.stat()
    except FileNotFoundError:
        raise NotFound(
            f"source file {src} does not exist", location=str(src), hint="check the path"
        ) from None
    if not src.is_file():
        raise InvalidRequest(f"source {src} is not a regular file", location=str(src))
    return st


def _check_unchanged(src: Path, before: os.stat_result) -> None:
    after = src.stat()
    if (after.st_size, after.st_mtime_ns, after.st_ino) != (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    ):
        raise IntegrityError(
            f"{src} changed while it was being uploaded",
            location=str(src),
            hint="upload it again once nothing writes to it",
        )


def _check_etag(
    store: ObjectStore,
    key: str,
    *,
    got: str,
    expected: str,
    metrics: UploadMetrics,
    what: str = "",
) -> None:
    """An ETag other than the MD5 we computed means the server holds other bytes."""
    if got == expected:
        return
    metrics.observe_integrity_failure("upload")
    raise IntegrityError(
        f"{what}{store.url(key)} has ETag {got} after upload, expected {expected} from the"
        " local MD5s: the server received different bytes",
        location=store.url(key),
        hint="upload again; if it repeats, the server's ETags may not be MD5s"
        " (AWS SSE-KMS): turn ETag verification off",
    )


def _read_part(fd: int, offset: int, length: int, src: Path) -> tuple[bytes, str]:
    """Read ``length`` bytes of ``fd`` at ``offset`` (positioned reads) and their hex MD5.

    The part is returned as ``bytes`` on purpose: aiohttp sends ``bytes`` without
    copying, while a ``bytearray`` body is copied once more on the event loop.
    """
    data = os.pread(fd, length, offset)
    if len(data) < length:  # short reads are rare on regular files: collect the rest
        pieces = [data]
        received = len(data)
        while received < length:
            more = os.pread(fd, length - received, offset + received)
            if not more:
                raise IntegrityError(
                    f"{src} shrank while it was being uploaded (nothing at offset"
                    f" {offset + received})",
                    location=str(src),
                    hint="upload it again once nothing writes to it",
                )
            pieces.append(more)
            received += len(more)
        data = b"".join(pieces)
    return data, hashlib.md5(data).hexdigest()


def _primary_error(group: BaseExceptionGroup) -> BaseException:
    """The error that stopped a TaskGroup (not the cancellations it caused)."""

    def leaves(exc: BaseException) -> Iterator[BaseException]:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                yield from leaves(inner)
        else:
            yield exc

    for leaf in leaves(group):
        if not isinstance(leaf, asyncio.CancelledError):
            return leaf
    return group


class _MultipartUpload:
    """One multipart upload of a file; ``run()`` either publishes it or aborts it."""

    def __init__(
        self,
        store: ObjectStore,
        src: Path,
        key: str,
        stat: os.stat_result,
        *,
        config: TransferConfig,
        policy: RetryPolicy,
        metrics: UploadMetrics,
        progress: Progress | None,
        verify_etag: bool,
    ) -> None:
        self.store, self.src, self.key, self.stat = store, src, key, stat
        self.size = stat.st_size
        self.part_size = plan_part_size(self.size, config.upload_part_size)
        self.part_count = -(-self.size // self.part_size)
        self.workers = config.upload_max_workers
        self.policy, self.metrics = policy, metrics
        self.attempts = _Attempts(metrics)
        self.progress, self.verify_etag = progress, verify_etag
        self.slots = asyncio.Semaphore(self.workers)
        self.digests: list[str] = [""] * self.part_count  # local MD5s, for the final check
        self.part_etags: list[str] = [""] * self.part_count  # what the server answered
        self.where = store.url(key)

    async def _retried(self, attempt: Callable[[], Awaitable[T]], describe: str) -> T:
        return await retry(
            attempt,
            self.policy,
            describe=describe,
            on_retry=self.attempts.on_retry,
            retry_on=(IntegrityError,) if self.verify_etag else (),
        )

    async def run(self) -> UploadResult:
        started = time.monotonic()
        upload_id = await self._retried(
            lambda: self.store.create_multipart(self.key), f"start upload of {self.where}"
        )
        self.metrics.observe_request("upload")
        try:
            await self._upload_parts(upload_id)
            await asyncio.to_thread(_check_unchanged, self.src, self.stat)
            info = await self._complete(upload_id)
            self.metrics.observe_request("upload")
        except BaseException:
            await self._abort(upload_id)
            raise
        expected = multipart_etag(self.digests)
        if self.verify_etag:
            _check_etag(
                self.store, self.key, got=info.etag, expected=expected, metrics=self.metrics
            )
        return UploadResult(
            self.key,
            self.size,
            info.etag,
            time.monotonic() - started,
            self.attempts.retries,
            self.part_count,
        )

    async def _upload_parts(self, upload_id: str) -> None:
        parts_in_memory = asyncio.Semaphore(self.workers + EXTRA_PARTS_IN_MEMORY)
        fd = await asyncio.to_thread(os.open, self.src, os.O_RDONLY)
        try:
            async with asyncio.TaskGroup() as group:
                for index in range(self.part_count):
                    await parts_in_memory.acquire()  # bounds memory and the tasks alive
                    group.create_task(self._upload_part(upload_id, fd, index, parts_in_memory))
        except BaseExceptionGroup as errors:
            raise _primary_error(errors) from errors
        finally:
            os.close(fd)

    async def _upload_part(
        self, upload_id: str, fd: int, index: int, parts_in_memory: asyncio.Semaphore
    ) -> None:
        try:
            offset = index * self.part_size
            length = min(self.part_size, self.size - offset)
            data, md5 = await asyncio.to_thread(_read_part, fd, offset, length, self.src)
            started = time.monotonic()
            etag = await self._send_part(upload_id, index + 1, data, md5)
            del data  # free the part before the slot lets another one be read
            self.digests[index], self.part_etags[index] = md5, etag
            self.metrics.observe_part("upload", length, time.monotonic() - started)
            if self.progress is not None:
                self.progress(length)
        finally:
            parts_in_memory.release()

    async def _send_part(self, upload_id: str, number: int, data: bytes, md5: str) -> str:
        """One part, retried; returns the ETag the server gave it."""

        async def attempt() -> str:
            async with self.slots:  # the backoff sleep in retry() happens outside
                etag = await self.store.upload_part(self.key, upload_id, number, data)
            if self.verify_etag:
                _check_etag(
                    self.store,
                    self.key,
                    got=etag,
                    expected=md5,
                    metrics=self.metrics,
                    what=f"part {number} of ",
                )
            return etag

        return await self._retried(attempt, f"part {number}/{self.part_count} of {self.where}")

    async def _complete(self, upload_id: str) -> ObjectInfo:
        parts = [CompletedPart(n, etag) for n, etag in enumerate(self.part_etags, start=1)]
        expected = multipart_etag(self.digests)
        tried = False

        async def attempt() -> ObjectInfo:
            nonlocal tried
            try:
                return await self.store.complete_multipart(self.key, upload_id, parts)
            except NotFound:
                if not tried:
                    raise
                # An earlier attempt may have completed it and only the answer was lost.
                info = await self.store.head(self.key)
                if info.etag != expected:
                    raise
                return info
            finally:
                tried = True

        return await self._retried(attempt, f"complete upload of {self.where}")

    async def _abort(self, upload_id: str) -> None:
        """Best effort: the original failure is what the caller needs to see."""
        try:
            async with asyncio.timeout(_ABORT_POLICY.total_timeout_s):
                await retry(
                    lambda: self.store.abort_multipart(self.key, upload_id),
                    _ABORT_POLICY,
                    describe=f"abort upload of {self.where}",
                )
        except (StoreError, TimeoutError) as exc:
            log.warning(
                "could not abort multipart upload %s of %s (%s); it holds storage until a"
                " bucket lifecycle rule or a manual abort removes it",
                upload_id,
                self.where,
                exc,
            )
