"""``tplr shards convert``: llm.c ``.bin`` shards -> templar ``.npy`` + sample ids + manifest.

The token stream is copied unchanged (never the header), in bounded chunks, cut into
sequences of ``seq_len``; fewer than ``seq_len`` tokens left at the end of a file are
dropped (reported). A conversion that fails (a full disk: InsufficientSpace) removes
every file it wrote. Shard numbers come from the source names
(``edu_fineweb_train_000007.bin`` -> ``train_000007.npy``); ids are derived
(``shard << 40 | offset``, see :mod:`tplr.data.tools.writers`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tplr.comms.manifest import DEFAULT_PART_SIZE, Manifest
from tplr.data.dataset_manifest import DatasetInfo, ShardRecord, write_dataset_manifest
from tplr.data.formats import (
    LLMC_BY_FORMAT,
    LlmcVariant,
    ShardFormatError,
    TokenFormat,
    open_token_file,
)
from tplr.data.formats import shard_number_from_name as number_of
from tplr.data.tools.packer import ShardPacker, ensure_empty_dir, shard_file_names
from tplr.data.tools.writers import FileSpaceProbe, free_bytes_for
from tplr.errors import ConfigError

log = logging.getLogger(__name__)

COPY_CHUNK_TOKENS = 1 << 24
VOCAB_BY_TOKENIZER = {"gpt2": (50257, 50256), "llama3": (128256, None)}


@dataclass(frozen=True, slots=True)
class ConvertResult:
    records: list[ShardRecord]
    manifest: Manifest
    dropped_tokens: int


def _shard_numbers(sources: list[Path]) -> list[int]:
    numbers = [number_of(p) for p in sources]
    if len(sources) == 1 and numbers[0] is None:
        return [0]
    missing = [str(p) for p, n in zip(sources, numbers, strict=True) if n is None]
    if missing:
        raise ConfigError(
            f"cannot number shards: no trailing number in {', '.join(missing)}",
            hint="name sources like edu_fineweb_train_000001.bin, or convert one at a time",
        )
    if len(set(numbers)) != len(numbers):
        raise ConfigError(
            "two sources have the same shard number", hint="convert one dataset at a time"
        )
    return [int(n) for n in numbers if n is not None]


def _convert_one(
    src: Path,
    dst: Path,
    index: int,
    seq_len: int,
    published: list[Path],
    free_space: FileSpaceProbe,
) -> tuple[ShardRecord, int]:
    """Convert one source; the files it publishes are appended to ``published``."""
    source = open_token_file(src)
    if source.format not in LLMC_BY_FORMAT:
        raise ShardFormatError(
            src, f"is a {source.format} file; convert reads llm.c .bin shards", hint="inspect it"
        )
    packer = ShardPacker(
        dst,
        fmt=TokenFormat.TEMPLAR,
        dtype=source.dtype,
        seq_len=seq_len,
        row_len=seq_len,
        rows_per_shard=None,
        first_index=index,
        names=shard_file_names(TokenFormat.TEMPLAR, index),
        free_space=free_space,
    )
    try:
        for start in range(0, source.num_tokens, COPY_CHUNK_TOKENS):
            packer.add(source.tokens[start : start + COPY_CHUNK_TOKENS])
        records = packer.finish()
    except BaseException:
        packer.abort()
        raise
    finally:
        published.extend(packer.published)
    if not records:
        raise ShardFormatError(
            src, f"holds {source.num_tokens} tokens, fewer than one sequence of {seq_len}"
        )
    return records[0], packer.dropped_tokens


def convert_llmc_to_templar(
    sources: list[Path],
    dst: Path,
    *,
    seq_len: int,
    val_shards: int | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    free_space_probe: FileSpaceProbe = free_bytes_for,
) -> ConvertResult:
    """Convert llm.c shards into a templar dataset folder ``dst`` (new or empty)."""
    if seq_len < 2:
        raise ConfigError(f"--seq-len must be >= 2, got {seq_len}")
    sources = sorted({Path(s) for s in sources}, key=lambda p: (number_of(p) or 0, p.name))
    numbers = _shard_numbers(sources)
    variants = {LLMC_BY_FORMAT.get(open_token_file(s).format) for s in sources}
    if None in variants or len(variants) != 1:
        raise ConfigError("sources must all be llm.c shards of one variant (gpt2 or llama3)")
    variant = next(iter(variants))
    assert variant is not None
    held_out = min(1, len(sources) - 1) if val_shards is None else val_shards
    if not 0 <= held_out < len(sources):
        raise ConfigError(f"--val-shards {held_out} must be >= 0 and below the number of sources")
    ensure_empty_dir(dst, flag="DST")
    published: list[Path] = []
    try:
        jobs = list(zip(sources, numbers, strict=True))
        records, dropped = _convert_sources(jobs, dst, seq_len, published, free_space_probe)
        info = _dataset_info(records, variant, seq_len=seq_len, held_out=held_out, dst=dst)
        manifest = write_dataset_manifest(
            dst, records, info, part_size=part_size, free_space=free_space_probe
        )
        return ConvertResult(records, manifest, dropped)
    except BaseException:  # a failed conversion keeps nothing: DST is empty again
        for path in published:
            path.unlink(missing_ok=True)
        raise


def _convert_sources(
    jobs: list[tuple[Path, int]],
    dst: Path,
    seq_len: int,
    published: list[Path],
    free_space: FileSpaceProbe,
) -> tuple[list[ShardRecord], int]:
    records, dropped = [], 0
    for src, index in jobs:
        record, lost = _convert_one(src, dst, index, seq_len, published, free_space)
        records.append(record)
        dropped += lost
        log.info("converted %s -> %s (%d tokens dropped)", src, record.tokens_path.name, lost)
    return records, dropped


def _dataset_info(
    records: list[ShardRecord], variant: LlmcVariant, *, seq_len: int, held_out: int, dst: Path
) -> DatasetInfo:
    vocab_size, eot = VOCAB_BY_TOKENIZER[variant.tokenizer]
    top = max(r.max_token_id for r in records)
    if top >= vocab_size:
        raise ShardFormatError(
            dst, f"token id {top} is >= the {variant.tokenizer} vocabulary size {vocab_size}"
        )
    return DatasetInfo(
        tokenizer=variant.tokenizer,
        vocab_size=vocab_size,
        eot_token_id=eot,
        seq_len=seq_len,
        val_shards=held_out,
        format=str(TokenFormat.TEMPLAR),
        dtype=records[0].dtype,
        shards=len(records),
        tokens=sum(r.num_tokens for r in records),
    )
