"""Build small llm.c datasets and publish them to a store, for the shard-manager tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from tplr.comms.manifest import MANIFEST_NAME, build_manifest, write_manifest_atomic
from tplr.comms.stores.base import ObjectInfo, ObjectStore
from tplr.comms.transfer_config import TransferConfig
from tplr.data.formats import TokenFormat
from tplr.data.manager import SharedShardedDatasetManager, dataset_opener
from tplr.data.manager_config import DatasetConfig
from tplr.data.manager_metrics import DatasetMetrics
from tplr.data.tools.writers import TokenShardWriter


def write_llmc_dataset(
    folder: Path, num_shards: int, tokens_per_shard: int, *, part_size: int = 64 * 1024
) -> list[Path]:
    """``num_shards`` llm.c shards; token ``i`` of shard ``s`` is ``s * 1000 + i % 1000``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        path = folder / f"fineweb_train_{shard:06d}.bin"
        tokens = (shard * 1000 + np.arange(tokens_per_shard) % 1000).astype(np.uint16)
        with TokenShardWriter(path, TokenFormat.LLMC, np.dtype("<u2")) as writer:
            writer.append(tokens)
            writer.finish()
        paths.append(path)
    write_manifest_atomic(build_manifest(folder, part_size=part_size), folder / MANIFEST_NAME)
    return paths


def small_manager(
    store: ObjectStore, local: Path, *, prefix: str = "remote/tokenized/", seq_len: int = 32
) -> SharedShardedDatasetManager:
    """A manager of one window per shard, one download attempt, its own metrics registry."""
    return SharedShardedDatasetManager(
        store,
        DatasetConfig(bins_path=prefix, local_dir=local),
        windows_per_shard=1,
        open_shard=dataset_opener(seq_len),
        transfer=TransferConfig(transfer_max_attempts=1),
        metrics=DatasetMetrics(CollectorRegistry()),
    )


async def publish_folder(store: ObjectStore, folder: Path, prefix: str) -> None:
    """Put every file of ``folder`` under ``prefix``, the manifest last."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    files.sort(key=lambda p: p.name == MANIFEST_NAME)
    for path in files:
        await store.put(prefix + path.name, path.read_bytes())


class CountingStore:
    """Delegates to a real store and counts ranged reads (not a mock: every call is real)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.range_bytes = 0
        self.range_calls = 0
        self.keys_read: list[str] = []

    def url(self, key: str = "") -> str:
        return self.inner.url(key)

    async def head(self, key: str) -> ObjectInfo:
        return await self.inner.head(key)

    async def get_range(self, key, offset, into, *, if_match=None) -> None:
        self.range_calls += 1
        self.range_bytes += len(into)
        self.keys_read.append(key)
        await self.inner.get_range(key, offset, into, if_match=if_match)

    async def get(self, key: str) -> bytes:
        return await self.inner.get(key)

    async def put(self, key: str, data: bytes) -> ObjectInfo:
        return await self.inner.put(key, data)

    async def put_if_absent(self, key: str, data: bytes) -> ObjectInfo:
        return await self.inner.put_if_absent(key, data)

    async def create_multipart(self, key: str) -> str:
        return await self.inner.create_multipart(key)

    async def upload_part(self, key, upload_id, part_number, data) -> str:
        return await self.inner.upload_part(key, upload_id, part_number, data)

    async def complete_multipart(self, key, upload_id, parts):
        return await self.inner.complete_multipart(key, upload_id, parts)

    async def abort_multipart(self, key, upload_id) -> None:
        await self.inner.abort_multipart(key, upload_id)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        async for info in self.inner.list(prefix):
            yield info

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def aclose(self) -> None:
        await self.inner.aclose()
