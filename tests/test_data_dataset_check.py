"""check_dataset_for_run against the moto S3 server: the summary of a good dataset, and a
clear typed error for each way a dataset can fail to carry a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import moto_bucket_config
from shard_fixtures import publish_folder, write_llmc_dataset

from tplr.comms.errors import NotFound
from tplr.comms.manifest import MANIFEST_NAME
from tplr.comms.stores.s3 import S3Store
from tplr.data.dataset_check import DatasetCheckError, check_dataset_for_run
from tplr.data.layout import DatasetLayoutError
from tplr.data.tools.prepare import PrepareConfig, prepare_shards
from tplr.data.tools.upload_shards import upload_dataset

PREFIX = "remote/tokenized/"


@pytest.fixture
async def s3(s3_server, bucket):
    async with S3Store(moto_bucket_config(s3_server, bucket), max_connections=4) as store:
        yield store


def templar_folder(tmp_path: Path, *, val_shards: int = 1) -> Path:
    text = tmp_path / "in.txt"
    text.write_text("a small corpus for a small dataset. " * 2000)
    out = tmp_path / f"templar-{val_shards}"
    prepare_shards(
        PrepareConfig(
            inputs=[text],
            out_dir=out,
            tokenizer="bytes",
            seq_len=64,
            shard_tokens=16_384,
            val_shards=val_shards,
            progress=False,
        )
    )
    return out


async def test_a_prepared_dataset_is_summarised(s3, tmp_path):
    folder = templar_folder(tmp_path)
    await upload_dataset(s3, folder, PREFIX)
    summary = await check_dataset_for_run(s3, PREFIX, sequence_length=64, vocab_size=257)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    sizes = {key: entry["size"] for key, entry in manifest["files"].items()}
    assert summary.format == "templar" and summary.token_dtype == "uint16"
    assert summary.has_manifest and summary.seq_len == 64 and summary.vocab_size == 257
    assert summary.train_shards + summary.val_shards == manifest["dataset"]["shards"]
    assert summary.val_shards == 1 and summary.max_token_id <= 256
    assert summary.next_shard_bytes == sizes["train_000000.npy"] + sizes["sample_ids_000000.bin"]
    assert summary.largest_shard_bytes >= summary.next_shard_bytes
    assert summary.url in summary.describe() and "seq_len 64" in summary.describe()


async def test_an_llmc_dataset_without_manifest_is_summarised_from_the_listing(s3, tmp_path):
    write_llmc_dataset(tmp_path / "src", 3, 4000)
    (tmp_path / "src" / MANIFEST_NAME).unlink()
    await publish_folder(s3, tmp_path / "src", PREFIX)
    summary = await check_dataset_for_run(s3, PREFIX.rstrip("/"), sequence_length=1024)
    assert (summary.format, summary.has_manifest, summary.seq_len) == ("llmc", False, None)
    assert (summary.train_shards, summary.val_shards) == (2, 1)
    assert summary.shard_bytes == (1024 + 8000, 1024 + 8000)


async def test_a_missing_bucket_is_the_stores_not_found(s3_server, tmp_path):
    config = moto_bucket_config(s3_server, "no-such-bucket-here")
    async with S3Store(config, max_connections=2) as store:
        with pytest.raises(NotFound) as info:
            await check_dataset_for_run(store, PREFIX)
    assert info.value.hint


async def test_an_empty_prefix_and_one_without_shards(s3, tmp_path):
    with pytest.raises(DatasetLayoutError, match="is empty") as info:
        await check_dataset_for_run(s3, PREFIX)
    assert "DATASET_BINS_PATH" in info.value.hint
    await s3.put(PREFIX + "README.txt", b"shards coming soon")
    with pytest.raises(DatasetLayoutError, match="no shard files found"):
        await check_dataset_for_run(s3, PREFIX)


async def test_no_validation_shard(s3, tmp_path):
    await upload_dataset(s3, templar_folder(tmp_path, val_shards=0), PREFIX)
    with pytest.raises(DatasetCheckError, match="has no validation shard") as info:
        await check_dataset_for_run(s3, PREFIX)
    assert "val_shards" in info.value.hint


async def test_sequence_length_and_vocabulary_mismatches(s3, tmp_path):
    folder = templar_folder(tmp_path)
    await upload_dataset(s3, folder, PREFIX)
    with pytest.raises(DatasetCheckError, match=r"sequences of 64 tokens.*sequence_length 128"):
        await check_dataset_for_run(s3, PREFIX, sequence_length=128)
    with pytest.raises(DatasetCheckError, match=r"holds token id \d+ .*vocab_size is 100"):
        await check_dataset_for_run(s3, PREFIX, vocab_size=100)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["dataset"]["vocab_size"] = 50257  # as if tokenized with GPT-2
    await s3.put(PREFIX + MANIFEST_NAME, json.dumps(manifest).encode())
    with pytest.raises(DatasetCheckError, match="tokenized with a vocabulary of 50257"):
        await check_dataset_for_run(s3, PREFIX, vocab_size=300)


async def test_templar_sequence_length_without_a_manifest_comes_from_the_shards(s3, tmp_path):
    folder = templar_folder(tmp_path)
    (folder / MANIFEST_NAME).unlink()
    await publish_folder(s3, folder, PREFIX)
    summary = await check_dataset_for_run(s3, PREFIX, sequence_length=64)
    assert (summary.has_manifest, summary.seq_len) == (False, 64)
    with pytest.raises(DatasetCheckError, match="sequences of 64 tokens"):
        await check_dataset_for_run(s3, PREFIX, sequence_length=32)


async def test_odd_sized_missing_and_resized_files(s3, tmp_path):
    write_llmc_dataset(tmp_path / "src", 3, 4000)
    manifest = (tmp_path / "src" / MANIFEST_NAME).read_bytes()
    (tmp_path / "src" / MANIFEST_NAME).unlink()
    await publish_folder(s3, tmp_path / "src", PREFIX)
    torn = PREFIX + "fineweb_train_000001.bin"
    await s3.put(torn, (await s3.get(torn))[:-1])  # one byte short: an odd body
    with pytest.raises(DatasetCheckError, match=r"fineweb_train_000001\.bin is 9023 bytes"):
        await check_dataset_for_run(s3, PREFIX)
    await s3.put(PREFIX + MANIFEST_NAME, manifest)  # the manifest knows the right size
    with pytest.raises(DatasetCheckError, match="is 9023 bytes, but the manifest records 9024"):
        await check_dataset_for_run(s3, PREFIX)
    await s3.delete(torn)
    with pytest.raises(DatasetCheckError, match="named by the manifest but is not in the bucket"):
        await check_dataset_for_run(s3, PREFIX)
