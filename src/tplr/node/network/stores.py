"""The stores a node uses, built from settings: R2/S3 when keys are set, else embedded.

- Dataset: ``DATASET_SOURCE_URL`` set -> that read-only HTTPS folder or hub dataset
  (``hf://datasets/OWNER/REPO``, :class:`~tplr.comms.stores.http.HttpStore`); else
  ``R2_DATASET_READ_*`` keys set -> that bucket; else the embedded dataset store,
  a local folder ``{home}/dataset/`` whose ``DATASET_BINS_PATH`` prefix holds the shards.
- Gradients: ``R2_GRADIENTS_WRITE_*`` (or ``READ_*``) keys set -> this node's bucket, peers
  from ``PEERS_FILE``; else the embedded shared store ``{home}/shared/``, where each node
  writes under ``uids/{uid}/`` and announces itself in ``nodes/``.

A bucket name without its keys is a configuration error (:func:`check_bucket_keys`):
falling back to the embedded store would only move the failure somewhere stranger (an
endless wait for a validator, a dataset that is "empty").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from tplr.comms.config import DatasetBucketSettings, GradientsBucketSettings
from tplr.comms.stores.base import ObjectStore
from tplr.comms.stores.local import LocalStore
from tplr.comms.stores.s3 import S3Store
from tplr.comms.stores.url import dataset_source_store
from tplr.comms.transfer_config import TransferConfig
from tplr.errors import ConfigError
from tplr.node.network.directory import (
    EmbeddedDirectory,
    PeerDirectory,
    PeersFileDirectory,
    embedded_prefix,
)
from tplr.node.network.prefixed_store import PrefixedStore
from tplr.node.process.settings import NodeConfig

log = logging.getLogger(__name__)

EMBEDDED_DATASET_DIR = "dataset"
EMBEDDED_SHARED_DIR = "shared"
CACHE_DIR = "cache"


def _given(key: SecretStr | None) -> bool:
    return key is not None and key.get_secret_value() != ""  # `KEY=` in .env is not a key


def dataset_uses_r2(bucket: DatasetBucketSettings) -> bool:
    return _given(bucket.read_access_key_id) or _given(bucket.read_secret_access_key)


def gradients_use_r2(bucket: GradientsBucketSettings) -> bool:
    keys = (
        bucket.write_access_key_id,
        bucket.write_secret_access_key,
        bucket.read_access_key_id,
        bucket.read_secret_access_key,
    )
    return any(_given(key) for key in keys)


def check_bucket_keys(
    dataset_bucket: DatasetBucketSettings, gradients_bucket: GradientsBucketSettings
) -> None:
    """A bucket named without any of its keys is an error, not the embedded store."""
    if dataset_bucket.bucket_name and not dataset_uses_r2(dataset_bucket):
        raise ConfigError(
            f"R2_DATASET_BUCKET_NAME={dataset_bucket.bucket_name} is set but "
            "R2_DATASET_READ_ACCESS_KEY_ID and R2_DATASET_READ_SECRET_ACCESS_KEY are not",
            hint="set the dataset bucket's read keys, or leave R2_DATASET_BUCKET_NAME empty "
            "to use the embedded local dataset store",
        )
    if gradients_bucket.bucket_name and not gradients_use_r2(gradients_bucket):
        raise ConfigError(
            f"R2_GRADIENTS_BUCKET_NAME={gradients_bucket.bucket_name} is set but none of "
            "R2_GRADIENTS_WRITE_ACCESS_KEY_ID / R2_GRADIENTS_WRITE_SECRET_ACCESS_KEY "
            "(nor the READ_* pair) is",
            hint="set this node's gradients bucket keys, or leave R2_GRADIENTS_BUCKET_NAME "
            "empty to use the embedded shared store",
        )


@dataclass
class NodeStores:
    dataset: ObjectStore
    own: ObjectStore  # this node's gradients bucket (or prefix); it writes here
    directory: PeerDirectory
    cache_dir: Path  # node-local scratch space (checkpoint files, shard copies)
    dataset_root: Path | None  # the embedded dataset folder, when the dataset is embedded
    shared: ObjectStore | None  # the embedded shared store, when gradients are embedded

    @property
    def embedded(self) -> bool:
        return self.shared is not None


def embedded_dataset_root(node: NodeConfig) -> Path:
    return (node.home / EMBEDDED_DATASET_DIR).absolute()


def cache_dir_for(node: NodeConfig) -> Path:
    return (node.home / CACHE_DIR / str(node.uid)).absolute()


async def _open_dataset_store(
    node: NodeConfig,
    bucket: DatasetBucketSettings,
    transfer: TransferConfig,
    stack: contextlib.AsyncExitStack,
) -> tuple[ObjectStore, Path | None]:
    if bucket.source_url:
        source = dataset_source_store(
            bucket.source_url,
            hf_endpoint=bucket.hf_endpoint,
            hf_token=bucket.hf_token,
            ca_bundle=bucket.ca_bundle,
        )
        log.info("dataset: %s (read-only HTTP(S) source)", source.url())
        return source, None
    if dataset_uses_r2(bucket):
        config = bucket.read_bucket()  # names any missing R2_DATASET_* variable
        store = await stack.enter_async_context(S3Store(config, transfer))
        log.info("dataset: %s", store.url())
        return store, None
    root = embedded_dataset_root(node)
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    log.info("dataset: embedded store %s (no R2 dataset keys set)", root)
    return LocalStore(root), root


async def _open_gradient_stores(
    node: NodeConfig,
    bucket: GradientsBucketSettings,
    transfer: TransferConfig,
    stack: contextlib.AsyncExitStack,
) -> tuple[ObjectStore, PeerDirectory, ObjectStore | None]:
    if gradients_use_r2(bucket):
        if node.peers_file is None:
            raise ConfigError(
                "gradients use R2/S3 keys but PEERS_FILE is not set",
                hint="set PEERS_FILE (or --peers-file) to the YAML/JSON list of peers' "
                "buckets and read keys",
            )
        opened = await stack.enter_async_context(S3Store(bucket.write_bucket(), transfer))
        own = PrefixedStore(opened, node.gradients_prefix) if node.gradients_prefix else opened
        directory = PeersFileDirectory(
            node.peers_file, own_uid=node.uid, own_store=own, transfer=transfer, stack=stack
        )
        await directory.refresh()  # a broken peers file fails now, naming the entry
        log.info("gradients: %s, peers from %s", own.url(), node.peers_file)
        return own, directory, None
    root = (node.home / EMBEDDED_SHARED_DIR).absolute()
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    shared = LocalStore(root)
    own = PrefixedStore(shared, embedded_prefix(node.uid))
    log.info("gradients: embedded store %s (no R2 gradients keys set)", own.url())
    return own, EmbeddedDirectory(shared, own_uid=node.uid, own_store=own), shared


@contextlib.asynccontextmanager
async def open_node_stores(
    node: NodeConfig,
    dataset_bucket: DatasetBucketSettings,
    gradients_bucket: GradientsBucketSettings,
    transfer: TransferConfig,
) -> AsyncIterator[NodeStores]:
    """Open every store the node needs; all are closed on exit."""
    check_bucket_keys(dataset_bucket, gradients_bucket)
    async with contextlib.AsyncExitStack() as stack:
        dataset, dataset_root = await _open_dataset_store(node, dataset_bucket, transfer, stack)
        own, directory, shared = await _open_gradient_stores(
            node, gradients_bucket, transfer, stack
        )
        cache = cache_dir_for(node)
        await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
        yield NodeStores(
            dataset=dataset,
            own=own,
            directory=directory,
            cache_dir=cache,
            dataset_root=dataset_root,
            shared=shared,
        )
