from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import pytest
import yaml
from conftest import moto_bucket_config

from tplr.comms.errors import AccessDenied, NotFound
from tplr.comms.stores.local import LocalStore
from tplr.comms.stores.s3 import S3Store
from tplr.comms.transfer_config import TransferConfig
from tplr.node.network.directory import PeersFileDirectory
from tplr.node.network.peers import (
    NodeAnnouncement,
    PeerList,
    PeersFileError,
    announce_node,
    discover_nodes,
    load_peers_file,
    load_peers_file_async,
    parse_peers,
    publish_peer_list,
    read_latest_peer_list,
    read_peer_list,
)

SECRET = "very-secret-value-123"

YAML_PEERS = f"""
# operator's peers file
- uid: 3
  role: miner
  bucket_name: miner-three
  account_id: abc123
  read_access_key_id: AKID3
  read_secret_access_key: {SECRET}
- uid: 1
  role: validator
  bucket_name: lead.validator
  endpoint_url: http://127.0.0.1:9000
  prefix: grads/
  read_access_key_id: AKID1
  read_secret_access_key: {SECRET}
"""


def good_entry(**changes) -> dict:
    entry = {
        "uid": 5,
        "role": "miner",
        "bucket_name": "miner-five",
        "account_id": "acc5",
        "read_access_key_id": "AKID5",
        "read_secret_access_key": SECRET,
    }
    entry.update(changes)
    return entry


def test_yaml_and_json_peers_files_parse_to_the_same_peers(tmp_path):
    yaml_path = tmp_path / "peers.yaml"
    yaml_path.write_text(YAML_PEERS)
    from_yaml = load_peers_file(yaml_path)
    assert [peer.uid for peer in from_yaml] == [1, 3]
    assert from_yaml[0].role == "validator" and from_yaml[0].prefix == "grads/"
    config = from_yaml[0].bucket_config()
    assert config.resolved_endpoint() == "http://127.0.0.1:9000"
    assert from_yaml[1].bucket_config().resolved_endpoint() == (
        "https://abc123.r2.cloudflarestorage.com"
    )
    as_json = [
        {**peer.model_dump(), "read_access_key_id": "AKID", "read_secret_access_key": SECRET}
        for peer in from_yaml
    ]
    json_path = tmp_path / "peers.json"
    json_path.write_text(json.dumps({"peers": as_json}))
    from_json = load_peers_file(json_path)
    assert [(p.uid, p.role, p.bucket_name) for p in from_json] == [
        (p.uid, p.role, p.bucket_name) for p in from_yaml
    ]


def test_secrets_never_show_in_repr_or_errors(tmp_path):
    peers = parse_peers(YAML_PEERS, path="peers.yaml")
    assert SECRET not in repr(peers) and SECRET not in str(peers)
    assert SECRET not in peers[0].model_dump_json()
    assert peers[0].read_secret_access_key.get_secret_value() == SECRET
    bad = json.dumps([good_entry(role="lurker")])
    with pytest.raises(PeersFileError) as info:
        parse_peers(bad, path="p.json")
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


@pytest.mark.parametrize(
    ("entry", "field", "message"),
    [
        (good_entry(role="lurker"), "role", "'miner' or 'validator'"),
        (good_entry(uid=-1), "uid", "greater than or equal to 0"),
        (good_entry(bucket_name="Bad_Bucket"), "bucket_name", "pattern"),
        (good_entry(read_secret_access_key="  "), "read_secret_access_key", "must not be empty"),
        (good_entry(account_id=None), None, "account_id (Cloudflare R2) or endpoint_url"),
        (good_entry(endpoint_url="ftp://x"), "endpoint_url", "pattern"),
        (good_entry(prefix="../escape"), "prefix", "without '..'"),
        (good_entry(colour="blue"), "colour", "unknown field"),
        (
            {k: v for k, v in good_entry().items() if k != "read_access_key_id"},
            "read_access_key_id",
            "Field required",
        ),
    ],
)
def test_bad_entries_name_file_entry_and_field(entry, field, message):
    document = json.dumps([good_entry(uid=0), entry])
    with pytest.raises(PeersFileError) as info:
        parse_peers(document, path="/etc/tplr/peers.json")
    error = info.value
    assert error.path == "/etc/tplr/peers.json"
    assert error.entry.startswith("entry 1")
    assert error.field == field
    assert message in str(error)
    assert "/etc/tplr/peers.json, entry 1" in str(error)
    assert "PEERS_FILE" in error.hint


def test_document_level_errors(tmp_path):
    with pytest.raises(PeersFileError, match="uid 5 is listed twice"):
        parse_peers(json.dumps([good_entry(), good_entry()]), path="p.json")
    with pytest.raises(PeersFileError, match=r"invalid YAML at line \d+: expected"):
        parse_peers("- uid: 1\n  role: [miner\n", path="p.yaml")
    with pytest.raises(PeersFileError, match="invalid JSON at line 1"):
        parse_peers("[{", path="p.json")
    with pytest.raises(PeersFileError, match="expected a list of peers"):
        parse_peers("uid: 1\n", path="p.yaml")
    with pytest.raises(PeersFileError, match="entry 0: expected a mapping, got str"):
        parse_peers("- just a string\n", path="p.yaml")
    with pytest.raises(PeersFileError, match="cannot read it"):
        load_peers_file(tmp_path / "missing.yaml")


async def test_async_loader_reads_off_the_loop(tmp_path):
    path = tmp_path / "peers.yml"
    path.write_text(YAML_PEERS)
    assert [peer.uid for peer in await load_peers_file_async(path)] == [1, 3]


async def test_nodes_announce_and_discover_each_other(tmp_path, caplog):
    store = LocalStore(tmp_path)
    for uid, role in [(4, "miner"), (0, "validator"), (2, "miner")]:
        announcement = NodeAnnouncement(
            uid=uid, role=role, prefix=f"uid-{uid}/", code_version="0.1.0", announced_at_s=1.0
        )
        await announce_node(store, announcement)
    await store.put("nodes/9.json", b"not json")
    await store.put(
        "nodes/7.json",
        NodeAnnouncement(uid=8, role="miner", announced_at_s=1).model_dump_json().encode(),
    )
    caplog.set_level(logging.WARNING)
    nodes = await discover_nodes(store)
    assert [(node.uid, node.role, node.prefix) for node in nodes] == [
        (0, "validator", "uid-0/"),
        (2, "miner", "uid-2/"),
        (4, "miner", "uid-4/"),
    ]
    warnings = " ".join(record.getMessage() for record in caplog.records)
    assert "nodes/9.json" in warnings and "announces uid 8" in warnings


async def test_peer_lists_publish_and_latest(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(NotFound, match="no peer list at or before window 5"):
        await read_latest_peer_list(store, at_or_before=5)
    for window, uids in [(3, (5, 1, 2)), (10, (2,)), (7, (1, 2))]:
        await publish_peer_list(store, PeerList(window=window, uids=uids, published_by=0))
    assert (await read_peer_list(store, 3)).uids == (1, 2, 5)
    assert (await read_latest_peer_list(store, at_or_before=9)).window == 7
    assert (await read_latest_peer_list(store, at_or_before=100)).uids == (2,)
    with pytest.raises(NotFound):
        await read_peer_list(store, 4)
    with pytest.raises(ValueError, match="unique"):
        PeerList(window=1, uids=(1, 1), published_by=0)


def write_peer(path, endpoint: str, *, key: str, secret: str, bucket: str = "good") -> None:
    entry = {
        "uid": 5,
        "role": "miner",
        "bucket_name": bucket,
        "endpoint_url": endpoint,
        "read_access_key_id": key,
        "read_secret_access_key": secret,
    }
    path.write_text(yaml.safe_dump({"peers": [entry]}))


async def test_rotated_keys_are_used_and_a_broken_file_keeps_the_last_good_list(
    s3_auth_server, tmp_path
):
    """Issue 10, item 7: a peers file broken mid-run crashed the node, and a peer's rotated
    keys were never used (the client cache ignored credentials). A real moto server that
    checks signatures tells the old keys from the new."""
    endpoint, creds = s3_auth_server
    async with S3Store(
        moto_bucket_config(endpoint, "good", key=creds["key"], secret=creds["secret"])
    ) as writer:
        await writer.put("gradients/1/5.safetensors", b"payload")
    path = tmp_path / "peers.yaml"
    write_peer(path, endpoint, key=creds["key"], secret="an-old-secret")
    async with contextlib.AsyncExitStack() as stack:
        directory = PeersFileDirectory(
            path,
            own_uid=0,
            own_store=LocalStore(tmp_path / "own"),
            transfer=TransferConfig(),
            stack=stack,
        )
        await directory.refresh()
        with pytest.raises(AccessDenied):
            await (await directory.store_for(5)).get("gradients/1/5.safetensors")
        write_peer(path, endpoint, key=creds["key"], secret=creds["secret"])
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
        store = await directory.store_for(5)
        assert await store.get("gradients/1/5.safetensors") == b"payload"
        path.write_text("peers: [ {uid: 5, role: miner, bucket_name")  # a half-written edit
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000))
        assert await directory.miners() == [5]
        assert await (await directory.store_for(5)).get("gradients/1/5.safetensors") == b"payload"
