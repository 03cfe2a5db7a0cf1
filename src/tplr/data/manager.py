"""SharedShardedDatasetManager: the shard for the current windows on disk and mapped,
the next one arriving in the background, the old one gone.

Schedule: ``shard_index_for(window) = (window // windows_per_shard) % num_train_shards``.
Only local rank 0 talks to the store, downloads and deletes; the other ranks learn the
catalog through a :class:`~tplr.data.manager_catalog.RankChannel` and wait for rank 0's
ready markers (polled with ``asyncio.sleep``, so no event loop ever blocks).

Usage::

    async with SharedShardedDatasetManager(store, config, windows_per_shard=…) as manager:
        dataset = await manager.dataset_for(window)   # blocks only on the first shard
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tplr.comms.errors import InsufficientSpace, StoreError, TransientError
from tplr.comms.retry import reason_of
from tplr.comms.stores.base import ObjectStore
from tplr.comms.transfer_config import TransferConfig
from tplr.data import manager_markers as markers
from tplr.data.manager_catalog import (
    CATALOG_MAX_BYTES,
    RankChannel,
    ShardCatalog,
    ShardSpec,
    SingleRank,
    discover_catalog,
)
from tplr.data.manager_config import DatasetConfig
from tplr.data.manager_files import ShardFiles
from tplr.data.manager_metrics import DatasetMetrics
from tplr.data.shard_state import ShardSlot, ShardState
from tplr.errors import TplrError
from tplr.units import format_size
from tplr.untrusted import MalformedInput, load_json

log = logging.getLogger(__name__)

OpenShard = Callable[[ShardSpec, list[Path]], Any]
FreeSpaceProbe = Callable[[Path], int]


class ShardUnavailable(TplrError):
    """The shard a window needs could not be made ready."""


def disk_free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


class SharedShardedDatasetManager:
    def __init__(
        self,
        store: ObjectStore | None,
        config: DatasetConfig,
        *,
        windows_per_shard: int,
        open_shard: OpenShard,
        transfer: TransferConfig | None = None,
        channel: RankChannel | None = None,
        metrics: DatasetMetrics | None = None,
        transfer_metrics: Any = None,
        free_space_probe: FreeSpaceProbe = disk_free_bytes,
    ) -> None:
        if windows_per_shard < 1:
            raise ValueError("windows_per_shard must be >= 1")
        self.config = config
        self.windows_per_shard = windows_per_shard
        self.channel = channel or SingleRank()
        if self.channel.rank == 0 and store is None:
            raise ValueError("rank 0 needs a store to download from")
        self.store = store if self.channel.rank == 0 else None
        self.local_dir = config.local_path()
        self.metrics = metrics or DatasetMetrics()
        self.files = ShardFiles(
            self.store,
            config.prefix,
            self.local_dir,
            transfer or TransferConfig(),
            transfer_metrics,
        )
        self._open_shard = open_shard
        self._free_space = free_space_probe
        self.catalog: ShardCatalog | None = None
        self.slots: list[ShardSlot] = []
        self._datasets: dict[int, Any] = {}
        self._ready: dict[int, asyncio.Event] = {}
        self._failures: dict[int, BaseException] = {}
        self._space_problem: dict[int, InsufficientSpace] = {}
        self._active: int | None = None
        self._wanted: int | None = None
        self._wake = asyncio.Event()
        self._tasks: asyncio.TaskGroup | None = None

    # ---------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> SharedShardedDatasetManager:
        await asyncio.to_thread(self.local_dir.mkdir, parents=True, exist_ok=True)
        await self._load_catalog()
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        self._prefetcher = self._tasks.create_task(self._prefetch_loop(), name="shard-prefetch")
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._prefetcher.cancel()
        assert self._tasks is not None
        # The group sees only the cancellation; an error from the body propagates as is
        # (not wrapped in an ExceptionGroup). A crash of the prefetcher itself still does.
        await self._tasks.__aexit__(None, None, None)

    async def _load_catalog(self) -> None:
        if self.channel.rank == 0:
            try:
                assert self.store is not None
                catalog = await discover_catalog(
                    self.store, self.config.prefix, self.config.val_shards
                )
                message = json.dumps({"catalog": catalog.to_json()})
            except (TplrError, OSError) as exc:
                await self.channel.broadcast(json.dumps({"error": str(exc)}))
                raise
            for spec in catalog.train:  # a previous run's failures are not this run's
                await asyncio.to_thread(markers.clear_error, self.local_dir, spec.index)
            await self.channel.broadcast(message)
        else:
            received = await self.channel.broadcast(None)
            catalog = await asyncio.to_thread(_catalog_from_rank0, received)
        self.catalog = catalog
        self.files.manifest = await asyncio.to_thread(catalog.manifest)
        self.slots = [ShardSlot(s.index, s.keys, s.size_bytes) for s in catalog.train]
        self._ready = {s.index: asyncio.Event() for s in catalog.train}
        for slot in self.slots:
            self.metrics.set_state(slot.index, slot.state)
        log.info(
            "dataset %s: %d training shards (%s), %d validation shard(s); %d windows per shard",
            self.config.prefix or "(root)",
            len(catalog.train),
            format_size(sum(s.size_bytes for s in catalog.train)),
            len(catalog.val),
            self.windows_per_shard,
        )

    # ---------------------------------------------------------------- schedule
    @property
    def num_train_shards(self) -> int:
        return len(self.slots)

    def shard_index_for(self, window: int) -> int:
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        return (window // self.windows_per_shard) % self.num_train_shards

    @property
    def active_index(self) -> int | None:
        return self._active

    def _upcoming(self) -> list[int]:
        """Shards to have ready, most urgent first: the wanted one, then the prefetch lead."""
        order: list[int] = []
        if self._wanted is not None and self._wanted != self._active:
            order.append(self._wanted)
        base = self._wanted if self._wanted is not None else self._active
        if base is not None:
            for step in range(1, self.config.prefetch_shards + 1):
                index = (base + step) % self.num_train_shards
                if index != self._active and index not in order:
                    order.append(index)
        return order

    # ---------------------------------------------------------------- the critical path
    async def dataset_for(self, window: int) -> Any:
        """The mapped dataset for ``window``; swaps shards when the schedule moves on."""
        target = self.shard_index_for(window)
        if target == self._active:
            return self._datasets[target]
        self._wanted = target
        self._wake.set()
        event = self._ready[target]
        if not event.is_set():
            await self._wait_for(target, window)
        started = time.perf_counter()
        self._activate(target)
        self.metrics.swap_seconds.observe(time.perf_counter() - started)
        return self._datasets[target]

    async def _wait_for(self, target: int, window: int) -> None:
        first = self._active is None
        slot = self.slots[target]
        if first:
            log.info(
                "waiting for shard %d (%s) before training window %d",
                target,
                format_size(slot.size_bytes),
                window,
            )
        else:
            log.warning(
                "shard %d for window %d is not ready (%s); training waits for it rather than "
                "train on the wrong shard",
                target,
                window,
                slot.state.value,
            )
        started = time.monotonic()
        while not self._ready[target].is_set():
            failure = self._failures.get(target) or self._space_problem.get(target)
            if failure is not None and not _worth_waiting(failure):
                detail = failure.message if isinstance(failure, TplrError) else str(failure)
                raise ShardUnavailable(
                    f"shard {target} needed for window {window} is unavailable: {detail}",
                    hint=getattr(failure, "hint", None),
                ) from failure
            waiter = asyncio.ensure_future(self._ready[target].wait())
            try:
                await asyncio.wait({waiter}, timeout=1.0)
            finally:
                waiter.cancel()
        waited = time.monotonic() - started
        if not first:
            self.metrics.stalls.inc()
            self.metrics.stall_seconds.inc(waited)
            log.warning("stalled %.1fs waiting for shard %d", waited, target)
        else:
            log.info("shard %d ready after %.1fs", target, waited)

    def _activate(self, target: int) -> None:
        slot = self.slots[target]
        if slot.ready_at is not None and self._active is not None:
            self.metrics.prefetch_lead_seconds.observe(time.monotonic() - slot.ready_at)
        self._set_state(slot, ShardState.ACTIVE)
        old, self._active = self._active, target
        self._wanted = None
        self.metrics.active_shard.set(target)
        if old is not None:
            self._set_state(self.slots[old], ShardState.RETIRED)
            self._ready[old].clear()
            self._datasets.pop(old, None)
            self.metrics.swaps.inc()
            log.info("swapped shard %d -> %d", old, target)
        self._wake.set()

    def _set_state(self, slot: ShardSlot, state: ShardState) -> None:
        slot.transition(state)
        self.metrics.set_state(slot.index, state)

    # ---------------------------------------------------------------- background work
    async def _prefetch_loop(self) -> None:
        while True:
            self._wake.clear()
            await self._retire_old()
            postponed = False
            for index in self._upcoming():
                slot = self.slots[index]
                if slot.state in (ShardState.READY, ShardState.ACTIVE):
                    continue
                if not await self._make_ready(slot):
                    postponed = True
                    break
            await self._update_disk_metrics()
            timeout = self.config.disk_retry_s if postponed else None
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _retire_old(self) -> None:
        for slot in self.slots:
            if slot.state is not ShardState.RETIRED:
                continue
            try:
                await self._retire(slot)
            except asyncio.CancelledError:
                raise
            except (TplrError, OSError) as exc:  # the files are fetched again when needed
                log.error("retiring shard %d failed: %s", slot.index, exc)
                self._set_state(slot, ShardState.REMOTE)

    async def _retire(self, slot: ShardSlot) -> None:
        """Keep a retired shard mapped (keep set and its files present) or delete it."""
        paths = await asyncio.to_thread(self.files.local_paths, slot.keys)
        if self.config.keep_shards and await asyncio.to_thread(_all_exist, paths):
            dataset = await asyncio.to_thread(self._open_shard, self._spec(slot.index), paths)
            self._datasets[slot.index] = dataset
            self._set_state(slot, ShardState.READY)
            self._ready[slot.index].set()
            return
        if self.channel.rank == 0 and not self.config.keep_shards:
            await asyncio.to_thread(markers.clear_ready, self.local_dir, slot.index)
            freed = await asyncio.to_thread(self.files.delete, slot.keys)
            log.info("deleted retired shard %d (%s)", slot.index, format_size(freed))
        self._set_state(slot, ShardState.REMOTE)

    def _spec(self, index: int) -> ShardSpec:
        assert self.catalog is not None
        return self.catalog.train[index]

    async def _make_ready(self, slot: ShardSlot) -> bool:
        """Download/verify (rank 0) or await rank 0 (others), then map. False = postponed."""
        spec = self._spec(slot.index)
        self._failures.pop(slot.index, None)
        if slot.state is ShardState.REMOTE:
            self._set_state(slot, ShardState.DOWNLOADING)
        try:
            paths = await asyncio.to_thread(self.files.local_paths, spec.keys)
            if self.channel.rank == 0:
                if not await self._fetch_as_rank0(spec, paths):
                    self._set_state(slot, ShardState.REMOTE)
                    return False
            else:
                await self._await_rank0(spec, paths)
            dataset = await asyncio.to_thread(self._open_shard, spec, paths)
        except asyncio.CancelledError:
            raise
        except (TplrError, OSError) as exc:
            await self._record_failure(slot, exc)
            return False
        self._datasets[slot.index] = dataset
        self._set_state(slot, ShardState.READY)
        self._ready[slot.index].set()
        self._space_problem.pop(slot.index, None)
        log.info("shard %d ready (%s)", slot.index, format_size(spec.size_bytes))
        return True

    async def _record_failure(self, slot: ShardSlot, exc: BaseException) -> None:
        self._failures[slot.index] = exc
        self.metrics.download_failures.labels(reason=reason_of(exc)).inc()
        log.error("shard %d could not be made ready: %s", slot.index, exc)
        if self.channel.rank == 0:
            try:
                await asyncio.to_thread(markers.write_error, self.local_dir, slot.index, str(exc))
            except (TplrError, OSError) as marker_exc:  # the other ranks time out instead
                log.error("could not write shard %d's error marker: %s", slot.index, marker_exc)
        if slot.state is ShardState.DOWNLOADING:
            self._set_state(slot, ShardState.REMOTE)

    async def _fetch_as_rank0(self, spec: ShardSpec, paths: list[Path]) -> bool:
        if await asyncio.to_thread(markers.ready_is_valid, self.local_dir, spec.index, paths):
            return True
        missing = await asyncio.to_thread(self.files.missing_bytes, spec)
        if missing:
            needed = missing + self.config.disk_margin
            free = await asyncio.to_thread(self._free_space, self.local_dir)
            if free < needed:
                self._refuse_for_space(spec, needed, free)
                return False
        try:
            await self.files.fetch(spec)
        except InsufficientSpace as exc:
            self._refuse_for_space(spec, exc.needed_bytes, exc.free_bytes)
            return False
        await asyncio.to_thread(markers.write_ready, self.local_dir, spec.index, paths)
        return True

    def _refuse_for_space(self, spec: ShardSpec, needed: int, free: int) -> None:
        hint = (
            "free disk space, move DATASET_LOCAL_DIR to a larger disk"
            + (", or turn off DATASET_KEEP_SHARDS" if self.config.keep_shards else "")
            + f"; retrying every {self.config.disk_retry_s:.0f}s"
        )
        problem = InsufficientSpace(str(self.local_dir), needed, free, hint=hint)
        self._space_problem[spec.index] = problem
        self.metrics.disk_refusals.inc()
        log.warning("postponing shard %d: %s (%s)", spec.index, problem.message, hint)

    async def _await_rank0(self, spec: ShardSpec, paths: list[Path]) -> None:
        deadline = time.monotonic() + self.config.rank_wait_timeout_s
        while True:
            if await asyncio.to_thread(markers.ready_is_valid, self.local_dir, spec.index, paths):
                return
            error = await asyncio.to_thread(markers.read_error, self.local_dir, spec.index)
            if error is not None:
                raise ShardUnavailable(f"rank 0 failed to prepare shard {spec.index}: {error}")
            if time.monotonic() > deadline:
                raise ShardUnavailable(
                    f"rank 0 did not make shard {spec.index} ready within "
                    f"{self.config.rank_wait_timeout_s:.0f}s",
                    hint="check rank 0's log; raise DATASET_RANK_WAIT_TIMEOUT_S for slow links",
                )
            await asyncio.sleep(self.config.rank_poll_s)

    async def _update_disk_metrics(self) -> None:
        """Disk gauges; the folder walk and the free-space probe run off the event loop."""
        self.metrics.bytes_on_disk.set(await asyncio.to_thread(self.files.bytes_on_disk))
        try:
            free = await asyncio.to_thread(self._free_space, self.local_dir)
        except OSError as exc:  # a gauge left stale is no reason to stop prefetching
            log.debug("free-space probe failed for %s: %s", self.local_dir, exc)
        else:
            self.metrics.free_bytes.set(free)
        pending = [
            self.slots[i].size_bytes
            for i in self._upcoming()
            if self.slots[i].state is not ShardState.READY
        ]
        self.metrics.next_shard_bytes.set(pending[0] if pending else 0)


def _catalog_from_rank0(message: str) -> ShardCatalog:
    """Rank 0's broadcast: ``{"catalog": ...}`` or ``{"error": ...}`` (checked, bounded)."""
    try:
        received = load_json(message, what="rank 0's message", max_bytes=CATALOG_MAX_BYTES + 4096)
    except MalformedInput as exc:
        raise ShardUnavailable(exc.message) from None
    if isinstance(received, dict) and isinstance(received.get("error"), str):
        raise ShardUnavailable(f"rank 0 could not read the dataset: {received['error'][:4000]}")
    if not isinstance(received, dict) or not isinstance(received.get("catalog"), str):
        raise ShardUnavailable("rank 0's message holds neither a catalog nor an error")
    return ShardCatalog.from_json(received["catalog"])


def _all_exist(paths: list[Path]) -> bool:
    return all(path.exists() for path in paths)


def _worth_waiting(failure: BaseException) -> bool:
    """Transient trouble (network) is worth waiting out; a corrupt or missing object is not."""
    if isinstance(failure, InsufficientSpace):
        return False
    return isinstance(failure, TransientError) or (
        isinstance(failure, StoreError) and failure.retryable
    )


def dataset_opener(seq_len: int, *, vocab_size: int | None = None) -> OpenShard:
    """The default ``open_shard``: map and validate a shard as a SharedShardedDataset."""
    from tplr.data.dataset import SharedShardedDataset

    def _open(spec: ShardSpec, paths: list[Path]) -> SharedShardedDataset:
        return SharedShardedDataset.open(
            paths[0],
            ids_path=paths[1] if len(paths) > 1 else None,
            seq_len=seq_len,
            shard_index=spec.number,
            vocab_size=vocab_size,
            recorded_max_token_id=spec.max_token_id,
        )

    return _open
