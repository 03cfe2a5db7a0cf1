"""Byte-level builders of token files for the data tests, written independently of
tplr's own writers (plain numpy), so reader and writer are checked against each other."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

GPT2_MAGIC, GPT2_VERSION = 20240520, 1
LLAMA3_MAGIC, LLAMA3_VERSION = 20240801, 7


def llmc_bytes(
    tokens: np.ndarray,
    *,
    magic: int = GPT2_MAGIC,
    version: int = GPT2_VERSION,
    dtype: str = "<u2",
    ntok: int | None = None,
) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[0], header[1] = magic, version
    header[2] = len(tokens) if ntok is None else ntok
    return header.tobytes() + np.asarray(tokens, dtype=dtype).tobytes()


def write_llmc(path: Path, tokens: np.ndarray, **kwargs) -> Path:
    path.write_bytes(llmc_bytes(tokens, **kwargs))
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_templar(
    folder: Path,
    index: int,
    tokens: np.ndarray,
    seq_len: int,
    *,
    dtype: str = "<u2",
    ids: np.ndarray | None = None,
) -> tuple[Path, Path]:
    """``train_NNNNNN.npy`` + ``sample_ids_NNNNNN.bin`` (ids 1000 + row by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens_path = folder / f"train_{index:06d}.npy"
    ids_path = folder / f"sample_ids_{index:06d}.bin"
    tokens_path.write_bytes(npy_bytes(np.asarray(tokens, dtype=dtype)))
    if ids is None:
        ids = 1000 + np.arange(len(tokens) // seq_len)
    ids_path.write_bytes(np.asarray(ids, dtype="<u8").tobytes())
    return tokens_path, ids_path


def ramp(count: int, *, modulo: int = 50000, start: int = 7) -> np.ndarray:
    """A recognisable token stream: ``(start + i) % modulo``."""
    return ((start + np.arange(count)) % modulo).astype(np.int64)
