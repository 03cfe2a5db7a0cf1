"""The files of a download in progress: ``DEST.partial`` (the data) and its journal.

- The sidecar is sized with ``ftruncate`` (sparse). ``posix_fallocate`` would reserve the
  blocks, but on ext4 it made the writes that follow 3-7x slower (unwritten-extent
  conversion), so space is checked up front instead (:mod:`tplr.comms.diskspace`).
- Parts are written with positioned writes from worker threads, so they can land in any
  order without a lock and without blocking the event loop. Progress records (a part's
  written prefix, a written piece, a completed part) are appended to the journal as the
  bytes land; a periodic checkpoint ``fdatasync``\\ s data and journal.
- **Resume re-verifies**: every journaled range is hashed again from the file before it is
  trusted (completed parts against their record and the manifest, prefixes against their
  record); whatever fails is fetched again. The cost is one sequential read of what is
  resumed (see ``docs/transfers.md``).
- Neither ``DEST.partial`` nor its journal is ever followed through a symlink
  (``O_NOFOLLOW``), and a sidecar that is not a plain file with one link is replaced, so a
  local user who swaps them cannot make the download write anywhere else. Publishing
  checks that ``DEST.partial`` is still the file written, then ``os.replace``\\ s it to
  ``DEST``: nothing appears under the final name unless it is complete and verified.

All methods except the ``*_async`` ones block; callers run them in threads.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from tplr.comms.diskspace import FreeSpaceProbe, check_free_space, free_bytes
from tplr.comms.download.journal import (
    JournalHeader,
    JournalState,
    JournalWriter,
    PartRecord,
    PrefixRecord,
    Record,
    read_journal_state,
    unlink_entry,
)
from tplr.comms.errors import InsufficientSpace, StoreError
from tplr.untrusted import open_no_follow

log = logging.getLogger(__name__)
_HASH_READ_BYTES = 1024 * 1024
WRITER_THREADS = 2  # measured: 2 beat 1 (idle while one hashes) and 6 (inode-lock spinning)

ExpectedHash = Callable[[int], str | None]
"""Part index -> the hash a trusted source (the manifest) gives for it, if any."""


class DestinationError(StoreError):
    """The local destination could not be written (permissions, I/O error)."""

    hint = "check that the destination folder exists, is writable and its disk is healthy"


def sidecar_paths(dest: Path) -> tuple[Path, Path]:
    """``(DEST.partial, DEST.partial.journal)``."""
    partial = dest.with_name(dest.name + ".partial")
    return partial, partial.with_name(partial.name + ".journal")


def new_hashers(md5: bool) -> list[Any]:
    return [xxhash.xxh3_128(), hashlib.md5()] if md5 else [xxhash.xxh3_128()]


@dataclass
class ResumedPrefix:
    """A part's first ``length`` bytes, re-verified; ``hashers`` have been fed them."""

    length: int
    hashers: list[Any]


@dataclass
class Resumed:
    """What a resumed run may keep, after re-verification."""

    done: dict[int, PartRecord] = field(default_factory=dict)
    prefixes: dict[int, ResumedPrefix] = field(default_factory=dict)
    spans: dict[int, set[tuple[int, int]]] = field(default_factory=dict)
    verified_bytes: int = 0  # bytes re-hashed from disk to trust them
    rejected_bytes: int = 0  # journaled bytes that failed re-verification
    rejected_parts: list[int] = field(default_factory=list)
    verify_seconds: float = 0.0

    def kept_bytes(self, header: JournalHeader) -> int:
        spans = sum(n for index, ranges in self.spans.items() for _, n in ranges)
        prefixes = sum(p.length for p in self.prefixes.values())
        return sum(header.part_length(i) for i in self.done) + prefixes + spans


class Sidecar:
    def __init__(self, dest: Path, header: JournalHeader) -> None:
        self.dest = dest
        self.partial, self.journal_path = sidecar_paths(dest)
        self.header = header
        self._fd = -1
        self._ino: tuple[int, int] | None = None
        self._writers: ThreadPoolExecutor | None = None
        self._journal: JournalWriter | None = None

    # -- opening ----------------------------------------------------------------------

    def open(
        self, probe: FreeSpaceProbe | None, *, md5: bool, expected: ExpectedHash | None = None
    ) -> Resumed:
        """Resume from a matching journal (re-verifying it) or start afresh.

        ``md5``: parts carry an MD5 too (the ETag check needs it). The disk-space check
        happens here, before a single byte is written.
        """
        try:
            return self._open(probe, md5, expected or (lambda _index: None))
        except OSError as exc:
            self.close()
            raise self.write_error(exc, "open") from exc

    def _open(self, probe: FreeSpaceProbe | None, md5: bool, expected: ExpectedHash) -> Resumed:
        state = read_journal_state(self.journal_path, self.header)
        fd = self._open_existing_partial() if state.records() else -1
        if fd < 0:
            self.discard()
            state = JournalState()
            check_free_space(self.dest.parent, self.header.size, probe)
            fd = open_no_follow(self.partial, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        else:  # a resumed sidecar holds some of its blocks already
            held = os.fstat(fd).st_blocks * 512
            try:
                check_free_space(self.dest.parent, self.header.size - held, probe)
            except InsufficientSpace:
                os.close(fd)
                raise
        self._fd = fd
        st = os.fstat(fd)
        self._ino = (st.st_dev, st.st_ino)
        if st.st_size != self.header.size:
            os.ftruncate(fd, self.header.size)
        resumed = self._reverify(state, md5, expected)
        # Buffered writes to one file serialize on its inode lock: more threads only spin.
        self._writers = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="tplr-write")
        self._journal = JournalWriter.create(self.journal_path, self.header)
        self._journal.append(_compacted(resumed))
        return resumed

    def _open_existing_partial(self) -> int:
        """The journaled sidecar, opened without following links, or -1 when it is missing
        or not what we wrote (a symlink, not a plain file, a hard link, the wrong size)."""
        try:
            fd = open_no_follow(self.partial, os.O_RDWR)
        except FileNotFoundError:
            log.info("discarding resume journal %s: its data file is missing", self.journal_path)
            return -1
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            log.warning("not resuming: %s is a symlink; it is replaced", self.partial)
            return -1
        st = os.fstat(fd)
        why = None
        if not stat.S_ISREG(st.st_mode):
            why = "not a plain file"
        elif st.st_nlink != 1:
            why = f"a file with {st.st_nlink} links"
        elif st.st_size != self.header.size:
            why = f"{st.st_size} bytes, not {self.header.size}"
        if why is None:
            return fd
        os.close(fd)
        log.warning("not resuming: %s is %s; it is replaced", self.partial, why)
        return -1

    def _reverify(self, state: JournalState, md5: bool, expected: ExpectedHash) -> Resumed:
        """Hash every journaled range again; keep only what still matches (see module)."""
        started = time.monotonic()
        resumed = Resumed(spans=state.spans)
        for index, record in state.done.items():
            length = self.header.part_length(index)
            digests = self.hash_range(index * self.header.part_size, length, md5)
            trusted = expected(index) or record.xxh3
            resumed.verified_bytes += length
            if digests[0] == trusted == record.xxh3 and (not md5 or record.md5 == digests[1]):
                resumed.done[index] = PartRecord(index, digests[0], digests[1])
            else:
                resumed.rejected_bytes += length
                resumed.rejected_parts.append(index)
        for index, prefix in state.prefixes.items():
            if index in resumed.done:
                continue
            hashers = new_hashers(md5)
            self._hash_into(index * self.header.part_size, prefix.length, hashers)
            resumed.verified_bytes += prefix.length
            if hashers[0].hexdigest() == prefix.xxh3:
                resumed.prefixes[index] = ResumedPrefix(prefix.length, hashers)
            else:
                resumed.rejected_bytes += prefix.length
                resumed.rejected_parts.append(index)
        for index in list(resumed.spans):
            if index in resumed.done:
                del resumed.spans[index]
        resumed.verify_seconds = time.monotonic() - started
        if resumed.rejected_parts:
            shown = ", ".join(map(str, sorted(resumed.rejected_parts)[:10]))
            log.warning(
                "%d journaled parts of %s changed on disk (%s%s); fetching them again",
                len(resumed.rejected_parts),
                self.partial,
                shown,
                ", …" if len(resumed.rejected_parts) > 10 else "",
            )
        if resumed.verified_bytes:
            log.info(
                "%s: re-verified %d resumed bytes in %.2f s (%d rejected)",
                self.partial,
                resumed.verified_bytes,
                resumed.verify_seconds,
                resumed.rejected_bytes,
            )
        return resumed

    # -- writing ----------------------------------------------------------------------

    async def write_async(
        self,
        chunks: Sequence[Any],
        offset: int,
        hashers: Sequence[Any],
        note: Callable[[], Record] | None = None,
    ) -> None:
        """:meth:`write` on the sidecar's writer thread(s)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writers, self.write, chunks, offset, hashers, note)

    def write(
        self,
        chunks: Sequence[Any],
        offset: int,
        hashers: Sequence[Any],
        note: Callable[[], Record] | None = None,
    ) -> None:
        """Hash ``chunks``, write them at ``offset`` (one ``pwritev``), then journal the
        record ``note()`` makes, if any (it sees the hashers' new state)."""
        for chunk in chunks:
            for hasher in hashers:
                hasher.update(chunk)
        total = sum(len(c) for c in chunks)
        try:
            written = os.pwritev(self._fd, chunks, offset)
            if written < total:  # rare for regular files; finish chunk by chunk
                self._write_rest(chunks, offset, written)
            if note is not None and self._journal is not None:
                self._journal.append([note()])
        except OSError as exc:
            raise self.write_error(exc, "write") from exc

    async def run_blocking(self, work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)`` (something that writes or reads the sidecar) on a writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writers, work, *args)

    def record(self, record: Record) -> None:
        if self._journal is None:
            return
        try:
            self._journal.append([record])
        except OSError as exc:
            raise self.write_error(exc, "journal") from exc

    def hash_range(self, offset: int, length: int, md5: bool) -> tuple[str, str | None]:
        """xxh3-128 (and MD5) of ``[offset, offset + length)`` as written (page cache)."""
        hashers = new_hashers(md5)
        self._hash_into(offset, length, hashers)
        return hashers[0].hexdigest(), hashers[1].hexdigest() if md5 else None

    def _hash_into(self, offset: int, length: int, hashers: list[Any]) -> None:
        view = memoryview(bytearray(min(length, _HASH_READ_BYTES) or 1))
        end = offset + length
        try:
            while offset < end:
                got = os.preadv(self._fd, [view[: min(len(view), end - offset)]], offset)
                if got == 0:
                    raise OSError(errno.EIO, f"unexpected end of file at {offset}")
                for hasher in hashers:
                    hasher.update(view[:got])
                offset += got
        except OSError as exc:
            raise self.write_error(exc, "read back") from exc

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
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            folder = self.dest.parent
            return InsufficientSpace(str(self.dest), self.header.size, free_bytes(folder))
        where = str(self.partial)
        return DestinationError(f"cannot {action} {where}: {exc}", location=where)

    # -- durable progress -------------------------------------------------------------

    def checkpoint(self) -> None:
        """Flush the data written so far, then the journal (progress survives power loss)."""
        if self._fd < 0 or self._journal is None:
            return
        os.fdatasync(self._fd)
        self._journal.sync()

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
        """Remove the sidecar and its journal (a fresh start, or an unusable download).
        Symlinks are removed as links; their targets are never touched."""
        self.close()
        unlink_entry(self.partial)
        unlink_entry(self.journal_path)

    def publish(self, *, fsync: bool) -> None:
        """Move the complete, verified sidecar to ``dest`` atomically; drop the journal."""
        try:
            if fsync:
                os.fsync(self._fd)
            self.close()
            st = os.lstat(self.partial)
            if (st.st_dev, st.st_ino) != self._ino or not stat.S_ISREG(st.st_mode):
                raise DestinationError(
                    f"{self.partial} was replaced during the download; not publishing it",
                    location=str(self.partial),
                    hint="another program or user changed the download's files; run it again",
                )
            self.partial.replace(self.dest)
            unlink_entry(self.journal_path)
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

    @property
    def fd(self) -> int:
        return self._fd


def _compacted(resumed: Resumed) -> list[Record]:
    state = JournalState(done=dict(resumed.done), spans=resumed.spans)
    for index, prefix in resumed.prefixes.items():
        state.add(PrefixRecord(index, prefix.length, prefix.hashers[0].hexdigest()))
    return state.records()
