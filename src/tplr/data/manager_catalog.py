"""Discovery of a dataset prefix's shards, and how the ranks of a host agree on them.

Rank 0 reads ``manifest.json`` under the prefix (or, when there is none, lists the
prefix), groups the files into ordered shards and splits off the validation shards.
The result is a :class:`ShardCatalog`, broadcast to the other local ranks through a
:class:`RankChannel` so that only rank 0 ever touches the store.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass
from typing import Protocol

from tplr.comms.errors import NotFound
from tplr.comms.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
from tplr.comms.stores.base import ObjectStore
from tplr.data.dataset_manifest import fetch_manifest
from tplr.data.layout import (
    DatasetLayoutError,
    ShardGroup,
    check_dataset_key,
    is_folder_marker,
    plan_layout,
)
from tplr.untrusted import MalformedInput, load_json

CATALOG_MAX_BYTES = 2 * MAX_MANIFEST_BYTES  # the manifest, verbatim, plus the shard list


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One shard: its files (keys relative to the dataset prefix) and their sizes."""

    index: int  # position in the schedule (train) or among the validation shards
    keys: tuple[str, ...]
    sizes: tuple[int, ...]
    number: int  # the shard number in its file names (seeds derived llm.c sample ids)
    max_token_id: int | None = None  # recorded in the manifest, when it has one

    @property
    def size_bytes(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True, slots=True)
class ShardCatalog:
    train: tuple[ShardSpec, ...]
    val: tuple[ShardSpec, ...]
    manifest_json: str | None  # the dataset manifest, verbatim, when the prefix has one

    def manifest(self) -> Manifest | None:
        if self.manifest_json is None:
            return None
        return Manifest.from_json(self.manifest_json, source=MANIFEST_NAME)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShardCatalog:
        """Rebuild rank 0's catalog; another process's bytes, so every field is checked."""
        what = "rank 0's shard catalog"
        try:
            data = load_json(text, what=what, max_bytes=CATALOG_MAX_BYTES, max_depth=8)
        except MalformedInput as exc:
            raise DatasetLayoutError(exc.message) from None
        manifest_json = data.get("manifest_json") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(manifest_json, str | None):
            raise DatasetLayoutError(f"{what} is not a catalog object")
        return cls(_specs(data.get("train")), _specs(data.get("val")), manifest_json)


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _spec(item: object) -> ShardSpec:
    if not isinstance(item, dict):
        raise DatasetLayoutError("rank 0's shard catalog holds a shard that is not an object")
    keys, sizes = item.get("keys"), item.get("sizes")
    top = item.get("max_token_id")
    if (
        not _is_count(item.get("index"))
        or not _is_count(item.get("number"))
        or not isinstance(keys, list)
        or not isinstance(sizes, list)
        or not 1 <= len(keys) == len(sizes) <= 2
        or not all(_is_count(size) for size in sizes)
        or not (top is None or _is_count(top))
    ):
        raise DatasetLayoutError("rank 0's shard catalog holds a malformed shard")
    checked = tuple(check_dataset_key(key) for key in keys)
    return ShardSpec(item["index"], checked, tuple(sizes), item["number"], top)


def _specs(items: object) -> tuple[ShardSpec, ...]:
    if not isinstance(items, list):
        raise DatasetLayoutError("rank 0's shard catalog has no list of shards")
    return tuple(_spec(item) for item in items)


async def discover_catalog(store: ObjectStore, prefix: str, val_shards: int | None) -> ShardCatalog:
    """Read the manifest (or list the prefix) and build the ordered train/val shards.

    Every key is checked before use (the manifest's by its parser, the listing's here):
    relative to ``prefix``, with no empty, ``.`` or ``..`` segment.
    """
    manifest: Manifest | None = None
    manifest_json: str | None = None
    try:
        manifest, manifest_json = await fetch_manifest(store, prefix)
    except NotFound:
        sizes = await listed_sizes(store, prefix)
    else:
        sizes = {key: entry.size for key, entry in manifest.files.items()}
    if not sizes:
        raise DatasetLayoutError(
            f"{store.url(prefix)} is empty: no manifest.json and no shard files",
            hint="check DATASET_BINS_PATH and the bucket name, or upload shards with "
            "`tplr shards upload`",
        )
    layout = plan_layout(sizes, val_shards=val_shards, manifest=manifest)

    def specs(groups: tuple[ShardGroup, ...]) -> tuple[ShardSpec, ...]:
        return tuple(
            ShardSpec(
                position,
                group.keys,
                tuple(sizes[k] for k in group.keys),
                group.index,
                _recorded_max(manifest, group.tokens_key),
            )
            for position, group in enumerate(groups)
        )

    return ShardCatalog(specs(layout.train), specs(layout.val), manifest_json)


async def listed_sizes(store: ObjectStore, prefix: str) -> dict[str, int]:
    """``{key relative to prefix: size}`` of the objects a LIST of ``prefix`` names.

    A listing is untrusted: a key outside ``prefix`` or an unsafe relative key is refused
    (:class:`DatasetLayoutError` naming it); folder markers (``sub/``) are skipped."""
    sizes: dict[str, int] = {}
    async for info in store.list(prefix):
        if not info.key.startswith(prefix):
            raise DatasetLayoutError(
                f"the listing of {store.url(prefix)} named {info.key[:200]!r}, which is not "
                "under that prefix",
                hint="the storage endpoint answered a LIST wrongly; check its URL",
            )
        key = info.key[len(prefix) :]
        if key in ("", MANIFEST_NAME) or is_folder_marker(key):
            continue
        sizes[check_dataset_key(key)] = info.size
    return sizes


def _recorded_max(manifest: Manifest | None, key: str) -> int | None:
    if manifest is None or key not in manifest.files:
        return None
    value = (manifest.files[key].model_extra or {}).get("max_token_id")
    return value if isinstance(value, int) else None  # typed by Manifest.from_json


class RankChannel(Protocol):
    """How rank 0 hands a value to the other local ranks (never blocking the loop)."""

    rank: int
    world_size: int

    async def broadcast(self, value: str | None) -> str: ...


class SingleRank:
    """The channel of a single-process run."""

    rank = 0
    world_size = 1

    async def broadcast(self, value: str | None) -> str:
        if value is None:
            raise ValueError("rank 0 must provide the value to broadcast")
        return value


class TorchDistChannel:
    """Broadcast over an initialised ``torch.distributed`` group, off the event loop."""

    def __init__(self, group: object | None = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self._group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    async def broadcast(self, value: str | None) -> str:
        box: list[str | None] = [value if self.rank == 0 else None]

        def _bcast() -> None:
            self._dist.broadcast_object_list(box, src=0, group=self._group)

        await asyncio.to_thread(_bcast)
        if box[0] is None:
            raise RuntimeError("rank 0 broadcast nothing")
        return box[0]
