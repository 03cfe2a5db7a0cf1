"""SharedShardedDatasetManager against a real LocalStore and the moto S3 server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from conftest import moto_bucket_config
from prometheus_client import CollectorRegistry
from shard_fixtures import CountingStore, publish_folder, write_llmc_dataset

from tplr.comms.errors import IntegrityError
from tplr.comms.manifest import MANIFEST_NAME
from tplr.comms.stores.local import LocalStore
from tplr.comms.transfer_config import TransferConfig
from tplr.data.layout import DatasetLayoutError
from tplr.data.manager import ShardUnavailable, SharedShardedDatasetManager, dataset_opener
from tplr.data.manager_config import DatasetConfig
from tplr.data.manager_metrics import DatasetMetrics
from tplr.data.shard_state import ShardState
from tplr.protocol.clock import FakeClock, WindowClock

PREFIX = "remote/tokenized/"
TOKENS = 40_000  # 80 KB per shard
SEQ_LEN = 64
WPS = 2  # windows per shard


@pytest.fixture
async def dataset_store(tmp_path: Path) -> CountingStore:
    """5 llm.c shards (4 train + 1 val) published to a LocalStore."""
    write_llmc_dataset(tmp_path / "src", 5, TOKENS, part_size=16 * 1024)
    store = CountingStore(LocalStore(tmp_path / "bucket"))
    await publish_folder(store, tmp_path / "src", PREFIX)
    return store


def make_manager(store, tmp_path: Path, **overrides) -> SharedShardedDatasetManager:
    probe = overrides.pop("free_space_probe", None)
    transfer = overrides.pop("transfer", TransferConfig(transfer_max_attempts=2))
    config = DatasetConfig(bins_path=PREFIX, local_dir=tmp_path / "local", **overrides)
    kwargs = {"free_space_probe": probe} if probe else {}
    return SharedShardedDatasetManager(
        store,
        config,
        windows_per_shard=WPS,
        open_shard=dataset_opener(SEQ_LEN),
        transfer=transfer,
        metrics=DatasetMetrics(CollectorRegistry()),
        **kwargs,
    )


async def wait_state(manager, index: int, state: ShardState, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while manager.slots[index].state is not state:
        assert time.monotonic() < deadline, f"shard {index} stuck in {manager.slots[index].state}"
        await asyncio.sleep(0.01)


def shard_files(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "local").glob("*.bin")}


def first_token(dataset) -> int:
    return int(dataset[0][0])


async def test_first_blocks_next_prefetched_swap_is_instant_old_deleted(dataset_store, tmp_path):
    clock = FakeClock(start_s=1000.0)
    windows = WindowClock(genesis_s=1000.0, window_seconds=60.0, clock=clock)
    async with make_manager(dataset_store, tmp_path) as manager:
        assert manager.num_train_shards == 4  # the fifth shard is held out
        ds = await manager.dataset_for(windows.current_window())
        assert first_token(ds) == 0 and manager.active_index == 0
        await wait_state(manager, 1, ShardState.READY)  # prefetched in the background

        clock.advance(60.0)  # window 1: same shard, nothing happens
        assert await manager.dataset_for(windows.current_window()) is ds
        clock.advance(60.0)  # window 2: the schedule moves to shard 1
        before = dataset_store.range_bytes
        started = time.perf_counter()
        ds = await manager.dataset_for(windows.current_window())
        swap_s = time.perf_counter() - started
        assert dataset_store.range_bytes == before, "a download ran on the critical path"
        assert swap_s < 0.05
        assert first_token(ds) == 1000 and manager.active_index == 1

        await wait_state(manager, 2, ShardState.READY)
        assert manager.slots[0].state is ShardState.REMOTE
        assert "fineweb_train_000000.bin" not in shard_files(tmp_path)  # rank 0 deleted it
        assert shard_files(tmp_path) == {"fineweb_train_000001.bin", "fineweb_train_000002.bin"}
        assert manager.metrics.swaps._value.get() == 1
        assert manager.metrics.stalls._value.get() == 0
        assert manager.metrics.bytes_on_disk.value() > 0
        assert manager.metrics.free_bytes.value() > 0


def test_disk_gauges_are_absent_until_measured():
    registry = CollectorRegistry()
    DatasetMetrics(registry)
    assert registry.get_sample_value("tplr_dataset_disk_free_bytes") is None  # not "0 free"
    assert registry.get_sample_value("tplr_dataset_bytes_on_disk") is None
    assert registry.get_sample_value("tplr_dataset_active_shard") == -1  # documented sentinel


async def test_keep_flag_keeps_shards_and_second_pass_reuses_them(dataset_store, tmp_path):
    shard0 = PREFIX + "fineweb_train_000000.bin"
    async with make_manager(dataset_store, tmp_path, keep_shards=True) as manager:
        await manager.dataset_for(0)
        first_pass_reads = dataset_store.keys_read.count(shard0)
        assert first_pass_reads >= 1
        for window in range(WPS, 4 * WPS + 1, WPS):  # the rest of the pass, then shard 0 again
            await wait_state(manager, (window // WPS) % 4, ShardState.READY)
            await manager.dataset_for(window)
        assert manager.active_index == 0
        assert len(shard_files(tmp_path)) == 4  # nothing was deleted
    assert dataset_store.keys_read.count(shard0) == first_pass_reads  # not downloaded again


async def test_wrap_around_redownloads_when_not_kept(dataset_store, tmp_path):
    async with make_manager(dataset_store, tmp_path) as manager:
        ds = await manager.dataset_for(0)
        first_reads = dataset_store.keys_read.count(PREFIX + "fineweb_train_000000.bin")
        for window in range(WPS, 4 * WPS + 1, WPS):
            await wait_state(manager, (window // WPS) % 4, ShardState.READY)
            ds = await manager.dataset_for(window)
        assert manager.active_index == 0 and first_token(ds) == 0
        second = dataset_store.keys_read.count(PREFIX + "fineweb_train_000000.bin")
        assert second == 2 * first_reads  # downloaded again on the second pass


async def test_restart_mid_run_lands_on_the_right_shard(dataset_store, tmp_path):
    async with make_manager(dataset_store, tmp_path) as manager:
        await manager.dataset_for(0)
    # A new process at window 5: shard (5 // 2) % 4 == 2, whatever ran before.
    async with make_manager(dataset_store, tmp_path) as manager:
        ds = await manager.dataset_for(5)
        assert manager.active_index == 2 and first_token(ds) == 2000


async def test_already_present_verified_files_are_not_downloaded_again(dataset_store, tmp_path):
    async with make_manager(dataset_store, tmp_path, keep_shards=True, prefetch_shards=0) as m:
        await m.dataset_for(0)
    shard_reads = [k for k in dataset_store.keys_read if not k.endswith(MANIFEST_NAME)]
    assert shard_reads
    async with make_manager(dataset_store, tmp_path, keep_shards=True, prefetch_shards=0) as m:
        ds = await m.dataset_for(0)
        assert first_token(ds) == 0
    assert [k for k in dataset_store.keys_read if not k.endswith(MANIFEST_NAME)] == shard_reads


async def test_disk_budget_refusal_keeps_active_shard_and_fails_swap_clearly(
    dataset_store, tmp_path
):
    shard_bytes = 1024 + 2 * TOKENS
    margin = 10_000
    capacity = shard_bytes + margin + shard_bytes // 2  # room for one shard, not two

    def probe(path: Path) -> int:
        used = sum(p.stat().st_size for p in (tmp_path / "local").rglob("*") if p.is_file())
        return capacity - used

    manager = make_manager(
        dataset_store, tmp_path, disk_margin=margin, disk_retry_s=0.05, free_space_probe=probe
    )
    async with manager:
        ds = await manager.dataset_for(0)
        deadline = time.monotonic() + 10
        while manager.metrics.disk_refusals._value.get() < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert manager.slots[1].state is ShardState.REMOTE
        assert first_token(ds) == 0 and "fineweb_train_000000.bin" in shard_files(tmp_path)
        with pytest.raises(ShardUnavailable, match="not enough disk space") as info:
            await manager.dataset_for(2)
        assert "DATASET_LOCAL_DIR" in str(info.value)
        assert manager.active_index == 0  # the active shard is untouched
        assert first_token(await manager.dataset_for(1)) == 0


async def test_corrupt_object_is_refetched_then_reported(dataset_store, tmp_path):
    key = PREFIX + "fineweb_train_000001.bin"
    good = await dataset_store.get(key)
    bad = bytearray(good)
    bad[5000] ^= 0xFF  # same size, one flipped byte: only the manifest hashes can tell
    await dataset_store.put(key, bytes(bad))
    async with make_manager(dataset_store, tmp_path) as manager:
        await manager.dataset_for(0)
        with pytest.raises(ShardUnavailable, match="shard 1") as info:
            deadline = time.monotonic() + 20
            while True:
                await manager.dataset_for(2)
                assert time.monotonic() < deadline
        assert isinstance(info.value.__cause__, IntegrityError)
        assert "does not match its manifest hash" in str(info.value)
        # The bad part was fetched more than once (re-fetched), the good shard 0 is intact.
        assert dataset_store.keys_read.count(key) > len(good) // (16 * 1024) + 1
        assert manager.metrics.download_failures.labels(reason="integrity")._value.get() >= 1
        assert manager.active_index == 0


async def test_missing_dataset_prefix_is_a_clear_error(tmp_path):
    store = LocalStore(tmp_path / "empty-bucket")
    with pytest.raises(DatasetLayoutError, match="DATASET_BINS_PATH"):
        async with make_manager(store, tmp_path):
            pass


async def test_with_the_s3_server(s3_server, bucket, tmp_path, monkeypatch):
    from tplr.comms.stores.s3 import S3Store

    write_llmc_dataset(tmp_path / "src", 3, TOKENS, part_size=16 * 1024)
    config = moto_bucket_config(s3_server, bucket)
    async with S3Store(config, TransferConfig(), max_connections=8) as s3:
        await publish_folder(s3, tmp_path / "src", PREFIX)
        async with make_manager(s3, tmp_path) as manager:
            assert first_token(await manager.dataset_for(0)) == 0
            await wait_state(manager, 1, ShardState.READY)
            assert first_token(await manager.dataset_for(2)) == 1000
            await wait_state(manager, 0, ShardState.READY)  # 2 train shards: wraps to 0
            assert first_token(await manager.dataset_for(4)) == 0


def test_markers_written_concurrently_by_several_processes_stay_valid(tmp_path):
    """Embedded nodes share one dataset folder; their marker writes must not collide."""
    from concurrent.futures import ThreadPoolExecutor

    from tplr.data import manager_markers as markers

    files = write_llmc_dataset(tmp_path, 1, 1000)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: markers.write_ready(tmp_path, 0, files), range(64)))
    assert markers.ready_is_valid(tmp_path, 0, files)
    assert not list((tmp_path / markers.MARKER_DIR).glob("*.tmp"))
