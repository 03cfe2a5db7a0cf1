"""Token id checks against a model's vocabulary: a full scan, or a cheap sampled check.

A shard of hundreds of GB cannot be scanned at every start, so :func:`check_token_ids`
reads evenly spaced blocks (always the first and the last) and compares the maximum
recorded in the manifest at preparation time, when there is one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tplr.data.formats import ShardFormatError

FULL_SCAN_CHUNK_TOKENS = 1 << 24
DEFAULT_SAMPLE_TOKENS = 1 << 20
DEFAULT_SAMPLE_BLOCKS = 16

_VOCAB_HINT = (
    "the shard was tokenized with a different tokenizer than the model uses; "
    "use shards made for this model's vocabulary, or fix the model's vocab size"
)


class TokenIdOutOfRange(ShardFormatError):
    """A batch holds a token id the model cannot embed (names the shard, sample and token)."""

    hint = _VOCAB_HINT


def batch_token_range_error(
    rows: np.ndarray, indices: np.ndarray, vocab_size: int, *, path: Path | str
) -> TokenIdOutOfRange:
    """The error for the first token ``>= vocab_size`` in ``rows`` (``(B, row_len)`` ids of
    samples ``indices``); call it only once a batch's max showed there is one."""
    over = rows >= vocab_size
    batch_row = int(np.flatnonzero(over.any(axis=1))[0])
    column = int(over[batch_row].argmax())
    sample = int(indices[batch_row])
    return TokenIdOutOfRange(
        path,
        f"sample {sample} (row {sample} of the shard, token {column} of the row) holds token "
        f"id {int(rows[batch_row, column])}, >= the model's vocabulary size {vocab_size}",
    )


def max_token_id(tokens: np.ndarray, *, chunk_tokens: int = FULL_SCAN_CHUNK_TOKENS) -> int:
    """The largest token id, scanning ``tokens`` in bounded chunks."""
    best = 0
    for start in range(0, tokens.shape[0], chunk_tokens):
        best = max(best, int(tokens[start : start + chunk_tokens].max()))
    return best


def first_token_at_or_above(
    tokens: np.ndarray, limit: int, *, chunk_tokens: int = FULL_SCAN_CHUNK_TOKENS
) -> tuple[int, int] | None:
    """``(position, id)`` of the first token id ``>= limit``, scanning in chunks."""
    for start in range(0, tokens.shape[0], chunk_tokens):
        chunk = tokens[start : start + chunk_tokens]
        over = chunk >= limit
        if over.any():
            position = int(over.argmax())
            return start + position, int(chunk[position])
    return None


def raise_if_over_vocab(tokens: np.ndarray, vocab_size: int, *, path: Path | str) -> None:
    """Full-scan check: :class:`ShardFormatError` naming the first id ``>= vocab_size``."""
    found = first_token_at_or_above(tokens, vocab_size)
    if found is not None:
        position, value = found
        raise ShardFormatError(
            path,
            f"token id {value} at token position {position} is >= the model's vocabulary "
            f"size {vocab_size}",
            hint=_VOCAB_HINT,
        )


def sample_block_starts(num_tokens: int, block_tokens: int, blocks: int) -> list[int]:
    """Evenly spaced block starts covering the first and the last ``block_tokens``."""
    if num_tokens <= block_tokens * blocks:
        return list(range(0, num_tokens, block_tokens))
    last = num_tokens - block_tokens
    return sorted({round(i * last / (blocks - 1)) for i in range(blocks)})


def sampled_max_token_id(
    tokens: np.ndarray,
    *,
    sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
    blocks: int = DEFAULT_SAMPLE_BLOCKS,
) -> int:
    """The largest id in the deterministic sample :func:`check_token_ids` reads."""
    block_tokens = max(1, sample_tokens // max(blocks, 1))
    starts = sample_block_starts(tokens.shape[0], block_tokens, max(blocks, 2))
    return max(int(tokens[start : start + block_tokens].max()) for start in starts)


def check_token_ids(
    tokens: np.ndarray,
    vocab_size: int,
    *,
    path: Path | str,
    recorded_max: int | None = None,
    sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
    blocks: int = DEFAULT_SAMPLE_BLOCKS,
) -> None:
    """Raise :class:`ShardFormatError` if a token id is ``>= vocab_size``.

    Checks the recorded maximum (from the manifest) and a deterministic sample of
    ``sample_tokens`` tokens in ``blocks`` blocks; a file no larger than the sample is
    checked whole. A sampled id above the recorded maximum means the manifest does
    not describe this file.
    """
    if recorded_max is not None and recorded_max >= vocab_size:
        raise ShardFormatError(
            path,
            f"the manifest records max token id {recorded_max}, which is >= the model's "
            f"vocabulary size {vocab_size}",
            hint=_VOCAB_HINT,
        )
    block_tokens = max(1, sample_tokens // max(blocks, 1))
    for start in sample_block_starts(tokens.shape[0], block_tokens, max(blocks, 2)):
        block = tokens[start : start + block_tokens]
        position = int(block.argmax())
        value = int(block[position])
        if value >= vocab_size:
            raise ShardFormatError(
                path,
                f"token id {value} at token position {start + position} is >= the model's "
                f"vocabulary size {vocab_size}",
                hint=_VOCAB_HINT,
            )
        if recorded_max is not None and value > recorded_max:
            raise ShardFormatError(
                path,
                f"token id {value} at token position {start + position} exceeds the max "
                f"token id {recorded_max} recorded in the manifest, so the manifest does "
                f"not describe this file",
                hint="re-download the file, or regenerate the manifest",
            )
