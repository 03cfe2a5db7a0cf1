"""Tokenizers for ``tplr shards prepare``: GPT-2 (tiktoken, offline cache) and bytes.

``bytes`` is byte-level: token = UTF-8 byte (0..255), end-of-text = 256, vocab 257.
It always works offline. ``gpt2`` uses tiktoken's GPT-2 encoding (vocab 50257,
end-of-text 50256) from tiktoken's local cache; this module never downloads: if the
encoding files are not cached it raises :class:`TokenizerUnavailable` saying how to
provide them.

Each document becomes ``[eot] + tokens(document)`` (the llm.c / modded-nanogpt
convention), so documents are separated by the end-of-text token.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from tplr.errors import TplrError

TOKENIZER_NAMES = ("gpt2", "bytes")

# The files tiktoken's "gpt2" encoding loads (its cache key is the sha1 of the URL).
_GPT2_BLOBS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


class TokenizerUnavailable(TplrError):
    """The requested tokenizer cannot be loaded on this machine."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_token_id: int

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """``[eot] + tokens(text)`` for each text, concatenated, as uint32."""
        ...


@dataclass(frozen=True)
class BytesTokenizer:
    name: str = "bytes"
    vocab_size: int = 257
    eot_token_id: int = 256

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        encoded = [text.encode("utf-8") for text in texts]
        if not encoded:
            return np.empty(0, dtype=np.uint32)
        lengths = np.fromiter((len(b) + 1 for b in encoded), dtype=np.int64, count=len(encoded))
        out = np.empty(int(lengths.sum()), dtype=np.uint32)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        out[starts] = self.eot_token_id
        body = np.ones(out.size, dtype=bool)
        body[starts] = False
        out[body] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        return out


def tiktoken_cache_dir() -> Path:
    """Where tiktoken looks for cached encoding files (same rules as tiktoken)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def missing_gpt2_cache_files(cache_dir: Path) -> list[Path]:
    paths = [cache_dir / hashlib.sha1(url.encode()).hexdigest() for url in _GPT2_BLOBS]
    return [p for p in paths if not p.is_file()]


class Gpt2Tokenizer:
    name = "gpt2"
    vocab_size = 50257
    eot_token_id = 50256

    def __init__(self) -> None:
        try:
            import tiktoken
        except ImportError as exc:
            raise TokenizerUnavailable(
                "the gpt2 tokenizer needs the tiktoken package, which is not installed",
                hint="pip install 'tplr[gpt2]' (or tiktoken), or use --tokenizer bytes",
            ) from exc
        cache_dir = tiktoken_cache_dir()
        missing = missing_gpt2_cache_files(cache_dir)
        if missing:
            raise TokenizerUnavailable(
                f"the gpt2 encoding is not in tiktoken's offline cache {cache_dir} "
                f"(missing {', '.join(p.name for p in missing)}), and tplr does not download it",
                hint=(
                    'on a machine with internet run `python -c "import tiktoken; '
                    "tiktoken.get_encoding('gpt2')\"` with TIKTOKEN_CACHE_DIR set, copy that "
                    "folder here and set TIKTOKEN_CACHE_DIR to it; or use --tokenizer bytes"
                ),
            )
        self._encoding = tiktoken.get_encoding("gpt2")

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        pieces = self._encoding.encode_ordinary_batch(list(texts), num_threads=1)
        lengths = [len(p) + 1 for p in pieces]
        out = np.empty(sum(lengths), dtype=np.uint32)
        pos = 0
        for piece, length in zip(pieces, lengths, strict=True):
            out[pos] = self.eot_token_id
            out[pos + 1 : pos + length] = piece
            pos += length
        return out


def get_tokenizer(name: str) -> Tokenizer:
    if name == "bytes":
        return BytesTokenizer()
    if name == "gpt2":
        return Gpt2Tokenizer()
    raise TokenizerUnavailable(
        f"unknown tokenizer {name!r}", hint=f"use one of: {', '.join(TOKENIZER_NAMES)}"
    )


def token_dtype_for(vocab_size: int) -> np.dtype:
    """The smallest shard dtype that holds every id of a vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")
