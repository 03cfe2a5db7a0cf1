"""Token shard formats: detection from the bytes, zero-copy memory-mapped readers, validation.

Supported files (see ``docs/shards.md``):

- llm.c / modded-nanogpt ``.bin``: a 1024-byte header of 256 little-endian int32
  (``[0]`` magic, ``[1]`` version, ``[2]`` token count) followed by the tokens.
  GPT-2 variant: magic 20240520, version 1, uint16 tokens. Llama-3 variant: magic
  20240801, version 7, uint32 tokens. The file size must be ``1024 + itemsize * ntok``.
- templar shared-sharded: ``train_XXXXXX.npy`` (a ``.npy`` array of uint16 or uint32
  tokens) plus ``sample_ids_XXXXXX.bin`` (little-endian uint64, one id per sequence).
- raw ``.bin`` of uint16 tokens with no header: only when the caller asks for it
  (``raw_uint16=True``), never guessed, so an llm.c header is never read as tokens.

Every problem raises :class:`ShardFormatError` naming the file and what is wrong.
"""

from __future__ import annotations

import io
import math
import re
import tokenize
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from tplr.errors import TplrError

LLMC_HEADER_INTS = 256
LLMC_HEADER_BYTES = LLMC_HEADER_INTS * 4
NPY_MAGIC = b"\x93NUMPY"
NPY_PREAMBLE_BYTES = 12  # magic (6), version (2), header length (2 or 4)
NPY_MAX_HEADER_BYTES = 64 * 1024  # numpy's own writer pads to 64 bytes; its reader allows 10000
# What numpy's header parser raises on hostile text (it runs ast.literal_eval/tokenize on it).
_NPY_HEADER_ERRORS = (
    ValueError,
    SyntaxError,
    TypeError,
    RecursionError,
    MemoryError,
    tokenize.TokenError,
)
SAMPLE_ID_DTYPE = np.dtype("<u8")
TOKEN_DTYPES = (np.dtype("<u2"), np.dtype("<u4"))


class TokenFormat(StrEnum):
    LLMC = "llmc"  # llm.c GPT-2 shards: magic 20240520, version 1, uint16
    LLMC_LLAMA3 = "llmc-llama3"  # llm.c Llama-3 shards: magic 20240801, version 7, uint32
    TEMPLAR = "templar"  # .npy tokens + sample_ids_*.bin
    RAW_UINT16 = "raw-uint16"  # headerless uint16, only when asked for explicitly

    @property
    def is_stream(self) -> bool:
        """True for formats without stored sequence boundaries (llm.c and raw)."""
        return self is not TokenFormat.TEMPLAR


@dataclass(frozen=True, slots=True)
class LlmcVariant:
    format: TokenFormat
    magic: int
    version: int
    dtype: np.dtype
    tokenizer: str


LLMC_VARIANTS = {
    20240520: LlmcVariant(TokenFormat.LLMC, 20240520, 1, np.dtype("<u2"), "gpt2"),
    20240801: LlmcVariant(TokenFormat.LLMC_LLAMA3, 20240801, 7, np.dtype("<u4"), "llama3"),
}
LLMC_BY_FORMAT = {v.format: v for v in LLMC_VARIANTS.values()}


class ShardFormatError(TplrError):
    """A token file is malformed, truncated, or disagrees with what the caller expects."""

    hint = "re-download the file, or regenerate it with `tplr shards prepare` / `convert`"

    def __init__(self, path: Path | str, problem: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path}: {problem}", hint=hint)
        self.path = str(path)
        self.problem = problem


@dataclass(frozen=True, slots=True)
class TokenFile:
    """One memory-mapped token file. ``tokens`` is a read-only 1-D view of the file."""

    path: Path
    format: TokenFormat
    dtype: np.dtype
    header_bytes: int
    tokens: np.ndarray
    stored_seq_len: int | None = None  # a 2-D templar .npy carries its row length

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True, slots=True)
class TokenShard:
    """A tokens file plus, for templar shards, its sample ids and sequence length."""

    tokens_file: TokenFile
    sample_ids: np.ndarray | None = None
    ids_path: Path | None = None
    seq_len: int | None = None

    @property
    def path(self) -> Path:
        return self.tokens_file.path

    @property
    def format(self) -> TokenFormat:
        return self.tokens_file.format

    @property
    def tokens(self) -> np.ndarray:
        return self.tokens_file.tokens


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise ShardFormatError(path, "does not exist", hint="check the path") from None
    except OSError as exc:
        raise ShardFormatError(path, f"cannot be read: {exc}", hint="check permissions") from exc


def _read_prefix(path: Path, count: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(count)
    except OSError as exc:
        raise ShardFormatError(path, f"cannot be read: {exc}", hint="check permissions") from exc


def _map(path: Path, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    """A read-only memmap of ``count`` items at ``offset`` (zero copies)."""
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def detect_format(path: Path | str, *, raw_uint16: bool = False) -> TokenFormat:
    """The format of a token file, from its first bytes (never from its name)."""
    path = Path(path)
    size = _file_size(path)
    if size == 0:
        raise ShardFormatError(path, "is empty (0 bytes)")
    head = _read_prefix(path, 8)
    if head.startswith(NPY_MAGIC):
        if raw_uint16:
            raise ShardFormatError(
                path, "is a .npy file, not raw uint16 tokens", hint="drop --raw-uint16"
            )
        return TokenFormat.TEMPLAR
    magic = int.from_bytes(head[:4], "little", signed=True) if len(head) >= 4 else None
    if magic in LLMC_VARIANTS:
        if raw_uint16:
            raise ShardFormatError(
                path,
                f"starts with the llm.c magic {magic}, so it is not headerless uint16 tokens",
                hint="drop --raw-uint16: reading it raw would feed the header in as tokens",
            )
        return LLMC_VARIANTS[magic].format
    if raw_uint16:
        return TokenFormat.RAW_UINT16
    raise ShardFormatError(
        path,
        f"is not a recognised token file (first 4 bytes as int32: {magic}; expected the "
        f"llm.c magic 20240520 or 20240801, or a .npy header)",
        hint="if it holds headerless uint16 tokens, say so explicitly (--raw-uint16)",
    )


def parse_llmc_header(head: bytes, size: int, where: Path | str) -> tuple[LlmcVariant, int]:
    """The variant and token count of an llm.c file of ``size`` bytes whose first bytes are
    ``head`` (at least the 1024-byte header); checked against the size. No I/O."""
    if size < LLMC_HEADER_BYTES or len(head) < LLMC_HEADER_BYTES:
        raise ShardFormatError(
            where, f"is truncated: {size} bytes, but an llm.c header alone is 1024 bytes"
        )
    header = np.frombuffer(head[:LLMC_HEADER_BYTES], dtype="<i4")
    magic, version, ntok = (int(v) for v in header[:3])
    variant = LLMC_VARIANTS.get(magic)
    if variant is None:
        raise ShardFormatError(where, f"does not start with an llm.c magic (got {magic})")
    if version != variant.version:
        raise ShardFormatError(
            where,
            f"has llm.c magic {magic} but version {version}; expected version "
            f"{variant.version} ({variant.dtype.name} tokens)",
        )
    if ntok <= 0:
        raise ShardFormatError(where, f"header says it holds {ntok} tokens; a shard needs > 0")
    expected = LLMC_HEADER_BYTES + variant.dtype.itemsize * ntok
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise ShardFormatError(
            where,
            f"is {state}: {size} bytes, but the header says {ntok} {variant.dtype.name} "
            f"tokens, i.e. 1024 + {variant.dtype.itemsize} * {ntok} = {expected} bytes",
        )
    return variant, ntok


def _open_llmc(path: Path, size: int) -> TokenFile:
    variant, ntok = parse_llmc_header(_read_prefix(path, LLMC_HEADER_BYTES), size, path)
    tokens = _map(path, variant.dtype, LLMC_HEADER_BYTES, ntok)
    return TokenFile(path, variant.format, variant.dtype, LLMC_HEADER_BYTES, tokens)


@dataclass(frozen=True, slots=True)
class NpyTokens:
    """What a templar ``.npy`` header says, checked against the file size."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # where the tokens start
    count: int
    stored_seq_len: int | None  # a 2-D (rows, seq_len) array carries its row length


def npy_header_bytes(preamble: bytes, size: int, where: Path | str) -> int:
    """Bytes of magic + header of a ``.npy`` of ``size`` bytes, from its first 12 bytes.

    Checked against the size and :data:`NPY_MAX_HEADER_BYTES` before anything reads the
    header, so a hostile length never sizes an allocation. No I/O."""
    width = {(1, 0): 2, (2, 0): 4}.get((preamble[6], preamble[7]) if len(preamble) > 7 else None)
    if width is None:
        version = tuple(preamble[6:8])
        raise ShardFormatError(where, f"has an unsupported or truncated .npy version {version}")
    start = 8 + width
    if len(preamble) < start:
        raise ShardFormatError(where, f"is truncated inside its .npy header ({size} bytes)")
    header_len = int.from_bytes(preamble[8:start], "little")
    if header_len > NPY_MAX_HEADER_BYTES or start + header_len > size:
        raise ShardFormatError(
            where,
            f"has a malformed .npy header: it claims {header_len} header bytes in a file of "
            f"{size} bytes (at most {NPY_MAX_HEADER_BYTES})",
        )
    return start + header_len


def parse_npy_tokens_header(head: bytes, size: int, where: Path | str) -> NpyTokens:
    """The templar tokens layout from ``head`` (magic + header, see
    :func:`npy_header_bytes`) of a file of ``size`` bytes; every field checked. No I/O."""
    stream = io.BytesIO(head[: npy_header_bytes(head[:NPY_PREAMBLE_BYTES], size, where)])
    try:
        version = np.lib.format.read_magic(stream)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(stream)
    except _NPY_HEADER_ERRORS as exc:
        raise ShardFormatError(where, f"has a malformed .npy header: {str(exc)[:200]}") from None
    if any(type(dim) is not int or dim < 0 for dim in shape):
        raise ShardFormatError(where, f"has a malformed .npy header: shape {shape}")
    if dtype not in TOKEN_DTYPES:
        raise ShardFormatError(
            where,
            f"holds {dtype.str} values; templar token files are little-endian uint16 or uint32",
            hint="re-create it with `tplr shards prepare` or `convert`",
        )
    if len(shape) not in (1, 2) or (len(shape) == 2 and fortran):
        raise ShardFormatError(
            where, f"has shape {shape}; expected a 1-D token array or C-ordered (rows, seq_len)"
        )
    count = math.prod(shape)  # Python ints: a shape cannot wrap around to a plausible count
    if count == 0:
        raise ShardFormatError(where, f"holds no tokens (shape {shape})")
    offset = stream.tell()
    expected = offset + count * dtype.itemsize
    if size != expected:
        state = "truncated" if size < expected else "longer than its .npy header says"
        raise ShardFormatError(
            where,
            f"is {state}: {size} bytes, but header ({offset} bytes) + shape {shape} "
            f"({count} {dtype.name} tokens) = {expected} bytes",
        )
    stored_seq_len = int(shape[1]) if len(shape) == 2 else None
    return NpyTokens(dtype, shape, offset, count, stored_seq_len)


def _open_npy(path: Path, size: int) -> TokenFile:
    header_bytes = npy_header_bytes(_read_prefix(path, NPY_PREAMBLE_BYTES), size, path)
    npy = parse_npy_tokens_header(_read_prefix(path, header_bytes), size, path)
    tokens = _map(path, npy.dtype, npy.offset, npy.count)
    return TokenFile(path, TokenFormat.TEMPLAR, npy.dtype, npy.offset, tokens, npy.stored_seq_len)


def _open_raw(path: Path, size: int) -> TokenFile:
    if size % 2:
        raise ShardFormatError(
            path, f"has an odd size ({size} bytes); raw uint16 tokens need an even size"
        )
    dtype = np.dtype("<u2")
    return TokenFile(path, TokenFormat.RAW_UINT16, dtype, 0, _map(path, dtype, 0, size // 2))


def open_token_file(path: Path | str, *, raw_uint16: bool = False) -> TokenFile:
    """Detect, validate the header and size of, and memory-map one token file."""
    path = Path(path)
    fmt = detect_format(path, raw_uint16=raw_uint16)
    size = _file_size(path)
    if fmt is TokenFormat.TEMPLAR:
        return _open_npy(path, size)
    if fmt is TokenFormat.RAW_UINT16:
        return _open_raw(path, size)
    return _open_llmc(path, size)


_INDEX_RE = re.compile(r"(\d+)$")


def shard_number_from_name(path: Path | str) -> int | None:
    """The trailing number of a shard file name (``train_000042.npy`` -> 42), if any."""
    match = _INDEX_RE.search(Path(path).stem)
    return int(match.group(1)) if match else None


def sample_ids_path_for(tokens_path: Path | str) -> Path:
    """``.../train_000042.npy`` -> ``.../sample_ids_000042.bin`` (the templar naming)."""
    tokens_path = Path(tokens_path)
    match = _INDEX_RE.search(tokens_path.stem)
    if not match:
        raise ShardFormatError(
            tokens_path,
            "has no shard number in its name, so its sample ids file cannot be found",
            hint="pass the sample ids path explicitly",
        )
    return tokens_path.with_name(f"sample_ids_{match.group(1)}.bin")


def open_sample_ids(
    path: Path | str, tokens: TokenFile, seq_len: int | None
) -> tuple[np.ndarray, int]:
    """Map a sample ids file and check it against ``tokens``; returns ``(ids, seq_len)``.

    ``seq_len`` None infers the sequence length as ``tokens / ids``.
    """
    path = Path(path)
    size = _file_size(path)
    if size == 0:
        raise ShardFormatError(path, "is empty (0 bytes)")
    if size % SAMPLE_ID_DTYPE.itemsize:
        raise ShardFormatError(
            path, f"is truncated: {size} bytes is not a whole number of uint64 sample ids"
        )
    num_ids = size // SAMPLE_ID_DTYPE.itemsize
    num_tokens = tokens.num_tokens
    stored = tokens.stored_seq_len
    if seq_len is not None and stored is not None and seq_len != stored:
        raise ShardFormatError(
            tokens.path,
            f"stores rows of {stored} tokens, but sequence length {seq_len} was asked for",
            hint=f"use --seq-len {stored}, or re-create the shard",
        )
    seq_len = seq_len or stored
    if seq_len is None:
        if num_tokens % num_ids:
            raise ShardFormatError(
                path,
                f"has {num_ids} sample ids, which do not divide the {num_tokens} tokens of "
                f"{tokens.path.name} into equal sequences",
            )
        seq_len = num_tokens // num_ids
    if num_tokens % seq_len:
        raise ShardFormatError(
            tokens.path,
            f"holds {num_tokens} tokens, which is not divisible by the sequence length {seq_len}",
            hint="pass the sequence length the shard was prepared with",
        )
    if num_ids != num_tokens // seq_len and num_tokens % num_ids == 0:
        raise ShardFormatError(
            tokens.path,
            f"stores sequences of {num_tokens // num_ids} tokens ({num_tokens} tokens / "
            f"{num_ids} sample ids), but sequence length {seq_len} was asked for",
            hint=f"use sequence length {num_tokens // num_ids} for this shard",
        )
    if num_ids != num_tokens // seq_len:
        raise ShardFormatError(
            path,
            f"has {num_ids} sample ids, but {tokens.path.name} holds {num_tokens} tokens = "
            f"{num_tokens // seq_len} sequences of {seq_len}",
        )
    return _map(path, SAMPLE_ID_DTYPE, 0, num_ids), seq_len


def open_shard(
    path: Path | str,
    *,
    ids_path: Path | str | None = None,
    seq_len: int | None = None,
    raw_uint16: bool = False,
) -> TokenShard:
    """Open a shard: the tokens file and, for templar, its sample ids (found by name)."""
    tokens = open_token_file(path, raw_uint16=raw_uint16)
    if tokens.format is not TokenFormat.TEMPLAR:
        if ids_path is not None:
            raise ShardFormatError(
                tokens.path,
                f"is a {tokens.format} stream; sample ids only go with templar .npy shards",
                hint="drop the sample ids path",
            )
        return TokenShard(tokens)
    ids_path = Path(ids_path) if ids_path is not None else sample_ids_path_for(tokens.path)
    if not ids_path.exists():
        raise ShardFormatError(
            tokens.path,
            f"is a templar tokens file but its sample ids file {ids_path} does not exist",
            hint="download sample_ids_XXXXXX.bin beside it, or pass its path",
        )
    ids, seq_len = open_sample_ids(ids_path, tokens, seq_len)
    return TokenShard(tokens, ids, ids_path, seq_len)
