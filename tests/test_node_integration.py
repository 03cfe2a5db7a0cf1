"""A whole network on the S3 server: a lead validator, two honest miners, three dishonest
ones and six that upload malformed payloads, all real nodes (real stores, real torch),
driven window by window by a FakeClock that moves only when every node waits.

The adversaries are Miner subclasses with a corrupted step (their code is in this file);
nothing of the code under test is replaced.
"""

from __future__ import annotations

import asyncio
import io
import urllib.request
import uuid

import pytest
import torch
from node_harness import TEST_RUN, FakeNetwork, NetworkLayout, build_dataset, publish_folder
from node_harness import s3_settings as make_settings

from tplr.comms.config import BucketConfig
from tplr.comms.errors import NotFound
from tplr.comms.s3_store import S3Store
from tplr.node.assignment import Assignment, assignment_for
from tplr.node.clock import FakeClock
from tplr.node.miner import Miner
from tplr.node.payload import PayloadMeta, RejectReason, encode_payload, payload_key
from tplr.node.validator import Validator
from tplr.train.compression import CompressedTensor

HONEST = (1, 2)
NOISE, OTHER_SAMPLES, COPYCAT = 3, 4, 5
MALFORMED = {
    6: RejectReason.NOT_SAFETENSORS,  # a pickle file named .safetensors
    7: RejectReason.BAD_SHAPE,
    8: RejectReason.NON_FINITE,
    9: RejectReason.INDEX_OUT_OF_RANGE,
    10: RejectReason.TOO_LARGE,
    11: RejectReason.WRONG_WINDOW,
}
DISHONEST = (NOISE, OTHER_SAMPLES, COPYCAT, *MALFORMED)
RESTARTED = 2


# -- the adversaries ---------------------------------------------------------------------------
class NoiseMiner(Miner):
    """Trains, then replaces its payload with random indices and values of the same scale."""

    async def produce_payload(self, dataset, assignment):
        _honest, stats = await super().produce_payload(dataset, assignment)
        generator = torch.Generator().manual_seed(assignment.window)
        return noise_payload(self, assignment, generator), stats


def noise_payload(miner: Miner, assignment: Assignment, generator: torch.Generator) -> bytes:
    settings = miner.rt.spec.compression_settings()
    tensors = {}
    for name, shape in miner.rt.schema.param_shapes.items():
        chunks, k = settings.compressed_shape(shape)
        order = torch.rand(chunks, settings.chunk_size, generator=generator).argsort(dim=1)
        values = torch.randn(chunks, k, generator=generator) * 0.01
        tensors[name] = CompressedTensor(
            indices=order[:, :k].to(settings.index_dtype),
            values=values.to(settings.value_dtype),
            shape=torch.Size(shape),
        )
    meta = PayloadMeta(
        miner.rt.spec.run_id, assignment.window, miner.rt.uid, assignment.digest, assignment.count
    )
    return encode_payload(meta, tensors)


class OtherSamplesMiner(Miner):
    """Trains honestly, but on samples that were assigned to someone else."""

    def assignment(self, dataset, window):
        return assignment_for(self.rt.spec, dataset, self.rt.uid + 1000, window)


class CopycatMiner(Miner):
    """Re-uploads honest miner 1's payload bytes under its own uid."""

    async def produce_payload(self, dataset, assignment):
        victim = await self.rt.stores.directory.store_for(HONEST[0])
        async with asyncio.timeout(60):
            while True:
                try:
                    return await victim.get(payload_key(assignment.window, HONEST[0])), None
                except NotFound:
                    await asyncio.sleep(0.05)


class MalformedMiner(Miner):
    """Uploads one kind of malformed payload every window."""

    def __init__(self, rt, config, kind: RejectReason) -> None:
        super().__init__(rt, config)
        self.kind = kind

    async def produce_payload(self, dataset, assignment):
        return self.malformed(assignment), None

    def malformed(self, assignment: Assignment) -> bytes:
        if self.kind is RejectReason.NOT_SAFETENSORS:
            buffer = io.BytesIO()
            torch.save({"weights": torch.zeros(4)}, buffer)  # a pickle, not safetensors
            return buffer.getvalue()
        settings = self.rt.spec.compression_settings()
        window = (
            assignment.window - 1 if self.kind is RejectReason.WRONG_WINDOW else assignment.window
        )
        tensors = {}
        for name, shape in self.rt.schema.param_shapes.items():
            chunks, k = settings.compressed_shape(shape)
            indices = torch.arange(k).repeat(chunks, 1)
            values = torch.full((chunks, k), 1e-3)
            if self.kind is RejectReason.BAD_SHAPE:
                indices, values = indices[:, :-1], values[:, :-1]
            if self.kind is RejectReason.NON_FINITE:
                values[0, 0] = float("nan")
            if self.kind is RejectReason.INDEX_OUT_OF_RANGE:
                indices[0, 0] = settings.chunk_size + 5
            tensors[name] = CompressedTensor(
                indices.to(settings.index_dtype), values.to(settings.value_dtype), torch.Size(shape)
            )
        meta = PayloadMeta(
            self.rt.spec.run_id, window, self.rt.uid, assignment.digest, assignment.count
        )
        data = encode_payload(meta, tensors)
        if self.kind is RejectReason.TOO_LARGE:
            data += b"\0" * (self.rt.schema.max_bytes + 1)
        return data


def miner_factory(uid: int):
    def build(rt, settings):
        if uid == NOISE:
            return NoiseMiner(rt, settings.miner)
        if uid == OTHER_SAMPLES:
            return OtherSamplesMiner(rt, settings.miner)
        if uid == COPYCAT:
            return CopycatMiner(rt, settings.miner)
        if uid in MALFORMED:
            return MalformedMiner(rt, settings.miner, MALFORMED[uid])
        return Miner(rt, settings.miner)

    return build


def validator_factory(rt, settings):
    return Validator(rt, settings.validator)


# -- the test ----------------------------------------------------------------------------------
@pytest.fixture
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
async def layout(tmp_path, s3_server, s3_client):
    uids = (0, *HONEST, *DISHONEST)
    names = {uid: f"grad-{uid}-{uuid.uuid4().hex[:8]}" for uid in uids}
    dataset_bucket = f"data-{uuid.uuid4().hex[:8]}"
    for name in (*names.values(), dataset_bucket):
        s3_client.create_bucket(Bucket=name)
    roles = {uid: "validator" if uid == 0 else "miner" for uid in uids}
    network = NetworkLayout(s3_server, dataset_bucket, names, roles, tmp_path / "peers.yaml")
    network.write_peers_file()
    shards = build_dataset(tmp_path / "data")
    config = BucketConfig(
        bucket_name=dataset_bucket,
        access_key_id="testing-access-key",
        secret_access_key="testing-secret-key",
        endpoint_url=s3_server,
    )
    async with S3Store(config) as store:
        await publish_folder(store, shards, "remote/tokenized/")
    return network


async def check_http_endpoints(port: int) -> None:
    def get(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()

    status, body = await asyncio.to_thread(get, "/healthz")
    assert status == 200 and body.startswith("ok"), body
    status, body = await asyncio.to_thread(get, "/metrics")
    for series in ('tplr_peer_score{uid="1"}', "tplr_window ", "tplr_train_eval_loss"):
        assert series in body, series


def digests_at(network: FakeNetwork, window: int, uids) -> dict[int, str]:
    return {uid: network.nodes[uid].node.model.digests.get(window) for uid in uids}


async def test_network_of_honest_and_dishonest_miners(layout, tmp_path, one_torch_thread):
    clock = FakeClock(start_s=1_800_000_000.0)
    network = FakeNetwork(clock, TEST_RUN["window_seconds"])
    home = tmp_path / "homes"
    try:
        network.start(
            0, make_settings(layout, 0, home / "0", lead=True, run=TEST_RUN), validator_factory
        )
        await network.settle()  # run.json and the first checkpoint exist
        for uid in (*HONEST, *DISHONEST):
            network.start(uid, make_settings(layout, uid, home / str(uid)), miner_factory(uid))
        await network.settle()
        validator = network.nodes[0].node
        start = validator.model.window
        for step in range(1, 9):
            if step == 3:
                crashed = network.kill(RESTARTED)  # a crash: nothing finishes cleanly
                await asyncio.gather(crashed, return_exceptions=True)
            if step == 5:  # back two windows later, with a fresh process state
                settings = make_settings(layout, RESTARTED, home / str(RESTARTED))
                network.start(RESTARTED, settings, miner_factory(RESTARTED))
                await network.settle()
            await network.next_window()
            window = start + step
            running_honest = [u for u in HONEST if u in network.nodes]
            digests = digests_at(network, window, [0, *running_honest])
            assert len(set(digests.values())) == 1 and None not in digests.values(), digests
        assert network.nodes[RESTARTED].node.model.digests[window] == digests[0]

        board = validator.board
        scores = board.scores()
        best_dishonest = max(scores.get(uid, 0.0) for uid in DISHONEST)
        for uid in HONEST:
            assert scores[uid] > best_dishonest, scores
        reasons = {uid: board.peers[uid].last_rejection_reason for uid in DISHONEST}
        assert reasons[OTHER_SAMPLES] == RejectReason.DIGEST_MISMATCH.value
        assert reasons[COPYCAT] == RejectReason.WRONG_UID.value
        for uid, reason in MALFORMED.items():
            assert reasons[uid] == reason.value, (uid, reasons[uid])
        registry = network.nodes[0].runtime.registry
        for reason in MALFORMED.values():
            count = registry.get_sample_value("tplr_peers_rejected_total", {"reason": reason.value})
            assert count and count >= 1, reason
        # the peer list the miners now use holds the honest miners and no dishonest one
        peer_list = await validator.model.peers_for(window)
        assert set(HONEST) <= set(peer_list) and not set(peer_list) & {
            OTHER_SAMPLES,
            COPYCAT,
            *MALFORMED,
        }
        await network.stop()
    finally:
        await network.cancel_all()
