"""The files of a download in progress: ``DEST.partial`` (the data) and its journal.

- The sidecar is sized with ``ftruncate`` (sparse). ``posix_fallocate`` would reserve the
  blocks, but on ext4 it made the writes that follow 3-7x slower (unwritten-extent
  conversion), so space is checked up front instead (:mod:`tplr.comms.diskspace`).
- Parts are written with positioned writes from worker threads, so they can land in any
  order without a lock and without blocking the event loop.
- A checkpoint makes progress durable: ``fdatasync`` the sidecar, then append the records
  of the parts that were complete before it. Checkpoints are batched (every few seconds
  and on cancellation or failure), so their cost is one flush per batch, not per part.
- Publishing is ``os.replace(DEST.partial, DEST)``: nothing appears under the final name
  unless it is complete and verified.

All methods except :meth:`Sidecar.take_pending` block; callers run them in threads.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash

from tplr.comms.diskspace import FreeSpaceProbe, allocated_bytes, check_free_space, free_bytes
from tplr.comms.errors import InsufficientSpace, StoreError
from tplr.comms.journal import JournalHeader, JournalWriter, PartRecord, read_journal

log = logging.getLogger(__name__)
_HASH_READ_BYTES = 1024 * 1024
WRITER_THREADS = 2  # measured: 2 beat 1 (idle while one hashes) and 6 (inode-lock spinning)


class DestinationError(StoreError):
    """The local destination could not be written (permissions, I/O error)."""

    hint = "check that the destination folder exists, is writable and its disk is healthy"


def sidecar_paths(dest: Path) -> tuple[Path, Path]:
    """``(DEST.partial, DEST.partial.journal)``."""
    partial = dest.with_name(dest.name + ".partial")
    return partial, partial.with_name(partial.name + ".journal")


class Sidecar:
    def __init__(self, dest: Path, header: JournalHeader) -> None:
        self.dest = dest
        self.partial, self.journal_path = sidecar_paths(dest)
        self.header = header
        self._fd = -1
        self._writers: ThreadPoolExecutor | None = None
        self._journal: JournalWriter | None = None
        self._pending: list[PartRecord] = []

    # -- opening ----------------------------------------------------------------------

    def open(self, probe: FreeSpaceProbe | None) -> dict[int, PartRecord]:
        """Resume from a matching journal or start afresh; returns the parts already done.

        The disk-space check happens here, before a single byte is written.
        """
        try:
            return self._open(probe)
        except OSError as exc:
            self.close()
            raise self.write_error(exc, "open") from exc

    def _open(self, probe: FreeSpaceProbe | None) -> dict[int, PartRecord]:
        done = read_journal(self.journal_path, self.header)
        if done and not self._partial_has_size(self.header.size):
            log.info("discarding resume journal %s: its data file is missing", self.journal_path)
            done = {}
        if not done:
            self.discard()
        needed = self.header.size - allocated_bytes(self.partial)
        check_free_space(self.dest.parent, needed, probe)
        self._fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        # Buffered writes to one file serialize on its inode lock: more threads only spin.
        self._writers = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="tplr-write")
        if os.fstat(self._fd).st_size != self.header.size:
            os.ftruncate(self._fd, self.header.size)
        self._journal = JournalWriter.create(self.journal_path, self.header)
        self._journal.append(sorted(done.values(), key=lambda r: r.index))  # compacted
        return done

    def _partial_has_size(self, size: int) -> bool:
        try:
            return self.partial.stat().st_size == size
        except FileNotFoundError:
            return False

    # -- writing ----------------------------------------------------------------------

    async def write_async(self, chunks: Sequence[Any], offset: int, hashers: Sequence[Any]) -> None:
        """:meth:`write` on the sidecar's writer thread(s)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writers, self.write, chunks, offset, hashers)

    def write(self, chunks: Sequence[Any], offset: int, hashers: Sequence[Any]) -> None:
        """Hash ``chunks`` and write them at ``offset`` (one ``pwritev``)."""
        for chunk in chunks:
            for hasher in hashers:
                hasher.update(chunk)
        total = sum(len(c) for c in chunks)
        try:
            written = os.pwritev(self._fd, chunks, offset)
            if written < total:  # rare for regular files; finish chunk by chunk
                self._write_rest(chunks, offset, written)
        except OSError as exc:
            raise self.write_error(exc, "write") from exc

    async def hash_range_async(
        self, offset: int, length: int, *, md5: bool
    ) -> tuple[str, str | None]:
        """:meth:`hash_range` on the writer thread(s)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writers, self.hash_range, offset, length, md5)

    def hash_range(self, offset: int, length: int, md5: bool) -> tuple[str, str | None]:
        """xxh3-128 (and MD5) of ``[offset, offset + length)`` as written (page cache)."""
        xxh3, md5_hasher = xxhash.xxh3_128(), hashlib.md5() if md5 else None
        view = memoryview(bytearray(min(length, _HASH_READ_BYTES) or 1))
        end = offset + length
        try:
            while offset < end:
                got = os.preadv(self._fd, [view[: min(len(view), end - offset)]], offset)
                if got == 0:
                    raise OSError(f"unexpected end of file at {offset}")
                xxh3.update(view[:got])
                if md5_hasher is not None:
                    md5_hasher.update(view[:got])
                offset += got
        except OSError as exc:
            raise self.write_error(exc, "read back") from exc
        return xxh3.hexdigest(), md5_hasher.hexdigest() if md5_hasher is not None else None

    def _write_rest(self, chunks: Sequence[Any], offset: int, skip: int) -> None:
        position = offset
        for chunk in chunks:
            view = memoryview(chunk)
            start = min(max(skip - (position - offset), 0), len(view))
            cursor = start
            while cursor < len(view):
                cursor += os.pwrite(self._fd, view[cursor:], position + cursor)
            position += len(view)

    def write_error(self, exc: OSError, action: str) -> StoreError:
        if exc.errno == errno.ENOSPC:
            folder = self.dest.parent
            return InsufficientSpace(str(folder), self.header.size, free_bytes(folder))
        where = str(self.partial)
        return DestinationError(f"cannot {action} {where}: {exc}", location=where)

    # -- durable progress -------------------------------------------------------------

    def mark_done(self, record: PartRecord) -> None:
        """Queue a completed part for the next checkpoint (event-loop thread)."""
        self._pending.append(record)

    def take_pending(self) -> list[PartRecord]:
        """The records to checkpoint now (event-loop thread; their data is written)."""
        records, self._pending = self._pending, []
        return records

    def checkpoint(self, records: list[PartRecord]) -> None:
        """Make ``records``' data durable, then journal them."""
        if not records or self._fd < 0 or self._journal is None:
            return
        os.fdatasync(self._fd)
        self._journal.append(records)

    # -- ending -----------------------------------------------------------------------

    def close(self) -> None:
        if self._writers is not None:
            self._writers.shutdown(wait=True)
            self._writers = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Remove the sidecar and its journal (a fresh start, or an unusable download)."""
        self.close()
        self.partial.unlink(missing_ok=True)
        self.journal_path.unlink(missing_ok=True)

    def publish(self, *, fsync: bool) -> None:
        """Move the complete, verified sidecar to ``dest`` atomically; drop the journal."""
        try:
            if fsync:
                os.fsync(self._fd)
            self.close()
            self.partial.replace(self.dest)
            self.journal_path.unlink(missing_ok=True)
            if fsync:
                dir_fd = os.open(self.dest.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise self.write_error(exc, "publish") from exc

    def file_size(self) -> int:
        return os.fstat(self._fd).st_size
