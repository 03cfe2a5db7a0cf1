"""``tplr shards`` as operators run it (subprocesses), and ``upload`` against moto S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from test_data_helpers import ramp, write_llmc

from tplr.comms.manifest import MANIFEST_NAME, read_manifest
from tplr.comms.stores.url import open_store_for_url
from tplr.comms.transfer_config import TransferConfig
from tplr.data.formats import open_shard
from tplr.data.tools.convert import convert_llmc_to_templar
from tplr.data.tools.upload_shards import upload_dataset
from tplr.errors import ConfigError


def tplr(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tplr", "shards", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def aws_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
    }


# --- inspect -------------------------------------------------------------------------


def test_inspect_prints_one_json_object_per_file(tmp_path):
    good = write_llmc(tmp_path / "edu_fineweb_train_000001.bin", ramp(4000))
    done = tplr("inspect", str(good), "--seq-len", "99")
    assert done.returncode == 0, done.stderr
    (report,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert report == {
        "path": str(good),
        "ok": True,
        "format": "llmc",
        "dtype": "uint16",
        "tokens": 4000,
        "sequences": 40,
        "seq_len": 99,
        "max_token_id": 4006,
        "first_tokens": [7, 8, 9, 10, 11, 12, 13, 14],
    }


def test_inspect_exits_non_zero_on_an_invalid_file(tmp_path):
    good = write_llmc(tmp_path / "a_000000.bin", ramp(100))
    bad = tmp_path / "b_000001.bin"
    bad.write_bytes(good.read_bytes()[:-2])  # one token short of its header
    done = tplr("inspect", str(good), str(bad))
    assert done.returncode == 1
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["ok"] for r in reports] == [True, False]
    assert "is truncated: 1222 bytes, but the header says 100 uint16 tokens" in reports[1]["error"]
    assert reports[1]["hint"]
    over_vocab = tplr("inspect", str(good), "--vocab-size", "100")
    assert over_vocab.returncode == 1
    assert "token id 100 at token position 93 is >= the model's vocabulary size 100" in (
        over_vocab.stdout
    )


def test_inspect_a_prepared_folder_and_a_tampered_manifest(tmp_path):
    out = tmp_path / "ds"
    prepared = tplr(
        "prepare", "--input", str(_text_inputs(tmp_path)), "--out", str(out),
        "--tokenizer", "bytes", "--seq-len", "64", "--shard-tokens", "4096",
        "--workers", "2", "--no-progress",
    )  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr
    assert "manifest.json written last" in prepared.stdout
    done = tplr("inspect", str(out))
    assert done.returncode == 0, done.stdout
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(reports) == len(list(out.glob("train_*.npy"))) >= 2
    assert all(r["format"] == "templar" and r["seq_len"] == 64 for r in reports)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["files"]["train_000000.npy"]["tokens"] += 1
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    tampered = tplr("inspect", str(out / "train_000000.npy"))
    assert tampered.returncode == 1
    assert "has tokens 4096, but" in tampered.stdout and "records 4097" in tampered.stdout


def _text_inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "text"
    folder.mkdir()
    with open(folder / "docs.jsonl", "w") as fh:
        for i in range(300):
            fh.write(json.dumps({"text": f"doc {i} " + "lorem ipsum " * (i % 9)}) + "\n")
    return folder


def test_prepare_flag_errors_name_the_flag(tmp_path):
    done = tplr(
        "prepare", "--input", str(_text_inputs(tmp_path)), "--out", str(tmp_path / "o"),
        "--tokenizer", "bytes", "--seq-len", "64", "--shard-tokens", "10",
    )  # fmt: skip
    assert done.returncode == 2
    assert "error: --shard-tokens 10 is smaller than one sequence (64 tokens)" in done.stderr
    assert "hint:" in done.stderr and "Traceback" not in done.stderr


def test_convert_command(tmp_path):
    src = write_llmc(tmp_path / "edu_fineweb_train_000004.bin", ramp(1000))
    done = tplr("convert", str(src), str(tmp_path / "out"), "--seq-len", "100")
    assert done.returncode == 0, done.stderr
    shard = open_shard(tmp_path / "out" / "train_000004.npy")
    np.testing.assert_array_equal(shard.tokens, ramp(1000))


# --- upload --------------------------------------------------------------------------


class RecordingStore:
    """A real store, observed: the order in which objects became visible or were deleted."""

    def __init__(self, inner):
        self.inner = inner
        self.events: list[tuple[str, str]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def put(self, key, data):
        info = await self.inner.put(key, data)
        self.events.append(("visible", key))
        return info

    async def complete_multipart(self, key, upload_id, parts):
        info = await self.inner.complete_multipart(key, upload_id, parts)
        self.events.append(("visible", key))
        return info

    async def delete(self, key):
        await self.inner.delete(key)
        self.events.append(("deleted", key))


@pytest.fixture
def big_dataset(tmp_path) -> Path:
    """Two templar shards, one above the 5 MiB multipart threshold."""
    (tmp_path / "src").mkdir()
    sources = [
        write_llmc(tmp_path / "src" / f"train_{n:06d}.bin", ramp(size))
        for n, size in ((0, 3_000_000), (1, 20_000))
    ]
    convert_llmc_to_templar(sources, tmp_path / "ds", seq_len=1000, part_size=1 << 20)
    return tmp_path / "ds"


async def test_upload_publishes_the_manifest_last(big_dataset, s3_server, bucket, s3_client):
    s3_client.put_object(Bucket=bucket, Key="data/manifest.json", Body=b"{stale}")
    config = TransferConfig(upload_multipart_threshold=5 << 20, upload_part_size=5 << 20)
    url = f"s3://{bucket}/data"
    async with open_store_for_url(url, env=aws_env(s3_server), access="write") as (store, key):
        recorder = RecordingStore(store)
        result = await upload_dataset(recorder, big_dataset, key, config=config, concurrency=2)
    local = read_manifest(big_dataset / MANIFEST_NAME)
    names = [k for _, k in recorder.events]
    assert recorder.events[0] == ("deleted", "data/manifest.json")  # the stale one goes first
    assert recorder.events[-1] == ("visible", "data/manifest.json")  # the new one comes last
    assert sorted(names[1:-1]) == sorted(f"data/{k}" for k in local.files)
    assert max(r.parts for r in result.files) == 2  # the big shard went multipart
    for name in [*local.files, MANIFEST_NAME]:
        body = s3_client.get_object(Bucket=bucket, Key=f"data/{name}")["Body"].read()
        assert body == (big_dataset / name).read_bytes()


async def test_upload_refuses_an_incomplete_folder(big_dataset, s3_server, bucket, s3_client):
    (big_dataset / "sample_ids_000001.bin").unlink()
    async with open_store_for_url(f"s3://{bucket}/d/", env=aws_env(s3_server), access="write") as (
        store,
        key,
    ):
        with pytest.raises(ConfigError, match=r"sample_ids_000001\.bin is named by"):
            await upload_dataset(store, big_dataset, key)
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_upload_command_against_moto(big_dataset, s3_server, bucket, s3_client):
    done = tplr(
        "upload", str(big_dataset), f"s3://{bucket}/remote/tokenized/", "--no-progress",
        env={**aws_env(s3_server), "UPLOAD_MULTIPART_THRESHOLD": "5MiB"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="remote/tokenized/")["Contents"]
    keys = {o["Key"] for o in listed}
    assert keys == {f"remote/tokenized/{p.name}" for p in big_dataset.iterdir()}
    manifest_time = next(o for o in listed if o["Key"].endswith(MANIFEST_NAME))["LastModified"]
    assert all(o["LastModified"] <= manifest_time for o in listed)
