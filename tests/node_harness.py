"""Helpers for the node tests: a small bytes-tokenized dataset, node settings on the moto S3
server, and a driver that runs real nodes as asyncio tasks on one FakeClock."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from demo_network import write_text_corpus  # scripts/ is on pytest's pythonpath
from pydantic import SecretStr

from tplr.comms.config import DatasetBucketSettings, GradientsBucketSettings
from tplr.comms.store import ObjectStore
from tplr.comms.transfer_config import TransferConfig
from tplr.data.manager_config import DatasetConfig
from tplr.data.prepare import PrepareConfig, prepare_shards
from tplr.node.clock import FakeClock
from tplr.node.health import HealthConfig
from tplr.node.lifecycle import Shutdown
from tplr.node.runtime import NodeRuntime, open_runtime
from tplr.node.settings import (
    GatherConfig,
    MinerConfig,
    NodeConfig,
    NodeSettings,
    RunSettings,
    ValidatorConfig,
)

PREFIX = "remote/tokenized/"
SEQ_LEN = 128
ROWS_PER_SHARD = 512

TEST_RUN = {
    "run_id": "it-run",
    "window_seconds": 60.0,
    "upload_deadline_fraction": 1.0,
    "inner_steps": 8,
    "inner_lr": 3e-3,
    "outer_lr": 1.0,
    "micro_batch_size": 8,
    "batch_size": 8,
    "model": "tiny",
    "compression_chunk_size": 128,  # uint8 indices: 128..255 are out of range
    "compression_topk": 16,
    "windows_per_shard": 3,
    "checkpoint_every_windows": 2,
    "seed": 1234,
    "peers_min_score": 2e-5,
}


def build_dataset(folder: Path, *, text_bytes: int = 320_000) -> Path:
    """Templar shards of 512 x 128 bytes-tokens (the last one held out), with manifest."""
    write_text_corpus(folder / "text", text_bytes)
    out = folder / "shards"
    prepare_shards(
        PrepareConfig(
            inputs=[folder / "text"],
            out_dir=out,
            tokenizer="bytes",
            seq_len=SEQ_LEN,
            shard_tokens=SEQ_LEN * ROWS_PER_SHARD,
            val_shards=1,
            progress=False,
        )
    )
    return out


async def publish_folder(store: ObjectStore, folder: Path, prefix: str) -> None:
    """Every file, the manifest last (as `tplr shards upload` does)."""
    files = sorted(
        (p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name == "manifest.json"
    )
    for path in files:
        await store.put(prefix + path.name, path.read_bytes())


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
            ValidatorConfig(lead=lead, eval_seed=7, retention_windows=8, **(validator or {}))
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
    """Real nodes as tasks on one loop; time moves only when every node waits."""

    clock: FakeClock
    window_seconds: float
    nodes: dict[int, RunningNode] = field(default_factory=dict)

    def start(self, uid: int, settings: NodeSettings, factory: NodeFactory) -> RunningNode:
        shutdown = Shutdown()
        holder: dict[str, Any] = {}

        async def main() -> None:
            async with open_runtime(settings, shutdown=shutdown, clock=self.clock) as rt:
                holder["rt"] = rt
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

    async def settle(self, timeout_s: float = 180.0) -> None:
        """Wait until every node sleeps until the next window (or raise what one raised)."""
        async with asyncio.timeout(timeout_s):
            while self.clock.sleeper_count < len(self.nodes):
                for running in self.nodes.values():
                    if running.task.done():
                        running.task.result()  # raises the node's error
                        raise AssertionError(f"node {running.uid} stopped early")
                await asyncio.sleep(0.02)

    async def next_window(self) -> None:
        self.clock.advance(self.window_seconds)
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
