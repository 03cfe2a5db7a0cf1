"""Node stores: the prefixed view, the embedded layout and peer discovery, the peers file
on the S3 server (read keys, prefixes, reload), and which store a node picks."""

from __future__ import annotations

import contextlib
import os

import pytest
import yaml
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from pydantic import SecretStr

from tplr.comms.config import DatasetBucketSettings, GradientsBucketSettings
from tplr.comms.errors import AlreadyExists, InvalidRequest, NotFound
from tplr.comms.stores.local import LocalStore
from tplr.comms.transfer_config import TransferConfig
from tplr.comms.upload import upload_file
from tplr.errors import ConfigError
from tplr.node.network.directory import EmbeddedDirectory, PeersFileDirectory, UnknownPeer
from tplr.node.network.peers import NodeAnnouncement, announce_node
from tplr.node.network.prefixed_store import PrefixedStore, normalize_prefix
from tplr.node.network.stores import open_node_stores
from tplr.node.process.settings import NodeConfig

MiB = 1024 * 1024


async def test_prefixed_store_is_a_bucket_of_its_own(tmp_path):
    root = LocalStore(tmp_path)
    mine = PrefixedStore(root, "uids/3")
    info = await mine.put("gradients/1/3.safetensors", b"payload")
    assert info.key == "gradients/1/3.safetensors"
    assert (
        tmp_path / "uids" / "3" / "gradients" / "1" / "3.safetensors"
    ).read_bytes() == b"payload"
    await root.put("uids/4/gradients/1/4.safetensors", b"someone else")
    assert [i.key async for i in mine.list("gradients/")] == ["gradients/1/3.safetensors"]
    assert (await mine.head("gradients/1/3.safetensors")).size == 7
    buffer = bytearray(3)
    await mine.get_range("gradients/1/3.safetensors", 2, memoryview(buffer))
    assert bytes(buffer) == b"ylo"
    assert mine.url("run.json") == root.url("uids/3/run.json")
    await mine.put_if_absent("run.json", b"first")
    with pytest.raises(AlreadyExists):
        await mine.put_if_absent("run.json", b"second")
    assert await root.get("uids/3/run.json") == b"first"
    await mine.delete("gradients/1/3.safetensors")
    with pytest.raises(NotFound):
        await mine.get("gradients/1/3.safetensors")
    assert await root.get("uids/4/gradients/1/4.safetensors") == b"someone else"


async def test_multipart_uploads_go_through_the_prefix(tmp_path):
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(6 * MiB))
    mine = PrefixedStore(LocalStore(tmp_path / "bucket"), "uids/1/")
    config = TransferConfig(upload_part_size=5 * MiB, upload_multipart_threshold=5 * MiB)
    result = await upload_file(mine, source, "checkpoints/1.safetensors", config=config)
    assert result.parts == 2 and result.etag.endswith("-2")
    stored = tmp_path / "bucket" / "uids" / "1" / "checkpoints" / "1.safetensors"
    assert stored.read_bytes() == source.read_bytes()


def test_prefixes_must_stay_inside_the_bucket():
    assert normalize_prefix("a/b") == "a/b/" and normalize_prefix("") == ""
    for bad in ("../x", "/abs", "a/../b"):
        with pytest.raises(InvalidRequest):
            normalize_prefix(bad)


async def test_embedded_directory_finds_announced_nodes_and_their_objects(tmp_path):
    shared = LocalStore(tmp_path)
    for uid, role in ((0, "validator"), (1, "miner"), (2, "miner")):
        await announce_node(shared, NodeAnnouncement(uid=uid, role=role, announced_at_s=1.0))
    own = PrefixedStore(shared, "uids/1/")
    directory = EmbeddedDirectory(shared, own_uid=1, own_store=own)
    assert await directory.miners() == [1, 2]
    assert await directory.validators() == [0]
    assert await directory.store_for(1) is own
    await own.put("reports/0.json", b"{}")
    peer_view = await EmbeddedDirectory(shared, own_uid=2, own_store=own).store_for(1)
    assert await peer_view.get("reports/0.json") == b"{}"


def write_peers(path, endpoint, entries):
    peers = [
        {
            "uid": uid,
            "role": role,
            "bucket_name": bucket,
            "endpoint_url": endpoint,
            "prefix": prefix,
            "read_access_key_id": TEST_ACCESS_KEY,
            "read_secret_access_key": TEST_SECRET_KEY,
        }
        for uid, role, bucket, prefix in entries
    ]
    path.write_text(yaml.safe_dump({"peers": peers}))


async def test_peers_file_directory_reads_peers_buckets_and_reloads(
    tmp_path, s3_server, s3_client, bucket
):
    s3_client.put_object(Bucket=bucket, Key="team/a/run.json", Body=b"lead's run")
    s3_client.put_object(Bucket=bucket, Key="gradients/1/2.safetensors", Body=b"miner 2")
    peers = tmp_path / "peers.yaml"
    write_peers(peers, s3_server, [(0, "validator", bucket, "team/a/"), (2, "miner", bucket, "")])
    own = LocalStore(tmp_path / "own")
    async with contextlib.AsyncExitStack() as stack:
        directory = PeersFileDirectory(
            peers, own_uid=5, own_store=own, transfer=TransferConfig(), stack=stack
        )
        assert await directory.validators() == [0] and await directory.miners() == [2]
        assert await (await directory.store_for(0)).get("run.json") == b"lead's run"
        assert await (await directory.store_for(2)).get("gradients/1/2.safetensors") == b"miner 2"
        assert await directory.store_for(5) is own
        with pytest.raises(UnknownPeer, match="uid 7 is not in the peers file"):
            await directory.store_for(7)
        entries = [(0, "validator", bucket, "team/a/"), (2, "miner", bucket, "")]
        write_peers(peers, s3_server, [*entries, (7, "miner", bucket, "")])
        stat = peers.stat()
        os.utime(peers, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert await directory.miners() == [2, 7]  # picked up without a restart


async def test_embedded_by_default_and_a_bucket_name_without_keys_is_an_error(tmp_path):
    """No bucket settings: the embedded store. A bucket named without its keys (or with
    `KEY=` lines left empty) is a configuration error, not a silent fallback."""
    node = NodeConfig(uid=3, home=tmp_path / "home")
    async with open_node_stores(
        node, DatasetBucketSettings(), GradientsBucketSettings(), TransferConfig()
    ) as stores:
        assert stores.embedded and stores.dataset_root == (tmp_path / "home" / "dataset")
        await stores.own.put("x.json", b"{}")
    assert (tmp_path / "home" / "shared" / "uids" / "3" / "x.json").is_file()
    assert (tmp_path / "home" / "cache" / "3").is_dir()
    empty_key = SecretStr("")
    for dataset, gradients, variable in (
        (DatasetBucketSettings(bucket_name="dataset"), GradientsBucketSettings(),
         "R2_DATASET_BUCKET_NAME=dataset is set but"),
        (DatasetBucketSettings(), GradientsBucketSettings(
            bucket_name="grads", write_access_key_id=empty_key),
         "R2_GRADIENTS_BUCKET_NAME=grads is set but"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=variable):
            async with open_node_stores(node, dataset, gradients, TransferConfig()):
                pass
