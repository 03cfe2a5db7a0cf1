"""The lead validator restarts: once in the middle of a window it already approved (the
approval stands), once after being down for whole windows (empty approvals for the missed
ones). Miners and a second (non-lead) validator keep the lead's model throughout."""

from __future__ import annotations

import asyncio
import uuid

from node_harness import PREFIX, TEST_RUN, FakeNetwork, NetworkLayout, publish_folder
from node_harness import s3_settings as make_settings

from tplr.comms.stores.s3 import S3Store
from tplr.node.miner import Miner
from tplr.node.network.approvals import read_approval
from tplr.node.validator import Validator
from tplr.protocol.clock import FakeClock

MINERS = (1, 2)
OTHER_VALIDATOR = 5


def in_consensus(network: FakeNetwork, window: int) -> bool:
    digests = {uid: node.node.model.digests.get(window) for uid, node in network.nodes.items()}
    return len(set(digests.values())) == 1 and None not in digests.values()


async def test_a_restarted_lead_keeps_its_approvals_and_fills_missed_windows(
    tmp_path, s3_server, s3_client, node_test_data, one_torch_thread
):
    from conftest import moto_bucket_config

    tag = uuid.uuid4().hex[:8]
    buckets = {uid: f"lr-{uid}-{tag}" for uid in (0, *MINERS, OTHER_VALIDATOR)}
    roles = {uid: "validator" if uid in (0, OTHER_VALIDATOR) else "miner" for uid in buckets}
    layout = NetworkLayout(s3_server, f"lr-data-{tag}", buckets, roles, tmp_path / "peers.yaml")
    for name in (*buckets.values(), layout.dataset_bucket):
        s3_client.create_bucket(Bucket=name)
    layout.write_peers_file()
    async with S3Store(moto_bucket_config(s3_server, layout.dataset_bucket)) as data:
        await publish_folder(data, node_test_data.shards, PREFIX)
    network = FakeNetwork(FakeClock(start_s=1_800_000_000.0), TEST_RUN["window_seconds"])
    extra = {"init_model": node_test_data.init_model}

    def start_lead(home: str):
        settings = make_settings(
            layout, 0, tmp_path / home, lead=True, run=TEST_RUN, validator=extra
        )
        network.start(0, settings, lambda rt, s: Validator(rt, s.validator))

    try:
        start_lead("lead")
        await network.settle()
        for uid in MINERS:
            settings = make_settings(layout, uid, tmp_path / str(uid))
            network.start(uid, settings, lambda rt, s: Miner(rt, s.miner))
        other = make_settings(layout, OTHER_VALIDATOR, tmp_path / "other")  # not the lead
        network.start(OTHER_VALIDATOR, other, lambda rt, s: Validator(rt, s.validator))
        await network.settle()
        for _ in range(4):
            await network.next_window()
        window = network.windows().current_window()
        # the newest checkpoint is of this window's start (checkpoints every 2 windows): a
        # restarted lead resumes *in* the window it has already approved
        assert (window + 1) % TEST_RUN["checkpoint_every_windows"]
        await network.step_to(0.97)  # past the approval deadline of ``window``
        async with S3Store(moto_bucket_config(s3_server, buckets[0])) as lead_store:
            before = await read_approval(lead_store, run_id="it-run", window=window)
            assert before.approved_uids(), before  # honest miners approved by now
            await asyncio.gather(network.kill(0), return_exceptions=True)
            start_lead("lead-again")  # same bucket, fresh process state
            await network.settle()
            await network.next_window()
            after = await read_approval(lead_store, run_id="it-run", window=window)
            assert after == before  # the approval miners may have applied stands
            assert in_consensus(network, window + 1)
            # down for two whole windows, then back
            await asyncio.gather(network.kill(0), return_exceptions=True)
            for _ in range(2):
                await network.next_window()
            missed = network.windows().current_window() - 2
            start_lead("lead-third")
            await network.settle()
            for _ in range(2):
                await network.next_window()
            empty = await read_approval(lead_store, run_id="it-run", window=missed)
            assert empty.approved == {} and empty.base_digest == empty.result_digest
            now = network.windows().current_window()
            assert in_consensus(network, now), {
                uid: node.node.model.digests.get(now) for uid, node in network.nodes.items()
            }
        # the other validator judged on its own, and published its scores
        async with S3Store(moto_bucket_config(s3_server, buckets[OTHER_VALIDATOR])) as own:
            scores = [info.key async for info in own.list("scores/")]
        assert len(scores) >= 4, scores
        await network.stop()
    finally:
        await network.cancel_all()
