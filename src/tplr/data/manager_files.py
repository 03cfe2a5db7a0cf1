"""The local files of the manager's shards: where they live, what is missing, fetch, delete.

Keys come from outside (a manifest or a listing, checked by :mod:`tplr.data.layout`); every
local path is also resolved under the dataset folder (:func:`tplr.untrusted.resolve_under`),
so a symlink planted in the folder cannot redirect a download or a delete outside it. A
shard's files are exactly ``DEST`` and the download's sidecars (``DEST.partial`` and its
journal): nothing else is ever deleted, and no name from outside is globbed. These methods
do file I/O: call them from a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from tplr.comms.download.sidecar import sidecar_paths
from tplr.comms.manifest import Manifest, hash_file_parts
from tplr.comms.stores.base import ObjectStore
from tplr.comms.transfer_config import TransferConfig
from tplr.data.layout import DatasetLayoutError
from tplr.data.manager_catalog import ShardSpec
from tplr.untrusted import MalformedInput, resolve_under

log = logging.getLogger(__name__)


class ShardFiles:
    def __init__(
        self,
        store: ObjectStore | None,
        prefix: str,
        local_dir: Path,
        transfer: TransferConfig,
        transfer_metrics: Any = None,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.local_dir = local_dir
        self.transfer = transfer
        self.transfer_metrics = transfer_metrics
        self.manifest: Manifest | None = None

    def local_path(self, key: str) -> Path:
        """Where ``key`` lives on disk: under the dataset folder, or DatasetLayoutError."""
        try:
            return resolve_under(self.local_dir, key, what="dataset key")
        except MalformedInput as exc:
            raise DatasetLayoutError(
                exc.message,
                hint=f"remove the symlink or odd entry under {self.local_dir}; nothing outside "
                "the dataset folder is written or deleted",
            ) from None

    def local_paths(self, keys: tuple[str, ...]) -> list[Path]:
        return [self.local_path(key) for key in keys]

    def _sidecars(self, path: Path) -> list[Path]:
        """The download's own files beside ``path`` (data, journal, journal being rewritten)."""
        partial, journal = sidecar_paths(path)
        return [partial, journal, journal.with_name(journal.name + ".tmp")]

    def is_complete(self, key: str, size: int) -> bool:
        """Present with the right size, and matching the manifest's hashes when there is one."""
        path = self.local_path(key)
        try:
            if path.stat().st_size != size:
                return False
        except FileNotFoundError:
            return False
        if self.manifest is None or key not in self.manifest.files:
            return True
        _, digests = hash_file_parts(path, self.manifest.part_size)
        ok = digests == self.manifest.files[key].parts
        if not ok:
            log.warning("%s does not match the manifest; it will be downloaded again", path)
        return ok

    def missing_bytes(self, spec: ShardSpec) -> int:
        """Bytes the shard still needs on disk (space held by partial downloads counts)."""
        missing = 0
        for key, size in zip(spec.keys, spec.sizes, strict=True):
            path = self.local_path(key)
            if path.exists() and path.stat().st_size == size:
                continue
            partial, _ = sidecar_paths(path)
            held = _allocated(partial) if partial.is_file() else 0
            missing += max(size - held, 0)
        return missing

    async def fetch(self, spec: ShardSpec) -> None:
        """Download every file of ``spec`` that is not already complete and verified."""
        from tplr.comms.download.engine import download

        assert self.store is not None, "only rank 0 fetches"
        for key, size in zip(spec.keys, spec.sizes, strict=True):
            if await asyncio.to_thread(self.is_complete, key, size):
                continue
            dest = await asyncio.to_thread(self._prepare_dest, key)
            has_entry = self.manifest is not None and key in self.manifest.files
            await download(
                self.store,
                self.prefix + key,
                dest,
                config=self.transfer,
                manifest=self.manifest if has_entry else None,
                manifest_key=key if has_entry else None,
                verify="manifest" if has_entry else "size",
                metrics=self.transfer_metrics,
            )

    def _prepare_dest(self, key: str) -> Path:
        dest = self.local_path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return self.local_path(key)  # again: the folders just made are ours, not links

    def delete(self, keys: tuple[str, ...]) -> int:
        """Delete the files of a shard and its download sidecars; returns bytes freed.

        Exactly those names, each checked under the folder (a link is removed, never
        followed); any other file beside them is left alone."""
        freed = 0
        for path in self.local_paths(keys):
            for victim in [path, *self._sidecars(path)]:
                try:
                    freed += victim.lstat().st_size
                    victim.unlink()
                except FileNotFoundError:
                    pass
        return freed

    def bytes_on_disk(self) -> int:
        return allocated_bytes_under(self.local_dir)


def allocated_bytes_under(folder: Path) -> int:
    """Disk space held by the files below ``folder`` (sparse files count what is allocated)."""
    total = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            try:
                total += _allocated(Path(root) / name)
            except FileNotFoundError:
                pass
    return total


def _allocated(path: Path) -> int:
    st = path.stat()
    return min(st.st_size, st.st_blocks * 512) if hasattr(st, "st_blocks") else st.st_size
