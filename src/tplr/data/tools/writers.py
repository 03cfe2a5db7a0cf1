"""Streaming, atomic writers for token shards and sample ids.

Tokens are appended in chunks (a shard can be far larger than memory) to
``<name>.tmp``; :meth:`TokenShardWriter.finish` writes the final header, fsyncs and
renames, so a reader never sees a partial shard under its final name.

A full disk is :class:`~tplr.comms.errors.InsufficientSpace` naming the file and the bytes
it needed: before each write a free-space probe (``free_space``, called with the file about
to be written) must show room for it, and ENOSPC/EDQUOT from the write itself is mapped
too. Either way the temp file is removed.

Derived sample ids (for shards we write, and for llm.c streams that carry none) are
``(shard_index << 40) | token_offset_of_the_sequence``: unique across shards, stable,
and recomputable by anyone holding the shard.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from tplr.comms.errors import InsufficientSpace
from tplr.data.formats import (
    LLMC_BY_FORMAT,
    LLMC_HEADER_INTS,
    SAMPLE_ID_DTYPE,
    ShardFormatError,
    TokenFormat,
)

SAMPLE_ID_OFFSET_BITS = 40
MAX_SHARD_INDEX = (1 << (64 - SAMPLE_ID_OFFSET_BITS)) - 1
MAX_SHARD_TOKENS = 1 << SAMPLE_ID_OFFSET_BITS
LLMC_MAX_TOKENS = 2**31 - 1  # the llm.c header stores the count as int32
_IDS_CHUNK_ROWS = 1 << 20
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
SPACE_HINT = (
    "free disk space or write the dataset to a larger disk; nothing was kept "
    "(no temp files, no half-written shard, no manifest), so run the same command again"
)

FileSpaceProbe = Callable[[Path], int]
"""Free bytes for a file about to be written at the given path."""


def free_bytes_for(path: Path) -> int:
    """The default :data:`FileSpaceProbe`: free space of the filesystem holding ``path``."""
    return shutil.disk_usage(Path(path).parent).free


def derive_sample_ids(shard_index: int, rows: np.ndarray, row_len: int) -> np.ndarray:
    """Derived uint64 ids of ``rows`` (row numbers) of a shard whose rows are ``row_len``."""
    if not 0 <= shard_index <= MAX_SHARD_INDEX:
        raise ShardFormatError(
            f"shard {shard_index}",
            f"shard index {shard_index} is outside 0..{MAX_SHARD_INDEX}",
            hint="number shards from 0",
        )
    offsets = np.asarray(rows, dtype=np.uint64) * np.uint64(row_len)
    if offsets.size and int(offsets.max()) >= MAX_SHARD_TOKENS:
        raise ShardFormatError(
            f"shard {shard_index}",
            f"a shard of more than 2**{SAMPLE_ID_OFFSET_BITS} tokens cannot get derived ids",
            hint="use smaller shards (--shard-tokens)",
        )
    return offsets | np.uint64(shard_index << SAMPLE_ID_OFFSET_BITS)


def npy_header(dtype: np.dtype, count: int) -> bytes:
    """The ``.npy`` v1.0 header of a 1-D array of ``count`` items of ``dtype``."""
    buf = io.BytesIO()
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": (count,),
    }
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def llmc_header(fmt: TokenFormat, count: int) -> bytes:
    variant = LLMC_BY_FORMAT[fmt]
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:3] = (variant.magic, variant.version, count)
    return header.tobytes()


class _AtomicFile:
    """Writes ``<path>.tmp``; :meth:`publish` fsyncs and renames it to ``path``.

    Use :meth:`write` (never ``fh.write``): it checks the free-space probe first and turns a
    full disk into :class:`InsufficientSpace`; :meth:`abort` always removes the temp file.
    """

    def __init__(self, path: Path, free_space: FileSpaceProbe | None = None) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.free_space = free_space
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in publish/abort
        self.bytes_written = 0

    def _space_error(self, needed: int, free: int | None = None) -> InsufficientSpace:
        if free is None:
            free = free_bytes_for(self.path)
        return InsufficientSpace(str(self.path), needed, free, hint=SPACE_HINT)

    def _disk_full(self, exc: OSError, needed: int) -> BaseException:
        """``exc`` as InsufficientSpace when it is ENOSPC/EDQUOT (else ``exc`` itself)."""
        if exc.errno not in _DISK_FULL:
            return exc
        on_disk = os.fstat(self.fh.fileno()).st_size
        return self._space_error(max(needed, self.bytes_written - on_disk, 1))

    def write(self, data: bytes) -> None:
        if self.free_space is not None:
            free = self.free_space(self.path)
            if free < len(data):
                raise self._space_error(len(data), free)
        try:
            self.fh.write(data)
        except OSError as exc:
            raise self._disk_full(exc, len(data)) from None
        self.bytes_written += len(data)

    def overwrite_start(self, data: bytes) -> None:
        """Rewrite the first ``len(data)`` bytes (a header reserved earlier), then go on."""
        try:
            self.fh.seek(0)
            self.fh.write(data)
            self.fh.seek(0, os.SEEK_END)
        except OSError as exc:
            raise self._disk_full(exc, len(data)) from None

    def publish(self) -> None:
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
        except OSError as exc:
            raise self._disk_full(exc, 0) from None
        self.fh.close()
        self.tmp_path.replace(self.path)

    def abort(self) -> None:
        try:
            self.fh.close()  # flushes what is buffered: may fail again on a full disk
        except OSError:
            pass
        self.tmp_path.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class WrittenTokens:
    path: Path
    num_tokens: int
    max_token_id: int


class TokenShardWriter:
    """Append tokens, then :meth:`finish`. Use as a context manager: an error aborts."""

    def __init__(
        self,
        path: Path,
        fmt: TokenFormat,
        dtype: np.dtype,
        *,
        free_space: FileSpaceProbe | None = None,
    ) -> None:
        self.format = fmt
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if fmt is TokenFormat.TEMPLAR:
            if self.dtype.str not in ("<u2", "<u4"):
                raise ShardFormatError(
                    path, f"templar tokens must be uint16 or uint32, not {dtype}"
                )
        elif fmt in LLMC_BY_FORMAT:
            self.dtype = LLMC_BY_FORMAT[fmt].dtype
        else:
            raise ShardFormatError(path, f"cannot write {fmt} shards", hint="use templar or llmc")
        self._file = _AtomicFile(path, free_space)
        self._header_len = len(self._header(0))
        try:
            self._file.write(b"\0" * self._header_len)
        except BaseException:
            self._file.abort()
            raise
        self.num_tokens = 0
        self.max_token_id = 0
        self._limit = np.iinfo(self.dtype).max

    @property
    def path(self) -> Path:
        return self._file.path

    def _header(self, count: int) -> bytes:
        if self.format is TokenFormat.TEMPLAR:
            return npy_header(self.dtype, count)
        return llmc_header(self.format, count)

    def append(self, tokens: np.ndarray) -> None:
        if tokens.size == 0:
            return
        top = int(tokens.max())
        if top > self._limit:
            raise ShardFormatError(
                self.path, f"token id {top} does not fit the shard dtype {self.dtype.name}"
            )
        self.max_token_id = max(self.max_token_id, top)
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.num_tokens += int(tokens.size)

    def finish(self) -> WrittenTokens:
        """Write the header and publish; on any failure the temp file is removed."""
        try:
            return self._finish()
        except BaseException:
            self.abort()
            raise

    def _finish(self) -> WrittenTokens:
        if self.num_tokens == 0:
            raise ShardFormatError(self.path, "no tokens were written; a shard needs > 0")
        if self.format is not TokenFormat.TEMPLAR and self.num_tokens > LLMC_MAX_TOKENS:
            raise ShardFormatError(
                self.path,
                f"{self.num_tokens} tokens exceed the llm.c header's int32 count",
                hint="use smaller shards (--shard-tokens) or the templar format",
            )
        header = self._header(self.num_tokens)
        if len(header) != self._header_len:  # pragma: no cover - numpy pads to a fixed size
            raise ShardFormatError(self.path, "the header changed size while writing")
        self._file.overwrite_start(header)
        self._file.publish()
        return WrittenTokens(self.path, self.num_tokens, self.max_token_id)

    def abort(self) -> None:
        self._file.abort()

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and not self._file.fh.closed:
            self.abort()


def write_sample_ids(path: Path, ids: np.ndarray) -> None:
    """Write little-endian uint64 ids atomically."""
    out = _AtomicFile(path)
    try:
        out.write(np.ascontiguousarray(ids, dtype=SAMPLE_ID_DTYPE).tobytes())
        out.publish()
    except BaseException:
        out.abort()
        raise


def write_derived_sample_ids(
    path: Path,
    shard_index: int,
    num_rows: int,
    row_len: int,
    *,
    free_space: FileSpaceProbe | None = None,
) -> None:
    """Write the derived ids of ``num_rows`` rows, in bounded chunks, atomically."""
    out = _AtomicFile(path, free_space)
    try:
        for first in range(0, num_rows, _IDS_CHUNK_ROWS):
            rows = min(_IDS_CHUNK_ROWS, num_rows - first)
            row_numbers = np.arange(first, first + rows, dtype=np.uint64)
            out.write(derive_sample_ids(shard_index, row_numbers, row_len).tobytes())
        out.publish()
    except BaseException:
        out.abort()
        raise


def write_bytes_atomic(
    path: Path, data: bytes, *, free_space: FileSpaceProbe | None = None
) -> None:
    """Write ``data`` to ``path`` via ``<path>.tmp`` and a rename (full disk: typed, no tmp)."""
    out = _AtomicFile(path, free_space)
    try:
        out.write(data)
        out.publish()
    except BaseException:
        out.abort()
        raise
