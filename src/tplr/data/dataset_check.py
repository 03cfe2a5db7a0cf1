"""Check a dataset prefix before a run is built on it: the lead validator calls
:func:`check_dataset_for_run` before it creates ``run.json``, and ``tplr doctor`` does too.

Through the given store it reads the manifest (or lists the prefix), lists the prefix to
see that every file the manifest names is there with its recorded size, and reads the
header of the first training shard and of the first validation shard (two ranged GETs of
at most a few KiB). It returns a :class:`DatasetSummary`, or raises:

- the store's ``NotFound`` / ``AccessDenied`` (missing bucket, wrong keys), with its hint;
- :class:`~tplr.comms.manifest.ManifestError` for a malformed manifest, and
  :class:`~tplr.data.formats.ShardFormatError` for a shard header that is not what its
  name or the manifest says;
- :class:`DatasetCheckError` (a :class:`~tplr.data.layout.DatasetLayoutError`) for an empty
  prefix, no recognisable shards, no validation shard, files missing or of the wrong size,
  odd-sized shard files, a sequence length other than the one asked for, or token ids
  beyond the vocabulary asked for.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tplr.comms.manifest import Manifest
from tplr.comms.stores.base import ObjectStore
from tplr.data.dataset_manifest import dataset_info, entry_metadata
from tplr.data.formats import (
    LLMC_HEADER_BYTES,
    NPY_PREAMBLE_BYTES,
    SAMPLE_ID_DTYPE,
    npy_header_bytes,
    parse_llmc_header,
    parse_npy_tokens_header,
)
from tplr.data.layout import DatasetLayoutError
from tplr.data.manager_catalog import ShardCatalog, ShardSpec, discover_catalog, listed_sizes

_FIRST_READ_BYTES = 4096


class DatasetCheckError(DatasetLayoutError):
    """The dataset prefix cannot carry the run that was asked for."""

    hint = "fix the dataset (re-upload with `tplr shards upload`) or the run's settings"


@dataclass(frozen=True, slots=True)
class DatasetSummary:
    """What a run on this dataset gets. Sizes in bytes; shards in schedule order."""

    url: str
    format: str  # "templar" or "llmc"
    token_dtype: str  # "uint16" or "uint32", from the first shard's header
    has_manifest: bool
    train_shards: int
    val_shards: int
    shard_bytes: tuple[int, ...]  # each training shard (all of its files)
    val_bytes: int
    seq_len: int | None  # recorded in the manifest, or stored in templar shards
    vocab_size: int | None  # the tokenizer's, recorded in the manifest
    max_token_id: int | None  # the largest recorded in the manifest

    @property
    def next_shard_bytes(self) -> int:
        """Disk a node starting at window 0 needs first (training shard 0)."""
        return self.shard_bytes[0]

    @property
    def largest_shard_bytes(self) -> int:
        return max(self.shard_bytes)

    def describe(self) -> str:
        """One line for logs and ``tplr doctor``."""
        vocab = f", vocab {self.vocab_size}" if self.vocab_size is not None else ""
        top = f", max token id {self.max_token_id}" if self.max_token_id is not None else ""
        return (
            f"{self.url}: {self.format} ({self.token_dtype}), {self.train_shards} training + "
            f"{self.val_shards} validation shard(s), seq_len {self.seq_len or 'not recorded'}"
            f"{vocab}{top}; next shard {self.next_shard_bytes} bytes"
            + ("" if self.has_manifest else " (no manifest: sizes from the listing)")
        )


async def check_dataset_for_run(
    store: ObjectStore,
    prefix: str,
    *,
    sequence_length: int | None = None,
    vocab_size: int | None = None,
) -> DatasetSummary:
    """Check the dataset under ``prefix`` for a run of ``sequence_length`` and
    ``vocab_size`` (each checked when given); see the module docstring for the errors."""
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    catalog = await discover_catalog(store, prefix, None)
    manifest = await asyncio.to_thread(catalog.manifest)  # parsing megabytes: off the loop
    if manifest is not None:
        _check_listed(manifest, await listed_sizes(store, prefix), store.url(prefix))
    if not catalog.val:
        raise DatasetCheckError(
            f"{store.url(prefix)} has no validation shard ({len(catalog.train)} training "
            "shard(s), none held out)",
            hint="hold one out (dataset.val_shards >= 1, or a *_val_* shard), or add a shard",
        )
    first = await _probe_header(store, prefix, catalog.train[0])
    await _probe_header(store, prefix, catalog.val[0])
    _check_sizes(catalog, first, store.url(prefix))
    seq_len = _recorded_seq_len(manifest) or first.stored_seq_len
    if sequence_length is not None and seq_len is not None and seq_len != sequence_length:
        raise DatasetCheckError(
            f"{store.url(prefix)} holds sequences of {seq_len} tokens, but the run asks for "
            f"sequence_length {sequence_length}",
            hint=f"run with sequence length {seq_len}, or prepare shards with --seq-len "
            f"{sequence_length}",
        )
    recorded_vocab, top = _recorded_vocab(manifest)
    _check_vocab(recorded_vocab, top, vocab_size, store.url(prefix))
    return DatasetSummary(
        url=store.url(prefix),
        format="templar" if _is_templar(catalog.train[0]) else "llmc",
        token_dtype=first.dtype_name,
        has_manifest=manifest is not None,
        train_shards=len(catalog.train),
        val_shards=len(catalog.val),
        shard_bytes=tuple(spec.size_bytes for spec in catalog.train),
        val_bytes=sum(spec.size_bytes for spec in catalog.val),
        seq_len=seq_len,
        vocab_size=recorded_vocab,
        max_token_id=top,
    )


@dataclass(frozen=True, slots=True)
class _Header:
    dtype_name: str
    itemsize: int
    offset: int  # bytes before the tokens
    count: int
    stored_seq_len: int | None


def _check_listed(manifest: Manifest, listed: dict[str, int], where: str) -> None:
    for key, entry in manifest.files.items():
        if key not in listed:
            raise DatasetCheckError(
                f"{where}{key} is named by the manifest but is not in the bucket",
                hint="upload the dataset again with `tplr shards upload` (manifest last)",
            )
        if listed[key] != entry.size:
            raise DatasetCheckError(
                f"{where}{key} is {listed[key]} bytes, but the manifest records {entry.size}",
                hint="an upload was interrupted or replaced; upload the dataset again",
            )


async def _read_head(store: ObjectStore, key: str, size: int, length: int) -> bytes:
    buf = bytearray(min(size, length))
    if buf:
        await store.get_range(key, 0, memoryview(buf))
    return bytes(buf)


async def _probe_header(store: ObjectStore, prefix: str, spec: ShardSpec) -> _Header:
    """Read and check the header of ``spec``'s tokens file against its size."""
    key, size = prefix + spec.keys[0], spec.sizes[0]
    where = store.url(key)
    head = await _read_head(store, key, size, _FIRST_READ_BYTES)
    if _is_templar(spec):
        total = npy_header_bytes(head[:NPY_PREAMBLE_BYTES], size, where)
        if total > len(head):
            head = await _read_head(store, key, size, total)
        npy = parse_npy_tokens_header(head, size, where)
        seq_len = npy.stored_seq_len or _ids_seq_len(spec, npy.count, store.url(prefix))
        return _Header(npy.dtype.name, npy.dtype.itemsize, npy.offset, npy.count, seq_len)
    variant, ntok = parse_llmc_header(head[:LLMC_HEADER_BYTES], size, where)
    return _Header(variant.dtype.name, variant.dtype.itemsize, LLMC_HEADER_BYTES, ntok, None)


def _is_templar(spec: ShardSpec) -> bool:
    return len(spec.keys) > 1  # templar shards are tokens + sample ids


def _ids_seq_len(spec: ShardSpec, tokens: int, where: str) -> int:
    """A templar shard's sequence length from its sample ids file's size."""
    ids_size = spec.sizes[1]
    ids = ids_size // SAMPLE_ID_DTYPE.itemsize
    if ids == 0 or tokens % ids:
        raise DatasetCheckError(
            f"{where}{spec.keys[1]} holds {ids} sample ids, which do not divide the {tokens} "
            f"tokens of {spec.keys[0]} into equal sequences"
        )
    return tokens // ids


def _check_sizes(catalog: ShardCatalog, first: _Header, where: str) -> None:
    """Every shard file's size fits its format (odd sizes mean a torn or foreign file)."""
    for spec in catalog.train + catalog.val:
        tokens_size = spec.sizes[0]
        body = tokens_size - first.offset
        if body <= 0 or body % first.itemsize:
            raise DatasetCheckError(
                f"{where}{spec.keys[0]} is {tokens_size} bytes: not a {first.offset}-byte header "
                f"plus whole {first.dtype_name} tokens",
                hint="the file is truncated or not a shard of this dataset; upload it again",
            )
        if len(spec.sizes) > 1 and (spec.sizes[1] == 0 or spec.sizes[1] % 8):
            raise DatasetCheckError(
                f"{where}{spec.keys[1]} is {spec.sizes[1]} bytes: not a whole number (> 0) of "
                "uint64 sample ids",
                hint="the file is truncated; upload it again",
            )


def _recorded_seq_len(manifest: Manifest | None) -> int | None:
    if manifest is None:
        return None
    info = dataset_info(manifest)
    if info is not None:
        return info.seq_len
    lengths = {entry_metadata(manifest, key).get("seq_len") for key in manifest.files} - {None}
    return lengths.pop() if len(lengths) == 1 else None


def _recorded_vocab(manifest: Manifest | None) -> tuple[int | None, int | None]:
    """The tokenizer vocabulary and the largest token id the manifest records."""
    if manifest is None:
        return None, None
    info = dataset_info(manifest)
    ids = [entry_metadata(manifest, key).get("max_token_id") for key in manifest.files]
    known = [value for value in ids if isinstance(value, int)]
    return (info.vocab_size if info else None), (max(known) if known else None)


def _check_vocab(recorded: int | None, top: int | None, vocab_size: int | None, where: str):
    if vocab_size is None:
        return
    if top is not None and top >= vocab_size:
        raise DatasetCheckError(
            f"{where} holds token id {top} (recorded in its manifest), but the run's "
            f"vocab_size is {vocab_size} (ids 0..{vocab_size - 1})",
            hint=f"run with vocab_size >= {top + 1}, or use shards made for this vocabulary",
        )
    if recorded is not None and recorded > vocab_size:
        raise DatasetCheckError(
            f"{where} was tokenized with a vocabulary of {recorded}, but the run's "
            f"vocab_size is {vocab_size}",
            hint=f"run with vocab_size {recorded}",
        )
