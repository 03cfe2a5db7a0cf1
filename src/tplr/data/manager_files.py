"""The local files of the manager's shards: where they live, what is missing, fetch, delete."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from tplr.comms.manifest import Manifest, hash_file_parts
from tplr.comms.store import ObjectStore
from tplr.comms.transfer_config import TransferConfig
from tplr.data.manager_catalog import ShardSpec

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

    def local_paths(self, keys: tuple[str, ...]) -> list[Path]:
        return [self.local_dir / key for key in keys]

    def _partials(self, path: Path) -> list[Path]:
        return [p for p in path.parent.glob(path.name + ".*") if p.is_file()]

    def is_complete(self, key: str, size: int) -> bool:
        """Present with the right size, and matching the manifest's hashes when there is one."""
        path = self.local_dir / key
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
            path = self.local_dir / key
            if path.exists() and path.stat().st_size == size:
                continue
            held = sum(_allocated(p) for p in self._partials(path))
            missing += max(size - held, 0)
        return missing

    async def fetch(self, spec: ShardSpec) -> None:
        """Download every file of ``spec`` that is not already complete and verified."""
        from tplr.comms.download import download

        assert self.store is not None, "only rank 0 fetches"
        for key, size in zip(spec.keys, spec.sizes, strict=True):
            if await asyncio.to_thread(self.is_complete, key, size):
                continue
            dest = self.local_dir / key
            dest.parent.mkdir(parents=True, exist_ok=True)
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

    def delete(self, keys: tuple[str, ...]) -> int:
        """Delete the files of a shard (and any partial downloads); returns bytes freed."""
        freed = 0
        for path in self.local_paths(keys):
            for victim in [path, *self._partials(path)]:
                try:
                    freed += victim.stat().st_size
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
