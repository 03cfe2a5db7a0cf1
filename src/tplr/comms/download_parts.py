"""Fetching one part (retried, verified as it streams) and verifying the whole object."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from tplr.comms.buffers import BufferPool, TransferSlots
from tplr.comms.download_etag import Md5Etag, file_matches_etag, multipart_etag_of
from tplr.comms.download_plan import DownloadPlan, MiB, Part
from tplr.comms.download_sidecar import Sidecar
from tplr.comms.download_source import RangeOpener, open_part_stream
from tplr.comms.errors import IntegrityError, PreconditionFailed, StoreError, TransientError
from tplr.comms.journal import PartRecord
from tplr.comms.progress import Progress
from tplr.comms.retry import RetryHook, RetryPolicy, retry
from tplr.comms.store import ObjectInfo, ObjectStore
from tplr.comms.transfer_metrics import TransferMetrics

log = logging.getLogger(__name__)

WRITE_BATCH_BYTES = 1 * MiB  # socket chunks are gathered up to this before one pwritev
INTEGRITY_ATTEMPTS = 3  # fetches of one part whose hash mismatches before giving up
MIN_INLINE_MD5_PART_BYTES = 1 * MiB
MAX_INLINE_MD5_PART_BYTES = 5 * 1024 * MiB


class ObjectReplaced(StoreError):
    """The object's ETag changed during the download (``If-Match`` failed): start over."""

    hint = "the object was replaced during the download; it is fetched again from the start"


class PartHashMismatch(IntegrityError):
    """A part's bytes did not match its manifest hash; it is fetched again (alone)."""


class ObjectIntegrityError(IntegrityError):
    """The assembled object failed its whole-object check; the download is discarded."""


@dataclass
class Verification:
    """What is checked: ``manifest`` (per part, as it streams), ``etag``, ``size``, ``none``."""

    mode: str
    location: str
    metrics: TransferMetrics
    manifest_part_size: int | None = None
    manifest_parts: list[str] | None = None
    etag: Md5Etag | None = None
    etag_part_sizes: list[int] = field(default_factory=list)
    note: str = ""

    def fixed_part_size(self, configured: int | None) -> int | None:
        """The part size this check imposes: the manifest's, or (unless one is configured)
        the likeliest multipart part size, so each part's MD5 is computed as it streams."""
        if self.manifest_part_size is not None:
            return self.manifest_part_size
        if self.mode == "etag" and configured is None and self.etag_part_sizes:
            likeliest = self.etag_part_sizes[0]
            if MIN_INLINE_MD5_PART_BYTES <= likeliest <= MAX_INLINE_MD5_PART_BYTES:
                return likeliest
        return None

    def wants_part_md5(self, part_size: int) -> bool:
        return (
            self.mode == "etag"
            and self.etag is not None
            and self.etag.parts is not None
            and part_size in self.etag_part_sizes
        )

    def expected_part_hash(self, index: int) -> str | None:
        return self.manifest_parts[index] if self.manifest_parts is not None else None

    async def verify_object(
        self, sidecar: Sidecar, info: ObjectInfo, records: dict[int, PartRecord], plan: DownloadPlan
    ) -> tuple[str, str]:
        """Whole-object checks before publishing; returns (what was checked, note)."""
        size = await asyncio.to_thread(sidecar.file_size)
        if size != info.size or len(records) != plan.part_count:
            raise self._mismatch(f"{len(records)} of {plan.part_count} parts, {size} bytes")
        if self.mode != "etag" or self.etag is None:
            return self.mode, self.note
        tried: tuple[int, ...] = ()
        md5s = [records[i].md5 for i in range(plan.part_count)]
        if self.wants_part_md5(plan.part_size) and all(md5s):
            if multipart_etag_of([m for m in md5s if m]) == self.etag.text:
                return "etag", self.note
            tried = (plan.part_size,)
        matched = await asyncio.to_thread(
            file_matches_etag, sidecar.partial, size, self.etag, skip_part_sizes=tried
        )
        if matched is None:
            raise self._mismatch("its MD5 does not match the ETag")
        return "etag", self.note

    def _mismatch(self, what: str) -> ObjectIntegrityError:
        self.metrics.observe_integrity_failure("download")
        if self.etag is not None and self.etag.parts:
            what += (
                f" for any plausible part size of a {self.etag.parts}-part upload; the object is"
                " corrupt or was uploaded with an unusual part size"
            )
        return ObjectIntegrityError(
            f"{self.location}: downloaded data does not match: {what}",
            location=self.location,
            hint="fetch it again; if it persists, verify with a manifest (--manifest) or"
            " accept the size check (--verify size)",
        )


class PartFetcher:
    """Fetches parts into the sidecar: slot, ranged GET, hash, positioned writes, retries.

    A part up to ``piece_size`` is one request, hashed as it streams. A larger part (a
    manifest's 32 MiB parts, when they are fewer than the streams wanted) is fetched as
    concurrent pieces; its hash is then computed from the page cache.
    """

    def __init__(
        self,
        *,
        store: ObjectStore,
        key: str,
        etag: str,
        sidecar: Sidecar,
        verification: Verification,
        part_md5: bool,
        policy: RetryPolicy,
        metrics: TransferMetrics,
        progress: Progress,
        slots: TransferSlots,
        pool: BufferPool,
        opener: RangeOpener | None,
        on_retry: RetryHook,
        piece_size: int,
    ) -> None:
        self.store, self.key, self.etag = store, key, etag
        self.location = store.url(key)
        self.sidecar = sidecar
        self.verification = verification
        self.part_md5 = part_md5
        self.policy = policy
        self.metrics = metrics
        self.progress = progress
        self.slots = slots
        self.pool = pool
        self.opener = opener
        self.on_retry = on_retry
        self.piece_size = piece_size
        self.completed: dict[int, PartRecord] = {}

    async def fetch_part(self, part: Part) -> None:
        if part.length <= self.piece_size:
            record = await self._fetch_whole(part)
        else:
            record = await self._fetch_in_pieces(part)
        self.completed[part.index] = record
        self.sidecar.mark_done(record)

    def _hashers(self) -> list[Any]:
        return [xxhash.xxh3_128(), hashlib.md5()] if self.part_md5 else [xxhash.xxh3_128()]

    async def _fetch_whole(self, part: Part) -> PartRecord:
        """One request, hashed as it streams; retried alone, sleeping outside the slot."""
        mismatches = 0

        async def attempt() -> PartRecord:
            nonlocal mismatches
            hashers = self._hashers()
            async with self.slots:
                await self._fetch_range(part.offset, part.length, hashers)
            try:
                return self._record(part, *(h.hexdigest() for h in hashers))
            except PartHashMismatch as exc:
                self.progress.advance(-part.length)  # these bytes will come again
                mismatches += 1
                if mismatches >= INTEGRITY_ATTEMPTS:
                    raise self._gave_up(exc, mismatches) from exc
                raise

        return await retry(
            attempt,
            self.policy,
            describe=f"part {part.index} of {self.location}",
            on_retry=self.on_retry,
            retry_on=(PartHashMismatch,),
        )

    async def _fetch_in_pieces(self, part: Part) -> PartRecord:
        """Several concurrent requests (pieces), each retried alone; then the part is hashed
        from the page cache, and fetched again whole if it does not match."""
        for attempt in range(1, INTEGRITY_ATTEMPTS + 1):
            async with asyncio.TaskGroup() as group:
                end = part.offset + part.length
                for offset in range(part.offset, end, self.piece_size):
                    length = min(self.piece_size, end - offset)
                    group.create_task(self._fetch_piece(part, offset, length))
            digests = await self.sidecar.hash_range_async(
                part.offset, part.length, md5=self.part_md5
            )
            try:
                return self._record(part, *digests)
            except PartHashMismatch as exc:
                self.progress.advance(-part.length)
                if attempt == INTEGRITY_ATTEMPTS:
                    raise self._gave_up(exc, attempt) from exc
                self.on_retry(exc, attempt, 0.0)
        raise AssertionError("unreachable")

    async def _fetch_piece(self, part: Part, offset: int, length: int) -> None:
        async def attempt() -> None:
            async with self.slots:
                await self._fetch_range(offset, length, [])

        await retry(
            attempt,
            self.policy,
            describe=f"part {part.index} bytes {offset}-{offset + length - 1} of {self.location}",
            on_retry=self.on_retry,
        )

    async def _fetch_range(self, offset: int, length: int, hashers: list[Any]) -> None:
        """One ranged GET into the sidecar, with progress, metrics and typed errors."""
        started = time.monotonic()
        advanced = 0

        def advance(num_bytes: int) -> None:
            nonlocal advanced
            advanced += num_bytes
            self.progress.advance(num_bytes)

        try:
            await self._stream(offset, length, hashers, advance)
        except BaseException as exc:
            self.progress.advance(-advanced)  # this attempt's bytes will come again
            if not isinstance(exc, asyncio.CancelledError):
                self.metrics.observe_request("download")
            if isinstance(exc, PreconditionFailed):
                raise ObjectReplaced(exc.message, location=self.location) from exc
            raise
        self.metrics.observe_part("download", length, time.monotonic() - started)

    async def _stream(
        self, offset: int, length: int, hashers: list[Any], advance: Callable[[int], None]
    ) -> None:
        position = offset
        pending: list[Any] = []
        pending_bytes = 0
        async with open_part_stream(
            self.store,
            self.key,
            offset,
            length,
            if_match=self.etag,
            pool=self.pool,
            opener=self.opener,
        ) as chunks:
            async for chunk in chunks:
                pending.append(chunk)
                pending_bytes += len(chunk)
                # bytes chunks may wait for a fuller batch; a pooled view must go now
                if pending_bytes < WRITE_BATCH_BYTES and isinstance(chunk, bytes):
                    continue
                await self.sidecar.write_async(pending, position, hashers)
                position += pending_bytes
                advance(pending_bytes)
                pending, pending_bytes = [], 0
            if pending:
                await self.sidecar.write_async(pending, position, hashers)
                position += pending_bytes
                advance(pending_bytes)
        if position - offset != length:
            raise TransientError(
                f"short read: bytes {offset}-{offset + length - 1} of {self.location}:"
                f" got {position - offset} of {length}",
                location=self.location,
            )

    def _record(self, part: Part, digest: str, md5: str | None = None) -> PartRecord:
        expected = self.verification.expected_part_hash(part.index)
        if expected is not None and digest != expected:
            self.metrics.observe_integrity_failure("download")
            raise PartHashMismatch(
                f"part {part.index} of {self.location} (bytes {part.offset}-"
                f"{part.offset + part.length - 1}) does not match its manifest hash:"
                f" expected {expected}, got {digest}",
                location=self.location,
            )
        return PartRecord(part.index, digest, md5 if self.part_md5 else None)

    def _gave_up(self, exc: PartHashMismatch, times: int) -> IntegrityError:
        return IntegrityError(f"{exc.message} ({times} times in a row)", location=self.location)
