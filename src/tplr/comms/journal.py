"""The resume journal of a download: which parts of the sidecar file are complete and verified.

It lives next to the sidecar (``DEST.partial.journal``) and is append-only text::

    {"format": "tplr-download-journal", "version": 1, "key": …, "size": …, "etag": …,
     "part_size": …}                       <- header: the object and the part layout
    17 9f0c…e1 -  3a5b1c0d                 <- part 17: xxh3-128, MD5 (or -), CRC-32 of the line
    3 77aa…02 5d41…92 0b1e9c44

A record is appended only after the part's bytes were made durable (``fdatasync`` of the
sidecar), in batches, so a crash never leaves a journaled part that is not on disk. A torn
or corrupt record (no newline, bad CRC) is ignored: that part is fetched again. A journal
whose header does not describe the current remote object (size, ETag, part size) is
discarded together with its sidecar.

All methods block; the download engine calls them in worker threads.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

JOURNAL_FORMAT = "tplr-download-journal"
JOURNAL_VERSION = 1


@dataclass(frozen=True, slots=True)
class JournalHeader:
    key: str
    size: int
    etag: str
    part_size: int


@dataclass(frozen=True, slots=True)
class PartRecord:
    """A completed, durable part and its digests (``md5`` when it was computed)."""

    index: int
    xxh3: str
    md5: str | None = None

    def to_line(self) -> str:
        body = f"{self.index} {self.xxh3} {self.md5 or '-'}"
        return f"{body} {zlib.crc32(body.encode()):08x}\n"

    @classmethod
    def from_line(cls, line: str) -> PartRecord | None:
        """The record on ``line`` (with its newline), or None if it is torn or corrupt."""
        if not line.endswith("\n"):
            return None
        fields = line.split()
        if len(fields) != 4:
            return None
        body = " ".join(fields[:3])
        if f"{zlib.crc32(body.encode()):08x}" != fields[3] or not fields[0].isdigit():
            return None
        return cls(int(fields[0]), fields[1], None if fields[2] == "-" else fields[2])


def _header_line(header: JournalHeader) -> str:
    return json.dumps({"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, **asdict(header)})


def _parse_header(line: str) -> JournalHeader | None:
    try:
        data = json.loads(line)
        if data.get("format") != JOURNAL_FORMAT or data.get("version") != JOURNAL_VERSION:
            return None
        return JournalHeader(
            key=str(data["key"]),
            size=int(data["size"]),
            etag=str(data["etag"]),
            part_size=int(data["part_size"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def read_journal(path: Path, expected: JournalHeader) -> dict[int, PartRecord]:
    """The valid records of ``path`` if its header equals ``expected``, else ``{}``.

    A missing, unreadable or foreign journal yields ``{}`` (a fresh start); the caller
    then recreates the journal and the sidecar.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    lines = text.splitlines(keepends=True)
    if not lines or _parse_header(lines[0]) != expected:
        if lines:
            log.info("discarding resume journal %s: it describes another object version", path)
        return {}
    part_count = -(-expected.size // expected.part_size)
    records: dict[int, PartRecord] = {}
    for line in lines[1:]:
        record = PartRecord.from_line(line)
        if record is None or record.index >= part_count:
            log.debug("ignoring a torn or corrupt record in %s: %r", path, line[:80])
            continue
        records[record.index] = record
    return records


class JournalWriter:
    """Appends records to a journal. Use :meth:`create` for a new one, :meth:`reopen` to resume."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def create(cls, path: Path, header: JournalHeader) -> JournalWriter:
        """Write a fresh journal holding only ``header`` (atomically replacing any old one)."""
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, (_header_line(header) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        tmp.replace(path)
        return cls.reopen(path)

    @classmethod
    def reopen(cls, path: Path) -> JournalWriter:
        return cls(path, os.open(path, os.O_WRONLY | os.O_APPEND))

    def append(self, records: list[PartRecord]) -> None:
        """Append ``records`` (whose data is already durable) in one write, then sync."""
        if not records:
            return
        data = "".join(r.to_line() for r in records).encode()
        written = os.write(self._fd, data)
        if written != len(data):  # a short append leaves a torn tail, which readers skip
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
