"""The resume journal of a download: what of the sidecar file was written, and its hashes.

It lives next to the sidecar (``DEST.partial.journal``) and is append-only ASCII text::

    {"format": "tplr-download-journal", "version": 2, "key": …, "size": …, "etag": …,
     "part_size": …}                  <- header: the object and the part layout
    D 17 9f0c…e1 - 3a5b1c0d           <- part 17 is complete: xxh3-128, MD5 (or -), CRC-32
    P 3 4194304 77aa…02 0b1e9c44      <- the first 4 MiB of part 3 are written: their xxh3-128
    S 5 8388608 8388608 5d41aa92      <- bytes [8 MiB, 16 MiB) of part 5 are written (a piece)

Records are appended as the bytes land (at most every few hundred KiB per stream), without
waiting for a flush: a resumed run **re-hashes every journaled range from disk** before it
trusts it (:mod:`tplr.comms.download.sidecar`), so a record whose data did not reach the
disk (power loss) or was changed since (another local user) only costs a re-fetch. A
periodic checkpoint still ``fdatasync``\\ s the data and the journal so progress survives
power loss.

The journal comes from the local disk, which a local user can write, so it is parsed as
untrusted input (:mod:`tplr.untrusted`): a bounded file size, ASCII-only lines of bounded
length, ASCII digits, hex digests, ranges inside their part. A line that fails any check
is discarded with a log line (that range is fetched again); a header that does not
describe the current object version discards the whole journal. Nothing here raises on
bad content. All functions block; the engine calls them in worker threads.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tplr.untrusted import MalformedInput, load_json, open_no_follow, parse_ascii_int

log = logging.getLogger(__name__)

JOURNAL_FORMAT = "tplr-download-journal"
JOURNAL_VERSION = 2
MAX_JOURNAL_BYTES = 64 * 1024 * 1024  # ~1M records: far beyond any real download
MAX_HEADER_BYTES = 4096
MAX_LINE_BYTES = 200
MAX_LOGGED_BAD_LINES = 5
_HEX128 = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True, slots=True)
class JournalHeader:
    key: str
    size: int
    etag: str
    part_size: int

    @property
    def part_count(self) -> int:
        return -(-self.size // self.part_size) if self.part_size > 0 else 0

    def part_length(self, index: int) -> int:
        return min(self.part_size, self.size - index * self.part_size)


def _crc(body: str) -> str:
    return f"{zlib.crc32(body.encode('ascii')):08x}"


def _line(body: str) -> str:
    return f"{body} {_crc(body)}\n"


@dataclass(frozen=True, slots=True)
class PartRecord:
    """A completed part and its digests (``md5`` when it was computed)."""

    index: int
    xxh3: str
    md5: str | None = None

    def to_line(self) -> str:
        return _line(f"D {self.index} {self.xxh3} {self.md5 or '-'}")


@dataclass(frozen=True, slots=True)
class PrefixRecord:
    """The first ``length`` bytes of a part (streamed in order) are written; ``xxh3`` is
    their hash, re-checked on resume, after which only the rest of the part is fetched."""

    index: int
    length: int
    xxh3: str

    def to_line(self) -> str:
        return _line(f"P {self.index} {self.length} {self.xxh3}")


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """Bytes ``[offset, offset + length)`` of the object, inside part ``index``, are
    written (a piece of a part fetched in pieces; the whole part is hashed once complete)."""

    index: int
    offset: int
    length: int

    def to_line(self) -> str:
        return _line(f"S {self.index} {self.offset} {self.length}")


Record = PartRecord | PrefixRecord | SpanRecord


@dataclass
class JournalState:
    """What a journal says was written (not yet re-verified against the disk)."""

    done: dict[int, PartRecord] = field(default_factory=dict)
    prefixes: dict[int, PrefixRecord] = field(default_factory=dict)  # the longest per part
    spans: dict[int, set[tuple[int, int]]] = field(default_factory=dict)  # (offset, length)

    def add(self, record: Record) -> None:
        if isinstance(record, PartRecord):
            self.done[record.index] = record
        elif isinstance(record, PrefixRecord):
            known = self.prefixes.get(record.index)
            if known is None or record.length > known.length:
                self.prefixes[record.index] = record
        else:
            self.spans.setdefault(record.index, set()).add((record.offset, record.length))

    def records(self) -> list[Record]:
        """Every record, done parts first (what a compacted journal holds)."""
        out: list[Record] = [self.done[i] for i in sorted(self.done)]
        out += [self.prefixes[i] for i in sorted(self.prefixes) if i not in self.done]
        for index in sorted(self.spans):
            if index not in self.done:
                out += [SpanRecord(index, o, n) for o, n in sorted(self.spans[index])]
        return out


def parse_record(line: str, header: JournalHeader) -> Record:
    """The record on ``line`` (with its newline). ``MalformedInput`` for anything else:
    a torn line, a bad CRC, non-ASCII, a bad number or digest, a range outside its part."""
    if not line.endswith("\n") or len(line) > MAX_LINE_BYTES or not line.isascii():
        raise MalformedInput("a torn, overlong or non-ASCII line")
    fields = line[:-1].split(" ")
    if len(fields) < 4 or _crc(" ".join(fields[:-1])) != fields[-1]:
        raise MalformedInput("its CRC does not match")
    kind, values = fields[0], fields[1:-1]
    index = parse_ascii_int(values[0], what="part index", max_value=header.part_count - 1)
    part_length = header.part_length(index)
    if kind == "D" and len(values) == 3:
        digest, md5 = _digest(values[1]), None if values[2] == "-" else _digest(values[2])
        return PartRecord(index, digest, md5)
    if kind == "P" and len(values) == 3:
        length = parse_ascii_int(values[1], what="prefix", min_value=1, max_value=part_length)
        return PrefixRecord(index, length, _digest(values[2]))
    if kind == "S" and len(values) == 3:
        start = index * header.part_size
        end = start + part_length
        offset = parse_ascii_int(values[1], what="span offset", min_value=start, max_value=end - 1)
        length = parse_ascii_int(values[2], what="span", min_value=1, max_value=end - offset)
        return SpanRecord(index, offset, length)
    raise MalformedInput(f"unknown record kind {kind[:4]!r} with {len(values)} fields")


def _digest(text: str) -> str:
    if not _HEX128.fullmatch(text):
        raise MalformedInput(f"{text[:40]!r} is not a 128-bit hex digest")
    return text


def header_line(header: JournalHeader) -> str:
    return json.dumps({"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, **asdict(header)})


def parse_header(line: str) -> JournalHeader:
    """The header on ``line``; ``MalformedInput`` unless it is exactly a v2 header."""
    data = load_json(line, what="journal header", max_bytes=MAX_HEADER_BYTES, max_depth=1)
    if not isinstance(data, dict):
        raise MalformedInput("the journal header is not a JSON object")
    if data.get("format") != JOURNAL_FORMAT or data.get("version") != JOURNAL_VERSION:
        raise MalformedInput("not a tplr download journal of this version")
    key, etag = data.get("key"), data.get("etag")
    size, part_size = data.get("size"), data.get("part_size")
    if not (isinstance(key, str) and isinstance(etag, str)):
        raise MalformedInput("the journal header's key and etag must be strings")
    for name, value in (("size", size), ("part_size", part_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MalformedInput(f"the journal header's {name} must be a non-negative integer")
    return JournalHeader(key=key, size=size, etag=etag, part_size=part_size)  # type: ignore[arg-type]


def _read_bounded(path: Path) -> bytes | None:
    """The journal's bytes, or None when there is none (or a symlink, or it is too large:
    both are treated as no journal and logged)."""
    try:
        fd = open_no_follow(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            log.warning("ignoring resume journal %s: it is a symlink", path)
            return None
        raise
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(MAX_JOURNAL_BYTES + 1)
    except IsADirectoryError:
        log.warning("ignoring resume journal %s: it is not a file", path)
        return None
    if len(data) > MAX_JOURNAL_BYTES:
        log.warning("ignoring resume journal %s: larger than %d bytes", path, MAX_JOURNAL_BYTES)
        return None
    return data


def read_journal_state(path: Path, expected: JournalHeader) -> JournalState:
    """The records of ``path`` if its header equals ``expected``, else an empty state.

    A missing, foreign, oversized or symlinked journal yields an empty state (a fresh
    start); bad lines are skipped and logged. Raises only ``OSError`` for I/O failures.
    """
    state = JournalState()
    data = _read_bounded(path)
    if not data:
        return state
    text = data.decode("latin-1")  # any bytes decode; parse_record refuses non-ASCII
    lines = text.splitlines(keepends=True)
    try:
        header = parse_header(lines[0])
    except MalformedInput as exc:
        log.info("discarding resume journal %s: %s", path, exc.message)
        return state
    if header != expected:
        log.info("discarding resume journal %s: it describes another object version", path)
        return state
    bad = 0
    for number, line in enumerate(lines[1:], start=2):
        try:
            state.add(parse_record(line, expected))
        except MalformedInput as exc:
            bad += 1
            if bad <= MAX_LOGGED_BAD_LINES:
                log.info("ignoring line %d of %s (%s): %r", number, path, exc.message, line[:60])
    if bad > MAX_LOGGED_BAD_LINES:
        log.info("ignored %d bad lines of %s in all", bad, path)
    return state


def read_journal(path: Path, expected: JournalHeader) -> dict[int, PartRecord]:
    """The completed parts a journal records (see :func:`read_journal_state`)."""
    return read_journal_state(path, expected).done


class JournalWriter:
    """Appends records to a journal. Use :meth:`create` for a new one."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def create(cls, path: Path, header: JournalHeader) -> JournalWriter:
        """Write a fresh journal holding only ``header`` (atomically replacing any old one;
        no symlink is followed, neither at the temporary name nor at the final one)."""
        tmp = path.with_name(path.name + ".tmp")
        unlink_entry(tmp)
        fd = open_no_follow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.write(fd, (header_line(header) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)  # rename replaces a symlink at ``path``; it never follows one
        return cls(path, open_no_follow(path, os.O_WRONLY | os.O_APPEND))

    def append(self, records: list[Record]) -> None:
        """Append ``records`` in one write (atomic for O_APPEND; no flush, see the module)."""
        if not records:
            return
        data = "".join(r.to_line() for r in records).encode("ascii")
        written = os.write(self._fd, data)
        if written != len(data):  # a short append leaves a torn tail, which readers skip
            raise OSError(errno.EIO, f"short write to {self.path}: {written} of {len(data)} bytes")

    def sync(self) -> None:
        if self._fd >= 0:
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def unlink_entry(path: Path) -> None:
    """Remove ``path`` if it exists (a file or a symlink: the link, never its target)."""
    path.unlink(missing_ok=True)
