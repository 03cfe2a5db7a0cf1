"""Fetching parts (retried from where they stopped, verified as they stream) and
verifying the whole object.

A part up to the request size is one ranged GET, hashed as it streams; its written prefix
is journaled every :data:`PROGRESS_RECORD_BYTES`, so a killed download resumes inside the
part, and a failed request continues from the last byte written, not from the part's
start. A larger part (a manifest's 32 MiB parts when they are fewer than the streams
wanted) is fetched as pieces on several streams, each journaled the same way, and hashed
from the page cache once whole.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tplr.comms.buffers import BufferPool, TransferSlots
from tplr.comms.download.etag import Md5Etag, file_matches_etag, multipart_etag_of
from tplr.comms.download.journal import PartRecord, PrefixRecord, Record, SpanRecord
from tplr.comms.download.plan import DownloadPlan, MiB, Part
from tplr.comms.download.sidecar import Resumed, ResumedPrefix, Sidecar, new_hashers
from tplr.comms.download.source import RangeSource, open_part_stream
from tplr.comms.errors import IntegrityError, PreconditionFailed, StoreError, TransientError
from tplr.comms.progress import Progress
from tplr.comms.retry import RetryHook, RetryPolicy, retry
from tplr.comms.stores.base import ObjectInfo, ObjectStore
from tplr.comms.transfer_metrics import TransferMetrics

log = logging.getLogger(__name__)

WRITE_BATCH_BYTES = 1 * MiB  # socket chunks are gathered up to this before one pwritev
INTEGRITY_ATTEMPTS = 3  # fetches of one part whose hash mismatches before giving up
PROGRESS_RECORD_BYTES = 256 * 1024  # a stream journals its progress at least this often
MAX_RUN_BYTES = 32 * MiB  # what one GET may cover once the streams have settled
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
            file_matches_etag, sidecar.fd, size, self.etag, skip_part_sizes=tried
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


@dataclass
class Request:
    """One ranged GET's worth of work: ``[position, end)`` of ``part``. A whole part
    (``piece_offset is None``) carries the hashers fed with its first bytes; a piece is
    one of several concurrent requests of a larger part."""

    part: Part
    position: int
    end: int
    hashers: list[Any] = field(default_factory=list)
    piece_offset: int | None = None
    noted: int = 0  # the position last journaled
    finished: bool = False  # its part's completion was handled (see PartFetcher.finish)
    mismatch: PartHashMismatch | None = None  # its part failed the manifest's hash


@dataclass
class Run:
    """Consecutive requests fetched by one ranged GET (most often just one): the GET
    starts at the first unfinished request's position and ends with the last request."""

    requests: list[Request]
    _current: int = 0

    def current(self) -> Request | None:
        """The first request not yet complete, if any."""
        while self._current < len(self.requests):
            request = self.requests[self._current]
            if request.position < request.end:
                return request
            self._current += 1
        return None

    @property
    def position(self) -> int:
        current = self.current()
        return current.position if current is not None else self.end

    @property
    def end(self) -> int:
        return self.requests[-1].end

    def describe(self) -> str:
        first, last = self.requests[0].part.index, self.requests[-1].part.index
        parts = f"part {first}" if first == last else f"parts {first}-{last}"
        return f"{parts} bytes {self.position}-{self.end - 1}"


class PartFetcher:
    """Fetches requests into the sidecar: slot, ranged GET, hash, positioned writes,
    progress records, retries (see the module doc)."""

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
        source: RangeSource,
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
        self.source = source
        self.on_retry = on_retry
        self.piece_size = piece_size
        self.completed: dict[int, PartRecord] = {}
        self.written_bytes = 0  # by this run (what adaptive concurrency measures)
        self._counting = threading.Lock()  # receiving threads write concurrently
        self._pieces_left: dict[int, int] = {}
        self._mismatches: dict[int, int] = {}

    # -- planning ---------------------------------------------------------------------

    def requests(self, parts: list[Part], resumed: Resumed) -> deque[Request]:
        """The requests for ``parts`` (those not done), in offset order, starting where
        the resumed journal says each part or piece stopped."""
        queue: deque[Request] = deque()
        for part in parts:
            if part.length <= self.piece_size:
                queue.append(self._whole(part, resumed.prefixes.get(part.index)))
                continue
            spans = resumed.spans.get(part.index, set())
            pieces = [self._piece(part, offset, spans) for offset in self._piece_offsets(part)]
            missing = [p for p in pieces if p.position < p.end]
            self._pieces_left[part.index] = max(len(missing), 1)
            queue.extend(missing or [self._piece(part, part.offset, set(), empty=True)])
        return queue

    def _whole(self, part: Part, prefix: ResumedPrefix | None) -> Request:
        if prefix is None:
            return Request(part, part.offset, part.offset + part.length, new_hashers(self.part_md5))
        start = part.offset + prefix.length
        return Request(part, start, part.offset + part.length, prefix.hashers, noted=start)

    def _piece_offsets(self, part: Part) -> range:
        return range(part.offset, part.offset + part.length, self.piece_size)

    def _piece(
        self, part: Part, offset: int, spans: set[tuple[int, int]], *, empty: bool = False
    ) -> Request:
        end = min(offset + self.piece_size, part.offset + part.length)
        written = max((n for o, n in spans if o == offset and n <= end - offset), default=0)
        position = end if empty else offset + written
        return Request(part, position, end, piece_offset=offset, noted=position)

    def take(self, queue: deque[Request], share: int) -> Run:
        """The next GET's worth of work: the queue's first request, or (``share`` > 1, the
        streams have settled) up to ``share`` times as much of what follows it, at most
        :data:`MAX_RUN_BYTES`. A part whose untouched pieces all fit is taken whole, so it
        is hashed as it streams instead of read back once complete."""
        if share <= 1 or self.source.reader is None:
            return Run([queue.popleft()])
        first = self._next_unit(queue, MAX_RUN_BYTES) or queue.popleft()
        run = [first]
        budget = min(MAX_RUN_BYTES, share * (first.end - first.position))
        budget -= first.end - first.position
        while queue and queue[0].position == run[-1].end:
            unit = self._next_unit(queue, budget)
            if unit is None:
                break
            run.append(unit)
            budget -= unit.end - unit.position
        return Run(run)

    def _next_unit(self, queue: deque[Request], budget: int) -> Request | None:
        """Pop the queue's first request if it fits ``budget`` bytes; the first piece of
        a part whose pieces are all queued, untouched, comes out as the whole part (or
        not at all: the part is left whole for the next stream)."""
        head = queue[0]
        if self._whole_part_queued(head, queue):
            if head.part.length > budget:
                return None
            for _ in range(self._pieces_left.pop(head.part.index)):
                queue.popleft()
            return self._whole(head.part, None)
        if head.end - head.position > budget:
            return None
        return queue.popleft()

    def _whole_part_queued(self, head: Request, queue: deque[Request]) -> bool:
        """``head`` is the first of its part's pieces and all of them wait, untouched, at
        the front of ``queue``."""
        part = head.part
        if head.piece_offset != part.offset:
            return False
        count = len(self._piece_offsets(part))
        if count < 2 or len(queue) < count or self._pieces_left.get(part.index) != count:
            return False
        pieces = [queue[i] for i in range(count)]
        return all(p.part.index == part.index and p.position == p.piece_offset for p in pieces)

    # -- fetching ---------------------------------------------------------------------

    async def fetch(self, run: Run, queue: deque[Request]) -> None:
        """Fetch ``run`` (retried from where it stopped); a part that failed its hash is
        queued again from scratch. Each request's part is completed by the thread that
        wrote its last byte (:meth:`finish`); what no thread did is done here."""
        if run.position < run.end:
            await self._fetch_with_retries(run)
        for request in run.requests:
            if not request.finished:
                await self.sidecar.run_blocking(self.finish, request)
            if request.mismatch is not None:
                self._refetch(request.part, request.mismatch, queue)

    def finish(self, request: Request) -> None:
        """Record ``request``'s part if it was the part's last request (a piece: once all
        are written, hashed from the page cache), or note its mismatch. Blocking: it runs
        in the thread that wrote the request's last byte, right after it."""
        request.finished = True
        part = request.part
        if request.piece_offset is not None:
            with self._counting:
                self._pieces_left[part.index] -= 1
                if self._pieces_left[part.index] > 0:
                    return
            digests = self.sidecar.hash_range(part.offset, part.length, self.part_md5)
        else:
            digests = tuple(h.hexdigest() for h in request.hashers)
        try:
            record = self._record(part, *digests)
        except PartHashMismatch as exc:
            request.mismatch = exc
            return
        self.completed[record.index] = record
        self.sidecar.record(record)

    def _refetch(self, part: Part, exc: PartHashMismatch, queue: deque[Request]) -> None:
        count = self._mismatches[part.index] = self._mismatches.get(part.index, 0) + 1
        if count >= INTEGRITY_ATTEMPTS:
            raise self._gave_up(exc, count) from exc
        with self._counting:
            self.progress.advance(-part.length)  # these bytes will come again
        self.on_retry(exc, count, 0.0)
        fresh = Resumed()
        again = self.requests([part], fresh)
        queue.extendleft(reversed(again))

    async def _fetch_with_retries(self, run: Run) -> None:
        """One ranged GET for the rest of ``run``; a failure is retried (sleeping outside
        the slot) from the last byte written."""

        async def attempt() -> None:
            async with self.slots:
                await self._fetch_range(run)

        await retry(
            attempt,
            self.policy,
            describe=f"{run.describe()} of {self.location}",
            on_retry=self.on_retry,
        )

    async def _fetch_range(self, run: Run) -> None:
        """One ranged GET into the sidecar, with progress, metrics and typed errors."""
        started, first = time.monotonic(), run.position
        try:
            await self._stream(run)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.metrics.observe_request("download")
            if isinstance(exc, PreconditionFailed):
                raise ObjectReplaced(exc.message, location=self.location) from exc
            raise
        self.metrics.observe_part("download", run.end - first, time.monotonic() - started)

    async def _stream(self, run: Run) -> None:
        position, end = run.position, run.end
        if position == end:  # (a retry after the last byte was written)
            return
        if self.source.reader is not None:  # received and written by a worker thread
            await self.source.reader.stream(
                position, end - position, if_match=self.etag, sink=self._sink(run)
            )
        else:  # (runs of one request: see take)
            await self._stream_chunks(run.requests[-1], end - position)
        if run.position != end:
            raise TransientError(
                f"short read: bytes {run.position}-{end - 1} of {self.location} did not arrive",
                location=self.location,
            )

    def _sink(self, run: Run) -> Callable[[memoryview], None]:
        """Hash, write and journal each batch of ``run``'s requests, in order (in the
        receiving thread); a batch that ends one request and starts the next is split."""

        def write(batch: memoryview) -> None:
            while batch:
                request = run.current()
                if request is None:
                    raise AssertionError("more bytes than the run asked for")
                num_bytes = min(len(batch), request.end - request.position)
                after, note = self._advance(request, num_bytes)
                self.sidecar.write((batch[:num_bytes],), request.position, request.hashers, note)
                self._written(request, after)
                if after == request.end:
                    self.finish(request)
                batch = batch[num_bytes:]

        return write

    async def _stream_chunks(self, request: Request, length: int) -> None:
        """A store's own streamed range (or ``get_range`` pieces), written by the
        sidecar's writer threads."""
        pending: list[Any] = []
        pending_bytes = 0
        async with open_part_stream(
            self.store,
            self.key,
            request.position,
            length,
            if_match=self.etag,
            pool=self.pool,
            opener=self.source.opener,
        ) as chunks:
            async for chunk in chunks:
                pending.append(chunk)
                pending_bytes += len(chunk)
                # bytes chunks may wait for a fuller batch; a pooled view must go now
                if pending_bytes < WRITE_BATCH_BYTES and isinstance(chunk, bytes):
                    continue
                await self._write(request, pending, pending_bytes)
                pending, pending_bytes = [], 0
            if pending:
                await self._write(request, pending, pending_bytes)

    async def _write(self, request: Request, chunks: list[Any], num_bytes: int) -> None:
        after, note = self._advance(request, num_bytes)
        await self.sidecar.write_async(chunks, request.position, request.hashers, note)
        self._written(request, after)

    def _advance(self, request: Request, num_bytes: int) -> tuple[int, Callable[[], Record] | None]:
        """Where ``request`` ends after ``num_bytes`` more, and the progress record to
        journal with them (at least every :data:`PROGRESS_RECORD_BYTES`), if due."""
        after = request.position + num_bytes
        if after - request.noted < PROGRESS_RECORD_BYTES or after >= request.end:
            return after, None
        request.noted = after
        return after, self._progress_note(request, after)

    def _written(self, request: Request, after: int) -> None:
        num_bytes = after - request.position
        request.position = after
        with self._counting:
            self.written_bytes += num_bytes
            self.progress.advance(num_bytes)

    @staticmethod
    def _progress_note(request: Request, after: int) -> Callable[[], Record]:
        index = request.part.index
        if request.piece_offset is not None:
            piece = request.piece_offset
            return lambda: SpanRecord(index, piece, after - piece)
        hasher = request.hashers[0]
        return lambda: PrefixRecord(index, after - request.part.offset, hasher.hexdigest())

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
