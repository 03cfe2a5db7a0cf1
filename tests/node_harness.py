"""Helpers for the node tests: a shuffled bytes-tokenized dataset, a warmed-up initial model,
node settings on the moto S3 server, and a driver that runs real nodes as asyncio tasks on
one FakeClock, stepping time phase by phase (protocol v2)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from demo_network import warm_model, write_text_corpus  # scripts/ is on pytest's pythonpath
from pydantic import SecretStr

from tplr.comms.config import DatasetBucketSettings, GradientsBucketSettings
from tplr.comms.stores.base import ObjectStore
from tplr.comms.transfer_config import TransferConfig
from tplr.data.manager_config import DatasetConfig
from tplr.data.tools.prepare import PrepareConfig, prepare_shards
from tplr.node.process.health import HealthConfig
from tplr.node.process.lifecycle import Shutdown
from tplr.node.process.settings import (
    GatherConfig,
    MinerConfig,
    NodeConfig,
    NodeSettings,
    RunSettings,
    ValidatorConfig,
)
from tplr.node.runtime import NodeRuntime, open_runtime
from tplr.protocol.clock import FakeClock

PREFIX = "remote/tokenized/"
SEQ_LEN = 128
ROWS_PER_SHARD = 6144
TRAIN_SHARDS = 10  # windows 0..9 each on a fresh shard; one more warms the model up
WARMUP_SHARD = TRAIN_SHARDS
WARMUP_STEPS = 800

TEST_RUN: dict[str, Any] = {
    "run_id": "it-run",
    "window_seconds": 60.0,
    "inner_steps": 16,
    "inner_lr": 1e-2,
    "outer_lr": 1.0,
    "micro_batch_size": 8,
    "batch_size": 8,
    "model": "tiny",
    "compression_chunk_size": 128,  # uint8 indices: 128..255 are out of range
    "compression_topk": 32,
    "windows_per_shard": 1,
    "checkpoint_every_windows": 2,
    "seed": 1234,
    "bootstrap_windows": 0,  # the run starts from a warmed-up model
    "gate_samples": 128,
    "heldout_samples": 256,
}
"""The test settings the scoring figures are quoted at (see docs/protocol.md)."""


def build_dataset(
    folder: Path, *, rows_per_shard: int = ROWS_PER_SHARD, shards: int = TRAIN_SHARDS + 2
) -> Path:
    """About ``shards`` templar shards of ``rows_per_shard`` x 128 bytes-tokens (the last one
    held out), with manifest."""
    write_text_corpus(folder / "text", SEQ_LEN * rows_per_shard * (shards - 1) + 200_000)
    out = folder / "shards"
    prepare_shards(
        PrepareConfig(
            inputs=[folder / "text"],
            out_dir=out,
            tokenizer="bytes",
            seq_len=SEQ_LEN,
            shard_tokens=SEQ_LEN * rows_per_shard,
            val_shards=1,
            progress=False,
        )
    )
    return out


@dataclass(frozen=True)
class TestData:
    shards: Path
    init_model: Path
    vocab_size: int


def make_test_data(root: Path) -> TestData:
    shards = build_dataset(root)
    vocab_size = 257  # the bytes tokenizer: 256 bytes + end of text
    warm_shard = shards / f"train_{WARMUP_SHARD:06d}.npy"
    init_model = warm_model(warm_shard, root / "init.safetensors", steps=WARMUP_STEPS)
    return TestData(shards, init_model, vocab_size)


async def publish_folder(store: ObjectStore, folder: Path, prefix: str) -> None:
    """Every file, the manifest last (as `tplr shards upload` does)."""
    files = sorted(
        (p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name == "manifest.json"
    )
    for path in files:
        await store.put(prefix + path.name, path.read_bytes())


def copy_shards(shards: Path, dest: Path) -> Path:
    shutil.copytree(shards, dest)
    return dest


@dataclass
class NetworkLayout:
    """Buckets on the S3 server: one dataset bucket, one gradients bucket per uid."""

    endpoint: str
    dataset_bucket: str
    buckets: dict[int, str]  # uid -> gradients bucket
    roles: dict[int, str]
    peers_file: Path

    def write_peers_file(self) -> None:
        entries = [
            {
                "uid": uid,
                "role": self.roles[uid],
                "bucket_name": bucket,
                "endpoint_url": self.endpoint,
                "read_access_key_id": TEST_ACCESS_KEY,
                "read_secret_access_key": TEST_SECRET_KEY,
            }
            for uid, bucket in sorted(self.buckets.items())
        ]
        self.peers_file.write_text(yaml.safe_dump({"peers": entries}))


def s3_settings(
    layout: NetworkLayout,
    uid: int,
    home: Path,
    *,
    lead: bool = False,
    run: dict[str, Any] | None = None,
    validator: dict[str, Any] | None = None,
) -> NodeSettings:
    role = layout.roles[uid]
    keys = {"endpoint_url": layout.endpoint}
    return NodeSettings(
        role=role,
        node=NodeConfig(
            uid=uid,
            home=home,
            peers_file=layout.peers_file,
            lead_uid=0,
            device="cpu",
            poll_interval_s=1.0,
        ),
        run=RunSettings(**(run or {})),
        gather=GatherConfig(timeout_s=60.0, check_upload_time=False),
        dataset=DatasetConfig(bins_path=PREFIX, local_dir=home / "dataset"),
        dataset_bucket=DatasetBucketSettings(
            bucket_name=layout.dataset_bucket,
            read_access_key_id=SecretStr(TEST_ACCESS_KEY),
            read_secret_access_key=SecretStr(TEST_SECRET_KEY),
            **keys,
        ),
        gradients_bucket=GradientsBucketSettings(
            bucket_name=layout.buckets[uid],
            write_access_key_id=SecretStr(TEST_ACCESS_KEY),
            write_secret_access_key=SecretStr(TEST_SECRET_KEY),
            **keys,
        ),
        transfer=TransferConfig(transfer_max_attempts=3, transfer_retry_total_s=30.0),
        health=HealthConfig(metrics_host="127.0.0.1", metrics_port=0),
        miner=MinerConfig(retention_windows=8) if role == "miner" else None,
        validator=(
            ValidatorConfig(lead=lead, retention_windows=8, **(validator or {}))
            if role == "validator"
            else None
        ),
    )


NodeFactory = Callable[[NodeRuntime, NodeSettings], Any]


@dataclass
class RunningNode:
    uid: int
    task: asyncio.Task
    shutdown: Shutdown
    node: Any = None  # the Miner / Validator, once built
    runtime: NodeRuntime | None = None


@dataclass
class FakeNetwork:
    """Real nodes as tasks on one loop; time moves only when every node waits, and stops at
    every phase boundary of the window (commit, reveal opens, reveal, approval, end)."""

    clock: FakeClock
    window_seconds: float
    nodes: dict[int, RunningNode] = field(default_factory=dict)
    _windows: Any = None

    def start(self, uid: int, settings: NodeSettings, factory: NodeFactory) -> RunningNode:
        shutdown = Shutdown()

        async def main() -> None:
            async with open_runtime(settings, shutdown=shutdown, clock=self.clock) as rt:
                node = factory(rt, settings)
                self.nodes[uid].node, self.nodes[uid].runtime = node, rt
                await node.run()

        running = RunningNode(uid, asyncio.create_task(main(), name=f"node-{uid}"), shutdown)
        self.nodes[uid] = running
        return running

    def kill(self, uid: int) -> asyncio.Task:
        """Cancel a node's task abruptly (a crash: nothing finishes)."""
        running = self.nodes.pop(uid)
        running.task.cancel()
        return running.task

    async def settle(self, timeout_s: float = 300.0) -> None:
        """Wait until every node sleeps (or raise what one raised)."""
        async with asyncio.timeout(timeout_s):
            while self.clock.sleeper_count < len(self.nodes):
                for running in self.nodes.values():
                    if running.task.done():
                        running.task.result()  # raises the node's error
                        raise AssertionError(f"node {running.uid} stopped early")
                await asyncio.sleep(0.02)

    def windows(self):
        """The run's window clock (kept once known: the lead may be killed meanwhile)."""
        if self._windows is None:
            lead = self.nodes[0].runtime
            assert lead is not None
            self._windows = lead.windows
        return self._windows

    async def step_to(self, fraction: float) -> None:
        """Within the current window, to ``start + fraction × window``, phase by phase."""
        windows = self.windows()
        window = windows.current_window()
        target = windows.window_start_s(window) + fraction * windows.window_seconds
        for boundary in (*windows.phase_boundaries_s(window)[:-1], target):
            if self.clock.now() < boundary <= target:
                self.clock.set(boundary)
                await self.settle()

    async def next_window(self) -> None:
        """From anywhere in window ``w`` to the start of ``w + 1``, phase by phase."""
        windows = self.windows()
        window = windows.current_window()
        for boundary in windows.phase_boundaries_s(window):
            if boundary > self.clock.now():
                self.clock.set(boundary)
                await self.settle()

    async def stop(self) -> None:
        for running in self.nodes.values():
            running.shutdown.request("test over")
        await asyncio.gather(*(r.task for r in self.nodes.values()))

    async def cancel_all(self) -> None:
        tasks = [running.task for running in self.nodes.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await predicate():
            await asyncio.sleep(0.05)
