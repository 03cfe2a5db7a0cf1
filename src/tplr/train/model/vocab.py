"""The model's vocabulary against the data's: the manifest says what the shards hold.

Shard manifests (``tplr.comms.manifest``) may carry ``vocab_size`` and ``max_token_id``: at
the top level, in the ``dataset`` section and/or per file. A model whose ``vocab_size`` is
smaller would index past its embedding (a device-side assert on GPU), so the worker's callers
check before training.
"""

from __future__ import annotations

from dataclasses import dataclass

from tplr.comms.manifest import Manifest
from tplr.train.config import ModelConfig
from tplr.train.errors import VocabMismatchError


@dataclass(frozen=True)
class DataVocab:
    """What the data declares: its tokenizer's vocabulary and/or its largest token id."""

    vocab_size: int | None = None
    max_token_id: int | None = None

    @property
    def required_vocab_size(self) -> int | None:
        """The smallest model vocabulary that embeds every token of the data."""
        candidates = [v for v in (self.vocab_size, self._after_max_id()) if v is not None]
        return max(candidates) if candidates else None

    def _after_max_id(self) -> int | None:
        return None if self.max_token_id is None else self.max_token_id + 1


def _int_field(extra: dict | None, key: str) -> int | None:
    value = (extra or {}).get(key)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def vocab_from_manifest(manifest: Manifest) -> DataVocab:
    """Largest ``vocab_size`` and ``max_token_id`` declared anywhere in the manifest:
    top level, the ``dataset`` section (``tplr shards prepare``) or any file entry."""
    top = manifest.model_extra or {}
    section = top.get("dataset") if isinstance(top.get("dataset"), dict) else {}
    vocab_sizes = [_int_field(top, "vocab_size"), _int_field(section, "vocab_size")]
    max_ids = [_int_field(top, "max_token_id"), _int_field(section, "max_token_id")]
    for entry in manifest.files.values():
        vocab_sizes.append(_int_field(entry.model_extra, "vocab_size"))
        max_ids.append(_int_field(entry.model_extra, "max_token_id"))
    known_vocab = [v for v in vocab_sizes if v is not None]
    known_ids = [v for v in max_ids if v is not None]
    return DataVocab(
        vocab_size=max(known_vocab) if known_vocab else None,
        max_token_id=max(known_ids) if known_ids else None,
    )


def check_vocab(model: ModelConfig, data: DataVocab, *, source: str = "the dataset") -> None:
    """Raise VocabMismatchError when the data holds ids the model cannot embed."""
    if data.max_token_id is not None and data.max_token_id >= model.vocab_size:
        raise VocabMismatchError(
            f"{source} holds token id {data.max_token_id} but the model's vocab_size is "
            f"{model.vocab_size} (ids 0..{model.vocab_size - 1})",
            hint=f"set --vocab-size to at least {data.required_vocab_size}",
        )
    if data.vocab_size is not None and data.vocab_size > model.vocab_size:
        raise VocabMismatchError(
            f"{source} was tokenized with a vocabulary of {data.vocab_size} but the model's "
            f"vocab_size is {model.vocab_size}",
            hint=f"set --vocab-size to at least {data.vocab_size}",
        )
