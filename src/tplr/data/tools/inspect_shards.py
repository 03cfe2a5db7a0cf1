"""``tplr shards inspect``: detect and validate token files, one JSON object per file.

A directory is inspected shard by shard (its tokens files, each with its sample ids).
An invalid file gives ``{"path": …, "ok": false, "error": …, "hint": …}``; the
command exits non-zero when any file is invalid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tplr.comms.manifest import MANIFEST_NAME, read_manifest
from tplr.data.dataset_manifest import entry_metadata
from tplr.data.formats import (
    SAMPLE_ID_DTYPE,
    ShardFormatError,
    TokenShard,
    open_shard,
)
from tplr.data.layout import group_shards, is_sample_ids_name
from tplr.data.validate import (
    check_token_ids,
    max_token_id,
    raise_if_over_vocab,
    sampled_max_token_id,
)
from tplr.errors import TplrError

FIRST_TOKENS = 8


def files_to_inspect(paths: list[Path]) -> list[Path]:
    """Files named, plus each shard's tokens file under named directories."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            names = sorted(p.name for p in path.iterdir() if p.is_file())
            found.extend(path / keys[0] for keys in group_shards(names))
        else:
            found.append(path)
    return found


def _sample_ids_report(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size == 0 or size % SAMPLE_ID_DTYPE.itemsize:
        raise ShardFormatError(path, f"is {size} bytes, not a whole number (> 0) of uint64 ids")
    ids = np.memmap(path, dtype=SAMPLE_ID_DTYPE, mode="r")
    return {
        "path": str(path),
        "ok": True,
        "format": "sample-ids",
        "dtype": "uint64",
        "ids": int(ids.shape[0]),
        "first_ids": [int(v) for v in ids[:FIRST_TOKENS]],
    }


def _check_against_manifest(shard: TokenShard, top: int | None) -> None:
    manifest_path = shard.path.parent / MANIFEST_NAME
    if not manifest_path.is_file():
        return
    meta = entry_metadata(read_manifest(manifest_path), shard.path.name)
    for name, actual in (("tokens", shard.tokens.shape[0]), ("max_token_id", top)):
        recorded = meta.get(name)
        if actual is not None and recorded is not None and recorded != actual:
            raise ShardFormatError(
                shard.path,
                f"has {name} {actual}, but {manifest_path} records {recorded}",
                hint="re-download the file, or regenerate the manifest",
            )


def _shard_report(shard: TokenShard, seq_len: int | None, top: int) -> dict[str, Any]:
    tokens = shard.tokens
    if shard.sample_ids is not None:
        sequences: int | None = int(shard.sample_ids.shape[0])
        seq = shard.seq_len
    else:
        seq = seq_len
        sequences = int(tokens.shape[0] // (seq_len + 1)) if seq_len else None
    report: dict[str, Any] = {
        "path": str(shard.path),
        "ok": True,
        "format": str(shard.format),
        "dtype": shard.tokens_file.dtype.name,
        "tokens": int(tokens.shape[0]),
        "sequences": sequences,
        "seq_len": seq,
        "max_token_id": top,
        "first_tokens": [int(v) for v in tokens[:FIRST_TOKENS]],
    }
    if shard.ids_path is not None:
        report["sample_ids_path"] = str(shard.ids_path)
    return report


def inspect_file(
    path: Path,
    *,
    raw_uint16: bool = False,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    sample_only: bool = False,
) -> dict[str, Any]:
    """The JSON-ready report of one file; raises :class:`ShardFormatError` if invalid."""
    if is_sample_ids_name(path.name) and path.is_file() and not raw_uint16:
        return _sample_ids_report(path)
    shard = open_shard(path, seq_len=seq_len, raw_uint16=raw_uint16)
    top = sampled_max_token_id(shard.tokens) if sample_only else max_token_id(shard.tokens)
    if vocab_size is not None and sample_only:
        check_token_ids(shard.tokens, vocab_size, path=path)
    elif vocab_size is not None and top >= vocab_size:
        raise_if_over_vocab(shard.tokens, vocab_size, path=path)
    _check_against_manifest(shard, None if sample_only else top)
    report = _shard_report(shard, seq_len, top)
    if sample_only:
        report["max_token_id_sampled"] = True
    return report


def inspect_paths(paths: list[Path], **options: Any) -> tuple[list[dict[str, Any]], bool]:
    """Reports for every file, and whether all of them are valid."""
    reports = []
    all_ok = True
    for path in files_to_inspect(paths):
        try:
            reports.append(inspect_file(path, **options))
        except TplrError as exc:
            all_ok = False
            reports.append({"path": str(path), "ok": False, "error": exc.message, "hint": exc.hint})
    return reports, all_ok
