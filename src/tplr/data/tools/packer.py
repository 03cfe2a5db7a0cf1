"""Pack a token stream into shards of whole sequences (rows), written atomically.

A row is ``row_len`` tokens: the sequence length for templar shards, ``seq_len + 1``
for llm.c streams (the windows the dataset reads). Shards hold whole rows only, so a
sample never straddles two shards; fewer than ``row_len`` tokens left at the very end
are dropped and counted in :attr:`ShardPacker.dropped_tokens`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tplr.data.dataset_manifest import ShardRecord
from tplr.data.formats import TokenFormat
from tplr.data.tools.writers import FileSpaceProbe, TokenShardWriter, write_derived_sample_ids
from tplr.errors import ConfigError


def shard_file_names(fmt: TokenFormat, index: int) -> tuple[str, str | None]:
    """``(tokens file, sample ids file or None)`` for shard ``index``."""
    if fmt is TokenFormat.TEMPLAR:
        return f"train_{index:06d}.npy", f"sample_ids_{index:06d}.bin"
    return f"train_{index:06d}.bin", None


def ensure_empty_dir(out_dir: Path, *, flag: str = "--out") -> None:
    """Create ``out_dir``, or accept it if empty: a dataset folder never mixes runs."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{flag} {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(
            f"{flag} {out_dir} is not empty",
            hint="write a dataset into an empty (or new) folder, so shards never mix",
        )
    out_dir.mkdir(parents=True, exist_ok=True)


class ShardPacker:
    """Feed token arrays with :meth:`add`; :meth:`finish` returns one record per shard."""

    def __init__(
        self,
        out_dir: Path,
        *,
        fmt: TokenFormat,
        dtype: np.dtype,
        seq_len: int,
        row_len: int,
        rows_per_shard: int | None,
        first_index: int = 0,
        names: tuple[str, str | None] | None = None,
        free_space: FileSpaceProbe | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.format = fmt
        self.dtype = np.dtype(dtype)
        self.seq_len = seq_len
        self.row_len = row_len
        self.rows_per_shard = rows_per_shard
        self.next_index = first_index
        self._names = names  # fixed names for a single-shard packer (convert)
        self._free_space = free_space
        self._writer: TokenShardWriter | None = None
        self._carry = np.empty(0, dtype=self.dtype)
        self.records: list[ShardRecord] = []
        self.published: list[Path] = []  # every file written under its final name, in order
        self.dropped_tokens = 0

    def _open(self) -> TokenShardWriter:
        tokens_name, _ = self._names or shard_file_names(self.format, self.next_index)
        self._writer = TokenShardWriter(
            self.out_dir / tokens_name, self.format, self.dtype, free_space=self._free_space
        )
        return self._writer

    def _space_rows(self) -> int | None:
        if self.rows_per_shard is None:
            return None
        written = self._writer.num_tokens // self.row_len if self._writer else 0
        return self.rows_per_shard - written

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens; whole rows go to disk, a partial row waits for more."""
        if self._carry.size:
            tokens = np.concatenate((self._carry, tokens))  # promotes, never truncates ids
        rows = tokens.size // self.row_len
        self._carry = tokens[rows * self.row_len :].copy()
        pos = 0
        while rows:
            writer = self._writer or self._open()
            space = self._space_rows()
            take = rows if space is None else min(rows, space)
            writer.append(tokens[pos : pos + take * self.row_len])
            pos += take * self.row_len
            rows -= take
            if space is not None and take == space:
                self._close_shard()

    def _close_shard(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        written = writer.finish()  # removes its temp file itself if it fails
        self.published.append(written.path)
        num_rows = written.num_tokens // self.row_len
        _, ids_name = self._names or shard_file_names(self.format, self.next_index)
        ids_path = self.out_dir / ids_name if ids_name else None
        if ids_path is not None:
            write_derived_sample_ids(
                ids_path, self.next_index, num_rows, self.row_len, free_space=self._free_space
            )
            self.published.append(ids_path)
        self.records.append(
            ShardRecord(
                index=self.next_index,
                format=str(self.format),
                dtype=self.dtype.name,
                tokens_path=written.path,
                ids_path=ids_path,
                num_tokens=written.num_tokens,
                num_sequences=num_rows,
                seq_len=self.seq_len,
                max_token_id=written.max_token_id,
            )
        )
        self.next_index += 1

    def finish(self) -> list[ShardRecord]:
        self.dropped_tokens += int(self._carry.size)
        self._carry = self._carry[:0]
        self._close_shard()
        return self.records

    def abort(self) -> None:
        """Drop the shard being written (its temp file)."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def remove_published(self) -> None:
        """Delete every file this packer published (a run that failed keeps nothing)."""
        for path in self.published:
            path.unlink(missing_ok=True)
        self.published.clear()
