"""Waiting for what another node publishes (run.json, checkpoints), on a fake clock."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tplr.comms.stores.local import LocalStore
from tplr.node.network import waiting
from tplr.node.network.run_spec import read_run_spec
from tplr.node.process.lifecycle import NodeStopped, Shutdown
from tplr.protocol.clock import FakeClock
from tplr.protocol.run_spec import RUN_SPEC_KEY, RunSpec

ADVICE = "the lead validator (--lead) creates it"


def spec() -> RunSpec:
    return RunSpec(
        run_id="run-w",
        genesis_s=1_700_000_000.0,
        window_seconds=60.0,
        inner_steps=4,
        inner_lr=1e-3,
        outer_lr=0.7,
        micro_batch_size=2,
        batch_size=4,
        sequence_length=64,
        model="tiny",
        windows_per_shard=2,
        seed=1,
    )


async def test_followers_wait_for_run_json_with_one_clear_log_line(tmp_path, caplog):
    store = LocalStore(tmp_path)
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger=waiting.log.name)
    waiter = asyncio.create_task(
        waiting.poll_until_found(
            lambda: read_run_spec(store),
            what=f"run.json at {store.url(RUN_SPEC_KEY)}",
            advice=ADVICE,
            clock=clock,
            shutdown=Shutdown(),
            interval_s=5,
            log_every_s=30,
        )
    )
    for _ in range(3):
        await clock.wait_for_sleepers(1)
        clock.advance(5)
    assert not waiter.done()
    lines = [r.getMessage() for r in caplog.records if "waiting for run.json" in r.getMessage()]
    assert len(lines) == 1  # logged again only every log_every_s
    assert "--lead" in lines[0] and str(tmp_path) in lines[0]

    await store.put(RUN_SPEC_KEY, spec().to_json())
    await clock.wait_for_sleepers(1)
    clock.advance(5)
    assert await asyncio.wait_for(waiter, timeout=5) == spec()


async def test_waiting_gives_up_after_the_timeout_with_the_advice(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(waiting.WaitTimedOut, match="within 60s") as info:
        await waiting.poll_until_found(
            lambda: read_run_spec(store),
            what="run.json",
            advice=ADVICE,
            clock=FakeClock(auto_advance=True),
            shutdown=Shutdown(),
            interval_s=5,
            timeout_s=60,
        )
    assert "--lead" in info.value.hint


async def test_a_stop_request_ends_the_wait(tmp_path):
    store = LocalStore(tmp_path)
    shutdown = Shutdown()
    clock = FakeClock()
    waiter = asyncio.create_task(
        waiting.poll_until_found(
            lambda: read_run_spec(store),
            what="run.json",
            advice=ADVICE,
            clock=clock,
            shutdown=shutdown,
            interval_s=5,
        )
    )
    await clock.wait_for_sleepers(1)
    shutdown.request("SIGTERM")
    with pytest.raises(NodeStopped):
        await asyncio.wait_for(waiter, timeout=5)
