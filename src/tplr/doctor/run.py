"""``run_doctor(settings)``: every check, in the order a start-up would hit the problem."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from tplr.comms.diskspace import FreeSpaceProbe
from tplr.comms.stores.s3 import S3Store
from tplr.data.manager_catalog import discover_catalog
from tplr.doctor import node_checks
from tplr.doctor.probes import (
    check_clock,
    check_free_disk,
    check_read_rights,
    check_write_rights,
    open_bucket,
    skipped_clock,
)
from tplr.doctor.report import CheckResult, fail, failure_of, guarded, ok, skip, warn
from tplr.errors import TplrError
from tplr.node.network.peers import load_peers_file_async
from tplr.node.network.stores import NodeStores, dataset_uses_r2, gradients_use_r2, open_node_stores
from tplr.node.process.settings import NodeSettings
from tplr.node.runtime import manager_config
from tplr.protocol.clock import Clock, SystemClock

DEFAULT_MAX_CLOCK_SKEW_S = 10.0


@dataclass
class DoctorOptions:
    max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S
    free_space_probe: FreeSpaceProbe | None = None  # tests: a disk that is too small
    clock: Clock = field(default_factory=SystemClock)


async def run_doctor(
    settings: NodeSettings, options: DoctorOptions | None = None
) -> list[CheckResult]:
    options = options or DoctorOptions()
    results: list[CheckResult] = []
    results += await guarded("clock", lambda: _clocks(settings, options))
    results += await guarded("dataset bucket", lambda: _dataset_rights(settings))
    results += await guarded("gradients bucket", lambda: _gradients_rights(settings))
    results += await guarded("peers file", lambda: _peers_file(settings))
    opened = open_node_stores(
        settings.node, settings.dataset_bucket, settings.gradients_bucket, settings.transfer
    )
    try:
        async with opened as stores:
            results += await guarded("dataset", lambda: _dataset(settings, stores, options))
            results += await guarded("run", lambda: _run_and_node(settings, stores, options))
    except TplrError as exc:  # the stores would not open: the checks above say why
        results.append(failure_of("stores", exc))
    return results


async def _clocks(settings: NodeSettings, options: DoctorOptions) -> list[CheckResult]:
    results = []
    if dataset_uses_r2(settings.dataset_bucket):
        config = settings.dataset_bucket.read_bucket()
        results.append(await check_clock("dataset", config, options.max_clock_skew_s))
    if gradients_use_r2(settings.gradients_bucket):
        config = settings.gradients_bucket.write_bucket()
        results.append(await check_clock("gradients", config, options.max_clock_skew_s))
    return results or [skipped_clock()]


async def _dataset_rights(settings: NodeSettings) -> list[CheckResult]:
    if not dataset_uses_r2(settings.dataset_bucket):
        return [skip("dataset bucket", "no R2_DATASET_* keys: the embedded dataset store")]
    config = settings.dataset_bucket.read_bucket()
    async with open_bucket(config, settings.transfer) as store:
        return [await check_read_rights("dataset bucket", store, settings.dataset.prefix)]


async def _gradients_rights(settings: NodeSettings) -> list[CheckResult]:
    bucket, uid = settings.gradients_bucket, settings.node.uid
    if not gradients_use_r2(bucket):
        return [skip("gradients bucket", "no R2_GRADIENTS_* keys: the embedded shared store")]
    async with contextlib.AsyncExitStack() as stack:
        write = await stack.enter_async_context(
            open_bucket(bucket.write_bucket(), settings.transfer)
        )
        read: S3Store | None = None
        if bucket.read_access_key_id and bucket.read_access_key_id.get_secret_value():
            read = await stack.enter_async_context(
                open_bucket(bucket.read_bucket(), settings.transfer)
            )
        return await check_write_rights("gradients bucket", write, uid=uid, read_store=read)


async def _peers_file(settings: NodeSettings) -> list[CheckResult]:
    path = settings.node.peers_file
    if path is None:
        if gradients_use_r2(settings.gradients_bucket):
            return [fail("peers file", "R2 gradients keys are set but PEERS_FILE is not")]
        return [skip("peers file", "embedded store: peers announce themselves")]
    entries = await load_peers_file_async(path)
    validators = sum(1 for entry in entries if entry.role == "validator")
    detail = f"{path}: {len(entries)} peer(s), {validators} validator(s)"
    if not validators:
        return [warn("peers file", f"{detail}: no validator, so no lead to follow")]
    return [ok("peers file", detail)]


async def _dataset(
    settings: NodeSettings, stores: NodeStores, options: DoctorOptions
) -> list[CheckResult]:
    """The layout the shard manager will find (a local check until the data layer's
    ``check_dataset_for_run`` lands), and free disk for the largest shard."""
    config = manager_config(settings.dataset, stores.dataset_root)
    catalog = await discover_catalog(stores.dataset, config.prefix, config.val_shards)
    if not catalog.train:
        return [fail("dataset", f"{stores.dataset.url(config.prefix)} has no training shard")]
    largest = max(shard.size_bytes for shard in catalog.train)
    results = [
        ok(
            "dataset",
            f"{len(catalog.train)} training and {len(catalog.val)} validation shard(s) at "
            f"{stores.dataset.url(config.prefix)}",
        )
    ]
    if stores.dataset_root is not None:
        results.append(skip("disk", "embedded dataset: shards are read in place"))
        return results
    local_dir = config.local_path()
    margin = config.disk_margin
    results.append(await check_free_disk(local_dir, largest, margin, options.free_space_probe))
    return results


async def _run_and_node(
    settings: NodeSettings, stores: NodeStores, options: DoctorOptions
) -> list[CheckResult]:
    lead_uid = await node_checks.lead_uid_of(settings, stores.directory)
    if lead_uid is None:
        gpu = await node_checks.to_thread_check(node_checks.check_gpu, settings, None)
        return [warn("run.json", "no validator is known yet: cannot find the lead"), gpu]
    lead_store = await stores.directory.store_for(lead_uid)
    results, spec = await node_checks.check_run(settings, lead_store, lead_uid)
    results.append(await node_checks.to_thread_check(node_checks.check_gpu, settings, spec))
    if spec is None:
        return results
    results += await node_checks.check_running_node(
        settings, spec, stores.own, lead_store, options.clock
    )
    return results
