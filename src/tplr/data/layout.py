"""Group the files of a dataset prefix into ordered shards, and split train/validation.

Input is the list of keys under a dataset prefix (from ``manifest.json`` or a bucket
listing). File names decide only the grouping; each file's format is still checked
from its bytes when it is opened (:mod:`tplr.data.formats`).

- templar: ``<name>_NNNNNN.npy`` + ``sample_ids_NNNNNN.bin`` (both must be present).
- llm.c: ``<name>_NNNNNN.bin`` (e.g. ``edu_fineweb_train_000001.bin``).

Keys are untrusted (a bucket listing or a manifest): each must be a safe relative key
(:func:`tplr.untrusted.check_key`) or the whole layout is refused; shard file names are
ASCII (``[A-Za-z0-9._-]``, ASCII digits), other names are ignored, never downloaded.
Zero-byte "folder" keys ending in ``/`` (made by bucket consoles) are ignored.

Shards are ordered by their number. Validation: files whose name says ``val``
(``fineweb_val_000000.bin``) are the validation split when present; otherwise the
last ``val_shards`` shards are held out (default 1, or the manifest's
``dataset.val_shards``), as operators do today.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from tplr.comms.manifest import MANIFEST_NAME, Manifest
from tplr.errors import TplrError
from tplr.untrusted import MalformedInput, check_key

_SHARD_RE = re.compile(r"^(?P<stem>[A-Za-z0-9._-]*?)_?(?P<number>[0-9]{1,12})\.(?P<ext>npy|bin)$")
_IDS_RE = re.compile(r"^sample_ids_(?P<number>[0-9]{1,12})\.bin$")
_VAL_RE = re.compile(r"(^|[_\-.])val(idation)?([_\-.]|$)")

Split = Literal["train", "val"]


class DatasetLayoutError(TplrError):
    """The files under a dataset prefix do not form a usable set of shards."""

    hint = "check the dataset prefix (DATASET_BINS_PATH) and that every shard uploaded fully"


@dataclass(frozen=True, slots=True)
class ShardGroup:
    """One shard: its number, format family, and the keys of its files."""

    index: int
    format: str  # "templar" or "llmc" (llm.c variants; raw uint16 is opened explicitly)
    tokens_key: str
    ids_key: str | None
    split: Split

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.tokens_key,) if self.ids_key is None else (self.tokens_key, self.ids_key)


@dataclass(frozen=True, slots=True)
class DatasetLayout:
    train: tuple[ShardGroup, ...]
    val: tuple[ShardGroup, ...]
    ignored: tuple[str, ...]

    @property
    def format(self) -> str:
        return self.train[0].format

    def train_shard(self, position: int) -> ShardGroup:
        """The train shard at ``position % len(train)`` (the shard schedule's order)."""
        return self.train[position % len(self.train)]


def is_sample_ids_name(name: str) -> bool:
    """True for a templar sample ids file name (``sample_ids_NNNNNN.bin``)."""
    return _IDS_RE.match(name) is not None


def _basename(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _manifest_formats(manifest: Manifest | None, prefix: str) -> dict[str, str]:
    if manifest is None:
        return {}
    formats = {}
    for key, entry in manifest.files.items():
        fmt = (entry.model_extra or {}).get("format")
        if isinstance(fmt, str):
            formats[prefix + key] = "templar" if fmt == "templar" else "llmc"
    return formats


def is_folder_marker(key: str) -> bool:
    """True for a key like ``sub/`` (a console's "folder"): safe, and never a shard."""
    if not key.endswith("/"):
        return False
    try:
        check_key(key[:-1])
    except MalformedInput:
        return False
    return True


def check_dataset_key(key: object) -> str:
    """``key`` (relative to the dataset prefix) if it is safe, else DatasetLayoutError."""
    try:
        return check_key(key, what="dataset key")
    except MalformedInput as exc:
        raise DatasetLayoutError(
            exc.message,
            hint="remove or rename that object in the dataset bucket; nothing was downloaded",
        ) from None


def _group_keys(keys: Iterable[str]) -> tuple[dict, dict[int, str], list[str]]:
    """``{(split, number): tokens_key}``, ``{number: ids_key}``, ignored keys."""
    tokens: dict[tuple[Split, int], str] = {}
    ids: dict[int, str] = {}
    ignored: list[str] = []
    for key in sorted(set(keys)):
        if key == "" or is_folder_marker(key):
            ignored.append(key)
            continue
        name = _basename(check_dataset_key(key))
        if name == MANIFEST_NAME or name.endswith(".tmp"):
            ignored.append(key)
            continue
        ids_match = _IDS_RE.match(name)
        if ids_match:
            number = int(ids_match.group("number"))
            if number in ids:
                raise DatasetLayoutError(
                    f"two sample ids files for shard {number}: {ids[number]}, {key}"
                )
            ids[number] = key
            continue
        match = _SHARD_RE.match(name)
        if not match:
            ignored.append(key)
            continue
        split: Split = "val" if _VAL_RE.search(match.group("stem")) else "train"
        slot = (split, int(match.group("number")))
        if slot in tokens:
            raise DatasetLayoutError(
                f"two {split} shards numbered {slot[1]}: {tokens[slot]} and {key}",
                hint="keep one dataset per prefix",
            )
        tokens[slot] = key
    return tokens, ids, ignored


def _build_shards(tokens: dict, ids: dict[int, str], formats: dict[str, str]) -> list[ShardGroup]:
    shards = []
    for (split, number), key in sorted(tokens.items(), key=lambda item: item[0][1]):
        fmt = formats.get(key) or ("templar" if key.endswith(".npy") else "llmc")
        ids_key = ids.pop(number, None) if fmt == "templar" else None
        if fmt == "templar" and ids_key is None:
            raise DatasetLayoutError(
                f"templar shard {key} has no sample_ids_{number:06d}.bin beside it",
                hint="upload the sample ids file, or remove the incomplete shard",
            )
        shards.append(ShardGroup(number, fmt, key, ids_key, split))
    if ids:
        orphans = ", ".join(sorted(ids.values()))
        raise DatasetLayoutError(f"sample ids without a tokens file: {orphans}")
    return shards


def group_shards(keys: Iterable[str]) -> list[tuple[str, ...]]:
    """The file keys of every shard, in schedule order: train-named shards by number,
    then val-named ones, so that holding out the last K matches a dataset's own
    validation files when it has K of them (fineweb10B's ``fineweb_val_000000.bin``).
    """
    tokens, ids, _ = _group_keys(keys)
    shards = _build_shards(tokens, ids, {})
    ordered = [s for s in shards if s.split == "train"] + [s for s in shards if s.split == "val"]
    return [s.keys for s in ordered]


def plan_layout(
    keys: Iterable[str],
    *,
    val_shards: int | None = None,
    manifest: Manifest | None = None,
    manifest_prefix: str = "",
) -> DatasetLayout:
    """Ordered train and validation shards of the files named by ``keys``.

    ``manifest`` (optional) supplies per-file formats (keys relative to
    ``manifest_prefix``) and ``dataset.val_shards``. An explicit ``val_shards`` wins.
    """
    tokens, ids, ignored = _group_keys(keys)
    shards = _build_shards(tokens, ids, _manifest_formats(manifest, manifest_prefix))
    if not shards:
        raise DatasetLayoutError("no shard files found (train_NNNNNN.npy or *_NNNNNN.bin)")
    families = {s.format for s in shards}
    if len(families) > 1:
        raise DatasetLayoutError(
            "the prefix mixes templar (.npy) and llm.c (.bin) shards",
            hint="keep one dataset format per prefix",
        )
    named_val = [s for s in shards if s.split == "val"]
    train = [s for s in shards if s.split == "train"]
    if named_val:
        val = named_val
    else:
        k = _val_count(val_shards, manifest)
        if k >= len(train):
            raise DatasetLayoutError(
                f"holding out {k} validation shard(s) leaves no training shard "
                f"({len(train)} shard(s) found)",
                hint="lower --val-shards, or add shards",
            )
        train, val = train[: len(train) - k], train[len(train) - k :]
    if not train:
        raise DatasetLayoutError("only validation shards were found; there is nothing to train on")
    return DatasetLayout(tuple(train), tuple(val), tuple(ignored))


def _val_count(val_shards: int | None, manifest: Manifest | None) -> int:
    if val_shards is None and manifest is not None:
        section = (manifest.model_extra or {}).get("dataset") or {}
        val_shards = section.get("val_shards")
    count = 1 if val_shards is None else int(val_shards)
    if count < 0:
        raise DatasetLayoutError(f"val_shards must be >= 0, got {count}", hint="use 0 or more")
    return count
