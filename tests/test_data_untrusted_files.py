"""Corrupt manifests, marker files, shard headers and jsonl lines give typed errors that
name the file and the field, never an untyped crash (reproductions of issue 10 item 7)."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import moto_bucket_config
from shard_fixtures import CountingStore, publish_folder, small_manager, write_llmc_dataset
from test_data_helpers import ramp

from tplr.comms.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ManifestError
from tplr.comms.stores.local import LocalStore
from tplr.comms.stores.s3 import S3Store
from tplr.data import manager_markers as markers
from tplr.data.dataset_manifest import dataset_info, fetch_manifest
from tplr.data.formats import ShardFormatError, open_shard
from tplr.data.layout import DatasetLayoutError
from tplr.data.manager_catalog import ShardCatalog, ShardSpec
from tplr.data.tools.sources import PrepareInputError, SourceTask, read_documents

PREFIX = "remote/tokenized/"


def prepared_manifest(tmp_path: Path) -> dict:
    write_llmc_dataset(tmp_path / "src", 3, 4000)
    return json.loads((tmp_path / "src" / MANIFEST_NAME).read_text())


def first_entry(manifest: dict) -> dict:
    return manifest["files"]["fineweb_train_000000.bin"]


# --- the manifest, as the manager meets it on the dataset bucket --------------------------


def corrupt_max_token_id(manifest: dict) -> bytes:
    first_entry(manifest)["max_token_id"] = "abc"
    return json.dumps(manifest).encode()


def corrupt_huge_number(manifest: dict) -> bytes:
    first_entry(manifest)["max_token_id"] = 0
    return json.dumps(manifest).encode().replace(b'"max_token_id": 0', b'"max_token_id": 1e400')


def corrupt_val_shards(manifest: dict) -> bytes:
    manifest["dataset"] = {"val_shards": "abc"}
    return json.dumps(manifest).encode()


def corrupt_utf8(manifest: dict) -> bytes:
    return json.dumps(manifest).encode().replace(b"fineweb_train_000001", b"fineweb_\xff\xfe")


def corrupt_list(manifest: dict) -> bytes:
    first_entry(manifest)["parts"] = {"0": "x"}
    return json.dumps(manifest).encode()


def corrupt_deep(manifest: dict) -> bytes:
    return json.dumps(manifest).encode()[:-1] + b', "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"


CORRUPTIONS = {
    "max_token_id=abc": (corrupt_max_token_id, r"files\['fineweb_train_000000\.bin'\]\.max_tok"),
    "1e400": (corrupt_huge_number, "1e400"),
    "val_shards=abc": (corrupt_val_shards, r"dataset\.val_shards"),
    "bad-utf8": (corrupt_utf8, "not UTF-8"),
    "dict-for-list": (corrupt_list, r"parts"),
    "deep": (corrupt_deep, "nests 50001 levels deep"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
async def test_corrupt_dataset_manifest_is_a_typed_error_naming_file_and_field(
    name, s3_server, bucket, tmp_path
):
    corrupt, field = CORRUPTIONS[name]
    manifest = prepared_manifest(tmp_path)
    async with S3Store(moto_bucket_config(s3_server, bucket), max_connections=4) as s3:
        await publish_folder(s3, tmp_path / "src", PREFIX)
        await s3.put(PREFIX + MANIFEST_NAME, corrupt(manifest))
        with pytest.raises(ManifestError, match=field) as info:
            async with small_manager(s3, tmp_path / "local"):
                pass
    assert s3.url(PREFIX + MANIFEST_NAME) in info.value.message
    assert info.value.hint


def test_dataset_section_problems_name_the_field(tmp_path):
    manifest = prepared_manifest(tmp_path)
    manifest["dataset"] = {"tokenizer": "gpt2", "vocab_size": 50257, "seq_len": 1024}
    parsed = Manifest.from_json(json.dumps(manifest), source="m.json")
    with pytest.raises(ManifestError, match=r"m\.json has an invalid 'dataset' section: "):
        dataset_info(parsed, source="m.json")
    manifest["dataset"].update(format="llmc", dtype="uint16", shards=3, tokens=1, vocab_size=0)
    parsed = Manifest.from_json(json.dumps(manifest), source="m.json")
    with pytest.raises(ManifestError, match=r"dataset\.vocab_size: Input should be greater than 0"):
        dataset_info(parsed, source="m.json")
    manifest["dataset"]["seq_len"] = True  # a bool is not a count: refused by the parser
    with pytest.raises(ManifestError, match=r"m\.json: dataset\.seq_len must be a whole number"):
        Manifest.from_json(json.dumps(manifest), source="m.json")


async def test_an_oversized_manifest_is_refused_before_it_is_read(tmp_path):
    bucket_dir = tmp_path / "bucket"
    store = CountingStore(LocalStore(bucket_dir))
    await store.put(PREFIX + "placeholder", b"")
    with open(bucket_dir / PREFIX / MANIFEST_NAME, "wb") as fh:
        fh.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ManifestError, match=f"a manifest may be at most {MAX_MANIFEST_BYTES}"):
        await fetch_manifest(store, PREFIX)
    assert store.range_calls == 0
    with pytest.raises(ManifestError, match="the limit is"):
        Manifest.from_json(b" " * (MAX_MANIFEST_BYTES + 1), source="big.json")


# --- marker files a local user can swap -------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b'{"files": []}', b'{"files": {"a": 3}}', b"[" * 100_000, b"\xff", b"[1]", b"{}" * 10],
    ids=["files-list", "record-int", "deep", "bad-utf8", "list", "garbage"],
)
def test_a_swapped_ready_marker_is_stale_not_a_crash(tmp_path, content):
    files = write_llmc_dataset(tmp_path, 1, 1000)
    markers.write_ready(tmp_path, 0, files)
    (tmp_path / markers.MARKER_DIR / "ready-0.json").write_bytes(content)
    assert markers.ready_is_valid(tmp_path, 0, files) is False


@pytest.mark.parametrize(
    "content", [b"[1]", b'{"error": 5}', b"[" * 100_000, b"\xff"], ids=["list", "int", "deep", "u8"]
)
def test_a_swapped_error_marker_is_a_typed_error(tmp_path, content):
    (tmp_path / markers.MARKER_DIR).mkdir()
    (tmp_path / markers.MARKER_DIR / "error-0.json").write_bytes(content)
    with pytest.raises(markers.MarkerError, match="marker"):
        markers.read_error(tmp_path, 0)


def test_markers_are_not_followed_out_of_the_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    local = tmp_path / "local"
    files = write_llmc_dataset(local, 1, 1000)
    (local / markers.MARKER_DIR).symlink_to(outside)  # the marker folder is a link out
    with pytest.raises(markers.MarkerError, match="resolves outside"):
        markers.write_ready(local, 0, files)
    assert list(outside.iterdir()) == []
    (local / markers.MARKER_DIR).unlink()
    (local / markers.MARKER_DIR).mkdir()
    (outside / "error.json").write_text('{"error": "planted"}')
    (local / markers.MARKER_DIR / "error-0.json").symlink_to(outside / "error.json")
    with pytest.raises(markers.MarkerError, match="resolves outside"):
        markers.read_error(local, 0)
    assert markers.ready_is_valid(local, 0, files) is False


# --- shard headers ---------------------------------------------------------------------


def npy_with_header(header: str, payload: bytes, *, version: int = 1) -> bytes:
    text = header.encode("latin1")
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(text)) + text + payload


def test_npy_header_length_is_checked_against_the_file_before_reading(tmp_path):
    path = tmp_path / "train_000000.npy"
    # A v2 header claiming 4 GiB of header text, in a 100-byte file.
    path.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFF_FFF0) + b" " * 90)
    tracemalloc.start()
    try:
        with pytest.raises(ShardFormatError, match="header"):
            open_shard(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated for a 100-byte file"


@pytest.mark.parametrize(
    "shape", ["(4611686018427387929, 4)", "(-1, -100)"], ids=["wraps-int64", "negative"]
)
def test_npy_shape_that_lies_about_its_count_is_refused(tmp_path, shape):
    tokens = np.asarray(ramp(100), dtype="<u2").tobytes()  # 100 tokens, as the lie claims
    header = f"{{'descr': '<u2', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    path = tmp_path / "train_000000.npy"
    path.write_bytes(npy_with_header(header, tokens))
    (tmp_path / "sample_ids_000000.bin").write_bytes(np.arange(25, dtype="<u8").tobytes())
    with pytest.raises(ShardFormatError, match="shape"):
        open_shard(path)


def test_npy_header_that_is_not_a_literal_is_refused(tmp_path):
    path = tmp_path / "train_000000.npy"
    path.write_bytes(npy_with_header("(" * 5000 + "\n", b"\0" * 64))
    with pytest.raises(ShardFormatError, match=r"malformed \.npy header"):
        open_shard(path)


# --- jsonl inputs of tplr shards prepare -------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [b'{"text": ' + b"[" * 100_000 + b"}", b'{"text": "a", "n": ' + b"9" * 5000 + b"}"],
    ids=["deep", "huge-int"],
)
def test_jsonl_line_problems_are_typed_and_name_the_line(tmp_path, line):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + line + b"\n")
    task = SourceTask(str(path), "jsonl", 0, path.stat().st_size, path.stat().st_size)
    with pytest.raises(PrepareInputError, match=r"in\.jsonl \(line at byte 17\)"):
        read_documents(task)


def test_jsonl_still_reads_good_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    buf = io.BytesIO()
    for text in ("one", "two é", ""):
        buf.write(json.dumps({"text": text, "meta": {"id": 1}}).encode() + b"\n")
    path.write_bytes(buf.getvalue() + b"\n")
    size = path.stat().st_size
    task = SourceTask(str(path), "jsonl", 0, size, size)
    assert read_documents(task) == ["one", "two é", ""]


# --- rank 0's catalog, as the other local ranks receive it ---------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "[",
        "[1]",
        '{"train": {}, "val": [], "manifest_json": null}',
        '{"train": [{"index": 0, "keys": ["../x_000000.bin"], "sizes": [9], "number": 0}], '
        '"val": [], "manifest_json": null}',
        '{"train": [{"index": "0", "keys": ["a_000000.bin"], "sizes": [9], "number": 0}], '
        '"val": [], "manifest_json": null}',
        '{"train": [], "val": [], "manifest_json": 5}',
    ],
    ids=["torn", "list", "train-object", "dotdot-key", "string-index", "manifest-int"],
)
def test_a_malformed_catalog_from_rank0_is_a_typed_error(text):
    with pytest.raises(DatasetLayoutError):
        ShardCatalog.from_json(text)


def test_the_catalog_round_trips(tmp_path):
    spec = ShardSpec(0, ("train_000000.npy", "sample_ids_000000.bin"), (10, 8), 0, 99)
    catalog = ShardCatalog((spec,), (), None)
    assert ShardCatalog.from_json(catalog.to_json()) == catalog
