"""``SharedShardedDataset``: one memory-mapped shard seen as rows of tokens (samples).

A sample is one row of ``row_len`` tokens; the model learns to predict ``row[1:]``
from ``row[:-1]``, so the context is ``T = row_len - 1``:

- templar shards: a row is one stored sequence (``seq_len`` tokens, its own sample
  id), so ``T = seq_len - 1``; the last token of a sequence is only ever a target.
- llm.c / raw streams: rows are the non-overlapping windows of ``seq_len + 1``
  tokens, so ``T = seq_len``; the tail shorter than a window is unused. Their ids are
  derived: ``(shard_index << 40) | token offset of the window``.

Rows never cross a shard boundary. ``dataset[i]`` is a zero-copy view.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tplr.data.formats import ShardFormatError, TokenShard, open_shard, shard_number_from_name
from tplr.data.tools.writers import derive_sample_ids
from tplr.data.validate import check_token_ids
from tplr.errors import TplrError


class SampleIndexError(TplrError):
    """A sample index is outside the dataset."""

    hint = "sample indices must come from the sampler for this shard (0 <= i < len(dataset))"


class SharedShardedDataset:
    """Rows of one shard. Build with :meth:`open`, or from an opened :class:`TokenShard`."""

    def __init__(
        self,
        shard: TokenShard,
        *,
        seq_len: int,
        shard_index: int,
        vocab_size: int | None = None,
    ) -> None:
        if seq_len < (1 if shard.format.is_stream else 2):
            raise ShardFormatError(shard.path, f"sequence length {seq_len} is too short")
        self.shard = shard
        self.shard_index = shard_index
        self.seq_len = seq_len
        # The model's vocabulary, when known: the loader checks every batch against it.
        self.vocab_size = vocab_size
        if shard.format.is_stream:
            self.row_len = seq_len + 1
        else:
            if shard.seq_len != seq_len:
                raise ShardFormatError(
                    shard.path,
                    f"stores sequences of {shard.seq_len} tokens, but seq_len={seq_len} was asked",
                    hint=f"use seq_len {shard.seq_len} for this shard",
                )
            self.row_len = seq_len
        num_rows = shard.tokens.shape[0] // self.row_len
        if num_rows == 0:
            raise ShardFormatError(
                shard.path,
                f"holds {shard.tokens.shape[0]} tokens, fewer than one sample of {self.row_len}",
            )
        # (num_rows, row_len) view of the memory map: no tokens are read here.
        self.rows = shard.tokens[: num_rows * self.row_len].reshape(num_rows, self.row_len)

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        seq_len: int,
        shard_index: int | None = None,
        ids_path: Path | str | None = None,
        raw_uint16: bool = False,
        vocab_size: int | None = None,
        recorded_max_token_id: int | None = None,
    ) -> SharedShardedDataset:
        """Open, validate and map a shard; check token ids cheaply if ``vocab_size``.

        The check at open reads a sample of blocks; every batch is then checked in full
        by the loader (:class:`~tplr.data.loader.BatchAssembler`) against ``vocab_size``."""
        shard = open_shard(
            path,
            ids_path=ids_path,
            seq_len=seq_len,
            raw_uint16=raw_uint16,
        )
        if shard_index is None:
            shard_index = shard_number_from_name(path)
        if shard_index is None:
            raise ShardFormatError(
                path, "has no shard number in its name", hint="pass shard_index explicitly"
            )
        if vocab_size is not None:
            check_token_ids(shard.tokens, vocab_size, path=path, recorded_max=recorded_max_token_id)
        return cls(shard, seq_len=seq_len, shard_index=shard_index, vocab_size=vocab_size)

    @property
    def context_len(self) -> int:
        """``T``: tokens per input row (and per target row)."""
        return self.row_len - 1

    @property
    def token_dtype(self) -> np.dtype:
        return self.rows.dtype

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        """Row ``index`` (``row_len`` tokens), a zero-copy view of the shard."""
        if not -len(self) <= index < len(self):
            raise SampleIndexError(f"sample {index} is outside 0..{len(self) - 1}")
        return self.rows[index]

    def sample_id(self, index: int) -> int:
        return int(self.sample_ids(np.asarray([index]))[0])

    def sample_ids(self, indices: np.ndarray) -> np.ndarray:
        """The uint64 ids of rows ``indices`` (stored for templar, derived for streams)."""
        indices = self.check_indices(indices)
        if self.shard.sample_ids is not None:
            return np.asarray(self.shard.sample_ids[indices], dtype=np.uint64)
        return derive_sample_ids(self.shard_index, indices, self.row_len)

    def check_indices(self, indices: np.ndarray) -> np.ndarray:
        """``indices`` as int64, or :class:`SampleIndexError` if any is out of range."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            bad = indices[(indices < 0) | (indices >= len(self))][0]
            raise SampleIndexError(
                f"sample index {int(bad)} is outside 0..{len(self) - 1} of {self.shard.path.name}"
            )
        return indices
