"""Token metadata in ``manifest.json``: per-file fields and a top-level ``dataset`` section.

Per tokens file: ``format``, ``dtype``, ``tokens``, ``sequences``, ``seq_len``,
``max_token_id``, ``shard_index``. Per sample ids file: ``format`` ``"sample-ids"``,
``dtype`` ``"uint64"``, ``sequences``, ``shard_index``. Top level::

    "dataset": {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token_id": 50256,
                "seq_len": 1024, "val_shards": 1, "format": "templar",
                "dtype": "uint16", "shards": 12, "tokens": 1200000000}

``seq_len`` is what ``--seq-len`` said: for templar shards the stored sequence length,
for llm.c streams the model context (samples are windows of ``seq_len + 1``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tplr.comms.manifest import (
    DATASET_SECTION,
    DEFAULT_PART_SIZE,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
    build_manifest,
    describe_validation_error,
)
from tplr.comms.stores.base import ObjectStore
from tplr.data.tools.writers import FileSpaceProbe, write_bytes_atomic

SAMPLE_IDS_FORMAT = "sample-ids"


class DatasetInfo(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    tokenizer: str
    vocab_size: int = Field(gt=0)
    eot_token_id: int | None = None
    seq_len: int = Field(gt=0)
    val_shards: int = Field(default=1, ge=0)
    format: str
    dtype: str
    shards: int = Field(ge=0)
    tokens: int = Field(ge=0)


@dataclass(frozen=True, slots=True)
class ShardRecord:
    """What was written for one shard."""

    index: int
    format: str
    dtype: str
    tokens_path: Path
    ids_path: Path | None
    num_tokens: int
    num_sequences: int
    seq_len: int
    max_token_id: int

    def metadata(self, root: Path) -> dict[str, dict]:
        meta = {
            self.tokens_path.relative_to(root).as_posix(): {
                "format": self.format,
                "dtype": self.dtype,
                "tokens": self.num_tokens,
                "sequences": self.num_sequences,
                "seq_len": self.seq_len,
                "max_token_id": self.max_token_id,
                "shard_index": self.index,
            }
        }
        if self.ids_path is not None:
            meta[self.ids_path.relative_to(root).as_posix()] = {
                "format": SAMPLE_IDS_FORMAT,
                "dtype": "uint64",
                "sequences": self.num_sequences,
                "shard_index": self.index,
            }
        return meta

    def paths(self) -> list[Path]:
        return [self.tokens_path] if self.ids_path is None else [self.tokens_path, self.ids_path]


def write_dataset_manifest(
    root: Path,
    records: list[ShardRecord],
    info: DatasetInfo,
    *,
    part_size: int = DEFAULT_PART_SIZE,
    free_space: FileSpaceProbe | None = None,
) -> Manifest:
    """Hash the shards' files and write ``root/manifest.json`` atomically, last.

    A full disk raises InsufficientSpace and leaves no ``manifest.json.tmp``."""
    metadata: dict[str, dict] = {}
    files: list[Path] = []
    for record in records:
        metadata.update(record.metadata(root))
        files.extend(record.paths())
    manifest = build_manifest(root, files, part_size=part_size, metadata=metadata)
    manifest = Manifest.model_validate({**manifest.model_dump(), "dataset": info.model_dump()})
    data = manifest.to_json().encode("utf-8")
    write_bytes_atomic(root / MANIFEST_NAME, data, free_space=free_space)
    return manifest


def dataset_info(manifest: Manifest, *, source: str = MANIFEST_NAME) -> DatasetInfo | None:
    """The manifest's ``dataset`` section, or None when it has none (a plain manifest).

    A section that is there but malformed raises :class:`ManifestError` naming ``source``
    and the field."""
    section = (manifest.model_extra or {}).get(DATASET_SECTION)
    if section is None:
        return None
    try:
        return DatasetInfo.model_validate(section, strict=True)
    except ValidationError as exc:
        raise ManifestError(
            f"{source} has an invalid {DATASET_SECTION!r} section: "
            f"{DATASET_SECTION}.{describe_validation_error(exc)}",
            location=source,
            hint="regenerate it with `tplr shards prepare` or `convert`",
        ) from None


async def fetch_manifest(store: ObjectStore, prefix: str) -> tuple[Manifest, str]:
    """The manifest under ``prefix`` (parsed) and its text, read with bounded memory.

    The object's size is checked (HEAD) before a byte is read, and exactly that many bytes
    are read, so a hostile bucket cannot make the node hold more than
    :data:`~tplr.comms.manifest.MAX_MANIFEST_BYTES`. Raises the store's ``NotFound`` when
    there is no manifest, :class:`ManifestError` when it is malformed.
    """
    key = prefix + MANIFEST_NAME
    source = store.url(key)
    info = await store.head(key)
    if info.size > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{source} is {info.size} bytes; a manifest may be at most {MAX_MANIFEST_BYTES}",
            location=source,
        )
    data = bytearray(info.size)
    if info.size:
        await store.get_range(key, 0, memoryview(data), if_match=info.etag or None)
    manifest = await asyncio.to_thread(Manifest.from_json, bytes(data), source=source)
    return manifest, data.decode("utf-8")


def entry_metadata(manifest: Manifest, key: str) -> dict:
    """The token metadata fields of one manifest entry ({} when absent)."""
    entry = manifest.files.get(key)
    return dict(entry.model_extra or {}) if entry is not None else {}
