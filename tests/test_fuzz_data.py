"""Property-based fuzzing of every parser of outside data in ``tplr.data``.

Manifest bytes, llm.c and .npy shard headers, sample ids files, the manager's marker
files, jsonl input lines and bucket-listing keys: each either parses or raises one of the
project's typed errors (never ``ValueError``, ``KeyError``, ``RecursionError``...), a header
never sizes an allocation before it is checked against the file (tracemalloc), and no key
ever resolves, writes or deletes outside its root. The example budget is the profile's
(``tests/conftest.py``: 60 derandomized examples under CI=true).
"""

from __future__ import annotations

import asyncio
import json
import struct
import tempfile
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from tplr.comms.manifest import Manifest, ManifestError
from tplr.comms.stores.base import ObjectInfo
from tplr.comms.transfer_config import TransferConfig
from tplr.data import manager_markers as markers
from tplr.data.dataset_manifest import dataset_info
from tplr.data.formats import ShardFormatError, open_shard
from tplr.data.layout import DatasetLayoutError, plan_layout
from tplr.data.manager_catalog import listed_sizes
from tplr.data.manager_files import ShardFiles
from tplr.data.tools.sources import PrepareInputError, SourceTask, read_documents

HEADER_MEMORY_BOUND = 1 << 20  # bytes a header parse may allocate, whatever the header says

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
hostile_keys = st.one_of(
    st.sampled_from(
        [
            "../x_000001.bin",
            "/abs_000001.bin",
            "a//b_000001.bin",
            "./c_000001.bin",
            "d/..",
            "e\\f_000001.bin",
            "g\x00_000001.bin",
            "",
            "sub/",
            "..",
            "train_٣.bin",
        ]
    ),
    st.text(alphabet=st.sampled_from("ab_./\\\x00-01.binpy"), max_size=24),
    st.text(max_size=16).map(lambda s: f"{s}_000002.bin"),
)


def valid_manifest() -> dict:
    return {
        "format": "tplr-manifest",
        "version": 1,
        "hash": "xxh3_128",
        "part_size": 1024,
        "files": {"train_000000.bin": {"size": 2048, "parts": ["ab", "cd"], "tokens": 512}},
        "dataset": {
            "tokenizer": "gpt2",
            "vocab_size": 50257,
            "seq_len": 64,
            "format": "llmc",
            "dtype": "uint16",
            "shards": 1,
            "tokens": 512,
        },
    }


def mutated_manifest(path: list[str], value: object) -> bytes:
    """A valid manifest with the field at ``path`` (made to exist) replaced by ``value``."""
    document = valid_manifest()
    target = document
    for step in path[:-1]:
        child = target.get(step) if isinstance(target, dict) else None
        target = child if isinstance(child, dict) else target
    if isinstance(target, dict):
        target[path[-1]] = value
    return json.dumps(document).encode()


manifest_paths = st.sampled_from(
    [
        ["format"], ["version"], ["part_size"], ["files"], ["dataset"],
        ["files", "train_000000.bin"], ["files", "train_000000.bin", "size"],
        ["files", "train_000000.bin", "parts"], ["files", "train_000000.bin", "tokens"],
        ["files", "train_000000.bin", "max_token_id"], ["dataset", "vocab_size"],
        ["dataset", "seq_len"], ["dataset", "val_shards"], ["dataset", "tokenizer"],
    ]
)  # fmt: skip


def assert_manifest_parses_or_is_refused(data: bytes) -> None:
    try:
        manifest = Manifest.from_json(data, source="fuzz/manifest.json")
        dataset_info(manifest, source="fuzz/manifest.json")
    except ManifestError as exc:
        assert "fuzz/manifest.json" in exc.message and exc.hint
        return
    for key, entry in manifest.files.items():
        assert not key.startswith("/") and ".." not in key.split("/")
        assert isinstance(entry.size, int) and len(entry.parts) == entry.part_count(
            manifest.part_size
        )


@given(st.binary(max_size=512))
def test_manifest_random_bytes(data):
    assert_manifest_parses_or_is_refused(data)


@given(manifest_paths, json_values)
def test_manifest_fields_replaced_by_any_json(path, value):
    assert_manifest_parses_or_is_refused(mutated_manifest(path, value))


@given(st.integers(1, 3000), st.sampled_from([b"[", b'{"a":']))
def test_manifest_deep_nesting(depth, opener):
    assert_manifest_parses_or_is_refused(opener * depth)


@given(hostile_keys)
def test_manifest_file_keys(key):
    document = valid_manifest()
    document["files"] = {key: {"size": 0, "parts": []}}
    assert_manifest_parses_or_is_refused(json.dumps(document).encode())


# --- shard headers, read from real files --------------------------------------------------


def open_bounded(path: Path, **options) -> None:
    """open_shard, asserting only a typed error and bounded memory."""
    tracemalloc.start()
    try:
        try:
            open_shard(path, **options)
        except ShardFormatError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < HEADER_MEMORY_BOUND, f"{peak} bytes allocated for {path.stat().st_size}"


@given(
    st.sampled_from([20240520, 20240801, 0, -1, 2**31 - 1]),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(0, 4096),
)
def test_llmc_header_fields(magic, version, ntok, payload_bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz_000000.bin"
        header = np.zeros(256, dtype="<i4")
        header[:3] = (magic, version, ntok)
        path.write_bytes(header.tobytes() + b"\x01" * payload_bytes)
        open_bounded(path, seq_len=8)


npy_shapes = st.lists(st.integers(-(2**64), 2**64), min_size=0, max_size=3).map(tuple)
npy_descr = st.sampled_from(["<u2", "<u4", ">u2", "<i8", "|O", "<f4", "[('a', '<u2')]", "bogus"])


@given(npy_shapes, npy_descr, st.booleans(), st.integers(0, 2048), st.sampled_from([1, 2, 3]))
def test_npy_header_fields(shape, descr, fortran, payload_bytes, version):
    text = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape}, }}\n"
    raw = text.encode("latin1")
    length = struct.pack("<H", len(raw)) if version == 1 else struct.pack("<I", len(raw))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train_000000.npy"
        path.write_bytes(b"\x93NUMPY" + bytes([version, 0]) + length + raw + b"\0" * payload_bytes)
        (Path(folder) / "sample_ids_000000.bin").write_bytes(b"\0" * 64)
        open_bounded(path)


@given(st.binary(min_size=0, max_size=256), st.integers(0, 2**32 - 1), st.sampled_from([1, 2]))
def test_npy_header_length_and_text(text, claimed_length, version):
    length = (
        struct.pack("<H", claimed_length & 0xFFFF)
        if version == 1
        else struct.pack("<I", claimed_length)
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train_000000.npy"
        path.write_bytes(b"\x93NUMPY" + bytes([version, 0]) + length + text)
        open_bounded(path)


@given(st.integers(0, 300), st.one_of(st.none(), st.integers(1, 64)))
def test_sample_ids_sizes(ids_bytes, seq_len):
    with tempfile.TemporaryDirectory() as folder:
        tokens = Path(folder) / "train_000000.npy"
        np.save(tokens, np.arange(256, dtype="<u2"))
        (Path(folder) / "sample_ids_000000.bin").write_bytes(b"\x07" * ids_bytes)
        open_bounded(tokens, seq_len=seq_len)


# --- the manager's marker files ---------------------------------------------------------


@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_marker_files(content):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        shard = root / "train_000000.bin"
        shard.write_bytes(b"x" * 10)
        (root / markers.MARKER_DIR).mkdir()
        for kind in ("ready", "error"):
            (root / markers.MARKER_DIR / f"{kind}-0.json").write_bytes(content)
        assert markers.ready_is_valid(root, 0, [shard]) in (True, False)
        try:
            message = markers.read_error(root, 0)
        except markers.MarkerError:
            return
        assert isinstance(message, str) and len(message) <= markers.MAX_ERROR_CHARS


# --- jsonl input lines --------------------------------------------------------------------


@given(st.lists(st.binary(max_size=60) | json_values.map(json.dumps).map(str.encode), max_size=5))
def test_jsonl_lines(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "in.jsonl"
        path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
        size = path.stat().st_size
        try:
            documents = read_documents(SourceTask(str(path), "jsonl", 0, size, size))
        except PrepareInputError as exc:
            assert str(path) in exc.message
            return
        assert all(isinstance(text, str) for text in documents)


# --- bucket-listing keys --------------------------------------------------------------------


class ListingOnlyStore:
    """A hostile endpoint's LIST answer: the given keys, verbatim (nothing else is called)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def url(self, key: str = "") -> str:
        return f"s3://fuzz/{key}"

    async def list(self, prefix: str = ""):
        for key in self.keys:
            yield ObjectInfo(key, 1024 + 2 * 64, "etag", datetime.now(UTC))


@given(st.lists(hostile_keys, max_size=6), st.booleans())
def test_listing_keys_never_leave_the_folder(keys, under_prefix):
    prefix = "remote/tokenized/"
    listed = [prefix + key if under_prefix else key for key in keys] + [
        prefix + "fineweb_train_000007.bin",  # numbered apart from the hostile keys' 1 and 2
        prefix + "fineweb_train_000008.bin",
    ]
    try:
        sizes = asyncio.run(listed_sizes(ListingOnlyStore(listed), prefix))
        layout = plan_layout(sizes)
    except DatasetLayoutError:
        return
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "local"
        root.mkdir()
        sentinel = Path(folder) / "outside.txt"
        sentinel.write_text("keep")
        files = ShardFiles(None, prefix, root, TransferConfig())
        for group in layout.train + layout.val:
            for key in group.keys:
                path = files.local_path(key)
                assert path.resolve().is_relative_to(root.resolve())
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"x")
            files.delete(group.keys)
        assert sentinel.read_text() == "keep"
        everything = [p for p in Path(folder).rglob("*") if p.is_file()]
        assert everything == [sentinel], f"files left or written outside: {everything}"
