"""Gathering peers' payloads: missing, oversized (refused before download), slow (deadline),
replaced mid-fetch (never mixed), unknown peers; and the upload-time check on the store's
LastModified."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from safetensors.torch import load as safetensors_load

from tplr.comms.local_store import LocalStore
from tplr.comms.retry import RetryPolicy
from tplr.node.directory import UnknownPeer
from tplr.node.gather import PayloadFetcher, validate_all
from tplr.node.prefixed_store import PrefixedStore
from tplr.node.settings import GatherConfig
from tplr.protocol.clock import FakeClock, WindowClock
from tplr.protocol.payload import PayloadMeta, PayloadSchema, encode_payload, payload_key
from tplr.train.compression import CompressionSettings, compress_tensor

SETTINGS = CompressionSettings(chunk_size=8, topk=2)
SCHEMA = PayloadSchema.for_model({"w": (4, 8), "b": (8,)}, SETTINGS)
RUN, WINDOW = "gather-run", 2
GENESIS = 1_800_000_000.0


def payload_bytes(uid: int, window: int = WINDOW, scale: float = 1.0) -> bytes:
    generator = torch.Generator().manual_seed(uid)
    tensors = {
        name: compress_tensor(torch.randn(shape, generator=generator) * scale, SETTINGS)
        for name, shape in SCHEMA.param_shapes.items()
    }
    return encode_payload(PayloadMeta(RUN, window, uid, "blake2b:x", 16), tensors)


def same_tensors(a: bytes, b: bytes) -> bool:
    """Equal tensors (safetensors headers order their metadata arbitrarily)."""
    left, right = safetensors_load(a), safetensors_load(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


class MapDirectory:
    """Peers by uid -> store (what a PeerDirectory answers)."""

    def __init__(self, stores):
        self.stores = stores

    async def miners(self):
        return sorted(self.stores)

    async def validators(self):
        return []

    async def store_for(self, uid):
        if uid not in self.stores:
            raise UnknownPeer(f"uid {uid} is unknown")
        return self.stores[uid]


class RecordingStore(PrefixedStore):
    """A peer's real store that counts GETs and can stall or be overwritten mid-fetch."""

    def __init__(self, store, prefix, *, stall_s=0.0, replace_with=None):
        super().__init__(store, prefix)
        self.gets = 0
        self.stall_s = stall_s
        self.replace_with = replace_with

    async def get_range(self, key, offset, into, *, if_match=None):
        self.gets += 1
        await asyncio.sleep(self.stall_s)
        if self.replace_with is not None:  # the peer re-uploads between our HEAD and GET
            data, self.replace_with = self.replace_with, None
            await self.put(key, data)
        await super().get_range(key, offset, into, if_match=if_match)


@pytest.fixture
async def peers(tmp_path):
    shared = LocalStore(tmp_path)
    stores = {
        1: RecordingStore(shared, "uids/1/"),
        3: RecordingStore(shared, "uids/3/"),
        4: RecordingStore(shared, "uids/4/", stall_s=30.0),
        5: RecordingStore(shared, "uids/5/", replace_with=payload_bytes(5, scale=2.0)),
        2: RecordingStore(shared, "uids/2/"),  # posts nothing
    }
    await stores[1].put(payload_key(WINDOW, 1), payload_bytes(1))
    await stores[3].put(payload_key(WINDOW, 3), payload_bytes(3) + b"\0" * SCHEMA.max_bytes)
    await stores[4].put(payload_key(WINDOW, 4), payload_bytes(4))
    await stores[5].put(payload_key(WINDOW, 5), payload_bytes(5))
    return stores


async def test_each_peer_gets_its_own_outcome(peers):
    fetcher = PayloadFetcher(
        MapDirectory(peers),
        GatherConfig(timeout_s=0.5),
        RetryPolicy(max_attempts=3, base_delay_s=0.01),
    )
    outcome = await fetcher.fetch(WINDOW, [1, 2, 3, 4, 5, 9], max_bytes=SCHEMA.max_bytes)
    assert sorted(outcome.fetched) == [1, 5]
    assert outcome.missing == [2]
    assert outcome.failures == {3: "too_large", 4: "timeout", 9: "unknown_peer"}
    assert peers[3].gets == 0  # refused on the HEAD size, nothing downloaded
    assert same_tensors(outcome.fetched[5].data, payload_bytes(5, scale=2.0))  # new version, whole
    assert outcome.bytes == len(outcome.fetched[1].data) + len(outcome.fetched[5].data)
    assert outcome.covers([1, 2, 3]) and not outcome.covers([1, 7])
    assert sorted(outcome.subset([1, 3]).fetched) == [1]

    validated = validate_all(outcome, SCHEMA, run_id=RUN, window_clock=None)
    assert sorted(validated.valid) == [1, 5]
    validated = validate_all(outcome, SCHEMA, run_id="other-run", window_clock=None)
    assert validated.rejected[1] == "wrong_run" and validated.rejected[4] == "timeout"
    digests = {1: "blake2b:x", 5: "blake2b:something-else"}
    validated = validate_all(outcome, SCHEMA, run_id=RUN, window_clock=None, digests=digests)
    assert sorted(validated.valid) == [1] and validated.rejected[5] == "digest_mismatch"


@pytest.mark.parametrize(
    ("seconds_into_window", "accepted"),
    [(10.0, True), (29.0, True), (45.0, False), (-5.0, False)],
)
async def test_upload_time_is_the_stores_last_modified_inside_the_window(
    tmp_path, seconds_into_window, accepted
):
    store = PrefixedStore(LocalStore(tmp_path), "uids/1/")
    await store.put(payload_key(WINDOW, 1), payload_bytes(1))
    stamp = GENESIS + WINDOW * 60.0 + seconds_into_window  # the deadline is at 30 s
    os.utime(tmp_path / "uids" / "1" / payload_key(WINDOW, 1), (stamp, stamp))
    info = await store.head(payload_key(WINDOW, 1))
    assert info.last_modified.timestamp() == pytest.approx(stamp)
    fetcher = PayloadFetcher(MapDirectory({1: store}), GatherConfig(), RetryPolicy())
    outcome = await fetcher.fetch(WINDOW, [1], max_bytes=SCHEMA.max_bytes)
    clock = WindowClock(
        genesis_s=GENESIS, window_seconds=60.0, upload_deadline_fraction=0.5, clock=FakeClock()
    )
    validated = validate_all(outcome, SCHEMA, run_id=RUN, window_clock=clock)
    if accepted:
        assert 1 in validated.valid
    else:
        assert validated.rejected == {1: "outside_window"}
