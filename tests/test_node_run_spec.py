from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path

import pytest
from conftest import moto_bucket_config

from tplr.comms.errors import AlreadyExists, NotFound
from tplr.comms.stores.local import LocalStore
from tplr.comms.stores.s3 import S3Store
from tplr.data.dataset_check import DatasetCheckError
from tplr.errors import ConfigError
from tplr.node.network.run_spec import publish_run_spec, read_run_spec
from tplr.protocol.clock import FakeClock
from tplr.protocol.run_spec import (
    RUN_SPEC_KEY,
    ProtocolMismatch,
    RunSpec,
    RunSpecConflict,
    RunSpecInvalid,
    check_local_overrides,
)


def make_spec(**changes) -> RunSpec:
    values = {
        "run_id": "test-run",
        "genesis_s": 1_700_000_000.0,
        "window_seconds": 60.0,
        "inner_steps": 30,
        "inner_lr": 6e-4,
        "outer_lr": 0.7,
        "micro_batch_size": 4,
        "batch_size": 16,
        "sequence_length": 128,
        "model": "tiny",
        "windows_per_shard": 10,
        "seed": 7,
    }
    values.update(changes)
    return RunSpec(**values)


@pytest.fixture(params=["local", "s3"])
async def store(request, tmp_path: Path):
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
        return
    s3_server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("bucket")
    async with S3Store(moto_bucket_config(s3_server, bucket)) as s3:
        yield s3


async def test_lead_creates_run_json_once_and_a_second_creator_does_not_overwrite(store):
    first = make_spec()
    published = await publish_run_spec(store, first)
    assert published.created and published.spec == first
    assert published.location == store.url(RUN_SPEC_KEY)
    assert await read_run_spec(store) == first

    second = make_spec(run_id="other-run", genesis_s=1_800_000_000.0)
    again = await publish_run_spec(store, second)
    assert not again.created
    assert again.spec == first
    assert await read_run_spec(store) == first


async def test_put_if_absent_is_atomic_create(store):
    info = await store.put_if_absent("nested/probe", b"one")
    assert info.size == 3 and info.etag == hashlib.md5(b"one").hexdigest()
    with pytest.raises(AlreadyExists, match="already exists"):
        await store.put_if_absent("nested/probe", b"two")
    assert await store.get("nested/probe") == b"one"
    assert (await store.head("nested/probe")).etag == info.etag


async def test_two_racing_creators_agree_on_one_spec(store):
    specs = [make_spec(run_id=f"racer-{n}") for n in range(4)]
    racers = [asyncio.create_task(publish_run_spec(store, s)) for s in specs]
    results = await asyncio.gather(*racers)
    assert sum(result.created for result in results) == 1
    stored = await read_run_spec(store)
    assert {result.spec for result in results} == {stored}


def test_conflicting_local_override_names_field_and_both_values():
    spec = make_spec()
    with pytest.raises(RunSpecConflict) as info:
        check_local_overrides(spec, {"inner_steps": 50, "seed": None, "window_seconds": "60"})
    error = info.value
    assert error.conflicts == [("inner_steps", 30, 50)]
    assert "inner_steps: run has 30, local setting is 50" in str(error)
    assert "run.json" in error.hint
    # equal values (after coercion from env strings) and unset values are fine
    check_local_overrides(spec, {"inner_steps": "30", "outer_lr": 0.7, "seed": None})
    with pytest.raises(ConfigError, match="unknown run setting 'inner_stepz'"):
        check_local_overrides(spec, {"inner_stepz": 3})


def test_invalid_run_json_names_the_field():
    bad = make_spec().model_dump()
    bad["compression_topk"] = 10_000
    with pytest.raises(RunSpecInvalid, match="compression_topk"):
        RunSpec.from_json(RunSpec.model_construct(**bad).model_dump_json())
    with pytest.raises(RunSpecInvalid, match=r"s3://b/run.json .*window_seconds"):
        RunSpec.from_json(b'{"run_id": "x", "window_seconds": -1}', source="s3://b/run.json")
    with pytest.raises(RunSpecInvalid, match="not a valid run spec"):
        RunSpec.from_json(b"\x80\x03pickle")


def test_spec_builds_the_clock_and_compression_settings():
    spec = make_spec(commit_deadline_fraction=0.5, compression_chunk_size=256)
    windows = spec.window_clock(FakeClock(spec.genesis_s + 61))
    assert windows.current_window() == 1
    assert windows.commit_deadline_s(1) == spec.genesis_s + 90
    settings = spec.compression_settings()
    assert (settings.chunk_size, settings.topk) == (256, 32)
    assert RunSpec.from_json(spec.to_json()) == spec
    scoring = make_spec(score_ema_alpha=0.5, peers_top_n=4).scoring_config()
    assert (scoring.ema_alpha, scoring.top_n, scoring.missing_decay) == (0.5, 4, 0.9)
    assert spec.version == 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ('"genesis_s": Infinity', "Infinity"),
        ('"genesis_s": 1e400', "finite"),
        ('"genesis_s": NaN', "NaN"),
        ('"window_seconds": 1e-300', "window_seconds"),
        ('"commit_deadline_fraction": 0.9', "commit < reveal_open"),
        ('"admission_passes": 9', "admission_passes"),
    ],
)
def test_a_hostile_or_broken_run_json_is_refused_clearly(change, field):
    """Issue 10, item 7: ``genesis_s: Infinity`` or ``window_seconds: 1e-300`` crashed (or
    stalled) every node."""
    text = make_spec().to_json().decode()
    key = change.split(":")[0]
    lines = [line for line in text.splitlines() if not line.strip().startswith(key)]
    document = "\n".join(lines).rstrip().rstrip("}").rstrip().rstrip(",")
    document += f", {change}}}"
    with pytest.raises(RunSpecInvalid, match=field) as info:
        RunSpec.from_json(document.encode(), source="s3://lead/run.json")
    assert "s3://lead/run.json" in str(info.value)


def test_a_v1_run_is_refused_with_the_upgrade_path():
    document = make_spec().model_dump()
    document["version"] = 1
    with pytest.raises(ProtocolMismatch, match="protocol v1 run") as info:
        RunSpec.from_json(RunSpec.model_construct(**document).model_dump_json())
    assert "TPLR_VALIDATOR_INIT_MODEL" in info.value.hint


async def test_an_oversized_run_json_is_not_read(store):
    await store.put(RUN_SPEC_KEY, b" " * (70 * 1024))
    with pytest.raises(RunSpecInvalid, match="at most"):
        await read_run_spec(store)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    from node_harness import build_dataset

    return build_dataset(tmp_path_factory.mktemp("lead-data"), rows_per_shard=256, shards=4)


@pytest.mark.parametrize(
    ("problem", "error", "match"),
    [
        ("dataset bucket misspelled", NotFound, "does not exist|not found|NoSuchBucket"),
        ("sequence length", DatasetCheckError, "sequence_length 64"),
        ("model preset", ConfigError, "the run's model is invalid"),
    ],
)
async def test_the_lead_checks_the_run_before_it_creates_run_json(
    problem, error, match, s3_server, s3_client, small_shards, tmp_path
):
    """Issues 10 and 14: a lead with a misspelled dataset bucket (or a run that contradicts
    the dataset or names no model) wrote run.json first and failed after — and the broken
    run.json stuck. Now nothing is written until every check passed."""
    from node_harness import PREFIX, NetworkLayout, publish_folder, s3_settings

    from tplr.node.process.lifecycle import Shutdown
    from tplr.node.runtime import open_runtime

    tag = uuid.uuid4().hex[:8]
    layout = NetworkLayout(
        s3_server, f"data-{tag}", {0: f"lead-{tag}"}, {0: "validator"}, tmp_path / "p.yaml"
    )
    layout.write_peers_file()
    s3_client.create_bucket(Bucket=layout.buckets[0])
    if problem != "dataset bucket misspelled":
        s3_client.create_bucket(Bucket=layout.dataset_bucket)
        async with S3Store(moto_bucket_config(s3_server, layout.dataset_bucket)) as data:
            await publish_folder(data, small_shards, PREFIX)
    run = {"run_id": "lead-check", "window_seconds": 60.0, "model": "tiny"}
    if problem == "sequence length":
        run["sequence_length"] = 64
    if problem == "model preset":
        run["model"] = "gpt-9000"
    settings = s3_settings(layout, 0, tmp_path / "home", lead=True, run=run)
    with pytest.raises(error, match=match):
        async with open_runtime(settings, shutdown=Shutdown(), serve_health=False):
            pass
    async with S3Store(moto_bucket_config(s3_server, layout.buckets[0])) as lead:
        with pytest.raises(NotFound):
            await read_run_spec(lead)
