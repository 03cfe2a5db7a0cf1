"""``prepare`` and ``convert``: deterministic shards, manifests, input and config errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data_helpers import LLAMA3_MAGIC, LLAMA3_VERSION, ramp, write_llmc

from tplr.comms.manifest import MANIFEST_NAME, hash_file_parts, read_manifest
from tplr.data.dataset import SharedShardedDataset
from tplr.data.dataset_manifest import dataset_info, entry_metadata
from tplr.data.formats import ShardFormatError, open_shard, open_token_file
from tplr.data.layout import plan_layout
from tplr.data.tools.convert import convert_llmc_to_templar
from tplr.data.tools.prepare import PrepareConfig, prepare_shards
from tplr.data.tools.sources import PrepareInputError, plan_tasks, read_documents
from tplr.data.tools.tokenizers import BytesTokenizer, TokenizerUnavailable, get_tokenizer
from tplr.errors import ConfigError

DOCS_A = [f"document {i}: " + "héllo wörld " * (i % 7) for i in range(60)]
DOCS_B = ["Plain text, one document per file.\n" * 30]


@pytest.fixture
def inputs(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    with open(folder / "a.jsonl", "w", encoding="utf-8") as fh:
        for doc in DOCS_A:
            fh.write(json.dumps({"text": doc, "id": 1}) + "\n")
    (folder / "b.txt").write_text(DOCS_B[0], encoding="utf-8")
    return folder


def expected_stream() -> np.ndarray:
    """[eot] + utf-8 bytes per document, files in path order (a.jsonl, then b.txt)."""
    return BytesTokenizer().encode_documents(DOCS_A + DOCS_B).astype(np.int64)


def config(inputs, out, **overrides) -> PrepareConfig:
    values = dict(
        inputs=inputs,
        out_dir=out,
        tokenizer="bytes",
        seq_len=32,
        shard_tokens=1000,
        format="templar",
        val_shards=1,
        workers=1,
        progress=False,
    )
    values.update(overrides)
    return PrepareConfig.from_values(**values)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_bytes_tokenizer_separates_documents_with_eot():
    out = BytesTokenizer().encode_documents(["ab", "", "é"])
    assert out.tolist() == [256, 97, 98, 256, 256, 0xC3, 0xA9]
    assert BytesTokenizer().encode_documents([]).size == 0


def test_prepare_templar_shards_hold_the_token_stream(inputs, tmp_path):
    result = prepare_shards(config([inputs], tmp_path / "out"))
    stream = expected_stream()
    rows = len(stream) // 32
    assert result.dropped_tokens == len(stream) - rows * 32
    got = []
    for record in result.records:
        shard = open_shard(record.tokens_path)
        assert shard.seq_len == 32 and shard.tokens.shape[0] % 32 == 0  # whole sequences
        assert shard.tokens.shape[0] <= 992  # 1000 tokens rounded down to whole sequences
        got.append(np.asarray(shard.tokens))
        ids = shard.sample_ids
        assert ids is not None and int(ids[1]) == (record.index << 40) | 32
    np.testing.assert_array_equal(np.concatenate(got), stream[: rows * 32])
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_prepare_is_byte_identical_across_worker_counts_and_input_order(inputs, tmp_path):
    one = prepare_shards(config([inputs / "a.jsonl", inputs / "b.txt"], tmp_path / "w1"))
    three = prepare_shards(
        config([inputs / "b.txt", inputs / "a.jsonl", inputs], tmp_path / "w3", workers=3)
    )
    assert len(one.records) == len(three.records) > 2
    assert folder_bytes(tmp_path / "w1") == folder_bytes(tmp_path / "w3")


def test_task_splitting_does_not_change_the_tokens(inputs):
    tokenizer = get_tokenizer("bytes")
    whole = plan_tasks([inputs / "a.jsonl"])
    pieces = plan_tasks([inputs / "a.jsonl"], jsonl_task_bytes=100)
    assert len(whole) == 1 and len(pieces) > 10
    tokens = [tokenizer.encode_documents(read_documents(t)) for t in pieces]
    np.testing.assert_array_equal(
        np.concatenate(tokens), tokenizer.encode_documents(read_documents(whole[0]))
    )


def test_prepare_manifest_carries_token_metadata(inputs, tmp_path):
    out = tmp_path / "out"
    result = prepare_shards(config([inputs], out, val_shards=2, part_size=64 * 1024))
    manifest = read_manifest(out / MANIFEST_NAME)
    info = dataset_info(manifest)
    assert info is not None
    assert (info.tokenizer, info.vocab_size, info.eot_token_id) == ("bytes", 257, 256)
    assert (info.seq_len, info.val_shards, info.format, info.dtype) == (32, 2, "templar", "uint16")
    assert info.shards == len(result.records)
    assert info.tokens == sum(r.num_tokens for r in result.records)
    meta = entry_metadata(manifest, "train_000000.npy")
    assert meta == {
        "format": "templar",
        "dtype": "uint16",
        "tokens": 992,
        "sequences": 31,
        "seq_len": 32,
        "max_token_id": 256,
        "shard_index": 0,
    }
    assert entry_metadata(manifest, "sample_ids_000000.bin")["format"] == "sample-ids"
    for key, entry in manifest.files.items():
        assert (entry.size, entry.parts) == hash_file_parts(out / key, manifest.part_size)
    layout = plan_layout(manifest.files, manifest=manifest)
    assert len(layout.val) == 2


def test_prepare_llmc_rows_are_windows_and_never_straddle(inputs, tmp_path):
    result = prepare_shards(config([inputs], tmp_path / "out", format="llmc", seq_len=31))
    stream = expected_stream()
    got = []
    for record in result.records:
        tokens = open_token_file(record.tokens_path)
        assert tokens.num_tokens % 32 == 0  # whole windows of seq_len + 1
        got.append(np.asarray(tokens.tokens))
        ds = SharedShardedDataset.open(record.tokens_path, seq_len=31, vocab_size=257)
        assert len(ds) * 32 == tokens.num_tokens
    total = sum(len(g) for g in got)
    np.testing.assert_array_equal(np.concatenate(got), stream[:total])
    assert len(stream) - total < 32


def test_prepare_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "in"
    folder.mkdir()
    table = pa.table({"text": DOCS_A, "n": list(range(len(DOCS_A)))})
    pq.write_table(table, folder / "a.parquet", row_group_size=7)
    assert len(plan_tasks([folder / "a.parquet"])) == 9  # one task per row group
    result = prepare_shards(config([folder], tmp_path / "out", workers=2))
    stream = BytesTokenizer().encode_documents(DOCS_A)
    got = np.concatenate([np.asarray(open_shard(r.tokens_path).tokens) for r in result.records])
    np.testing.assert_array_equal(got, stream[: len(got)])


def test_parquet_without_pyarrow_says_how_to_install(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"PAR1")
    code = (
        "import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None\n"
        "from tplr.data.tools.sources import plan_tasks, PrepareInputError\n"
        "from pathlib import Path\n"
        "try:\n"
        f"    plan_tasks([Path({str(path)!r})])\n"
        "except PrepareInputError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "reading .parquet inputs needs pyarrow" in out.stdout
    assert "pip install 'tplr[parquet]'" in out.stdout


def test_gpt2_without_a_cached_encoding_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(TokenizerUnavailable) as info:
        get_tokenizer("gpt2")
    assert "not in tiktoken's offline cache" in str(info.value)
    assert "TIKTOKEN_CACHE_DIR" in info.value.hint and "--tokenizer bytes" in info.value.hint


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"txt": "x"}\n', "no string 'text' field"),
        (b'{"text": 3}\n', "no string 'text' field"),
        (b"{not json\n", "invalid JSON"),
    ],
)
def test_bad_jsonl_lines_name_the_file_and_offset(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + line)
    with pytest.raises(PrepareInputError) as info:
        prepare_shards(config([path], tmp_path / "out", workers=2))
    assert f"{path} (line at byte 17): {message}" in str(info.value)


def test_input_and_config_errors(inputs, tmp_path):
    with pytest.raises(PrepareInputError, match=r"unsupported input type '\.csv'"):
        bad = tmp_path / "x.csv"
        bad.write_text("a,b")
        prepare_shards(config([bad], tmp_path / "o1"))
    with pytest.raises(PrepareInputError, match="does not exist"):
        prepare_shards(config([tmp_path / "missing.txt"], tmp_path / "o2"))
    with pytest.raises(ConfigError, match="--shard-tokens 10 is smaller than one sequence"):
        config([inputs], tmp_path / "o3", shard_tokens=10)
    with pytest.raises(ConfigError, match="--seq-len: Input should be greater than or equal"):
        config([inputs], tmp_path / "o3", seq_len=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "old.npy").write_bytes(b"x")
    with pytest.raises(ConfigError, match="is not empty"):
        prepare_shards(config([inputs], tmp_path / "busy"))
    with pytest.raises(ConfigError, match="--val-shards 99 would hold out every one"):
        prepare_shards(config([inputs], tmp_path / "o4", val_shards=99))
    assert not (tmp_path / "o4" / MANIFEST_NAME).exists()


# --- convert -------------------------------------------------------------------------


def test_convert_preserves_the_token_stream(tmp_path):
    streams = {n: ramp(5000 + n, start=n) for n in (1, 2)}
    sources = [write_llmc(tmp_path / f"edu_fineweb_train_00000{n}.bin", streams[n]) for n in (2, 1)]
    out = tmp_path / "templar"
    result = convert_llmc_to_templar(sources, out, seq_len=64)
    assert [r.index for r in result.records] == [1, 2]
    for n in (1, 2):
        shard = open_shard(out / f"train_00000{n}.npy")
        rows = len(streams[n]) // 64
        np.testing.assert_array_equal(shard.tokens, streams[n][: rows * 64])
        assert shard.tokens[0] == streams[n][0]  # the llm.c header is not in the stream
        assert int(shard.sample_ids[3]) == (n << 40) | 192
    assert result.dropped_tokens == sum(len(s) % 64 for s in streams.values())
    info = dataset_info(read_manifest(out / MANIFEST_NAME))
    assert info is not None and (info.tokenizer, info.vocab_size, info.val_shards) == (
        "gpt2",
        50257,
        1,
    )


def test_convert_llama3_keeps_uint32(tmp_path):
    tokens = ramp(1000, modulo=128256, start=90000)
    src = write_llmc(
        tmp_path / "l_000003.bin", tokens, magic=LLAMA3_MAGIC, version=LLAMA3_VERSION, dtype="<u4"
    )
    convert_llmc_to_templar([src], tmp_path / "out", seq_len=100)
    shard = open_shard(tmp_path / "out" / "train_000003.npy")
    assert shard.tokens_file.dtype == np.dtype("<u4")
    np.testing.assert_array_equal(shard.tokens, tokens)


def test_convert_rejects_non_llmc_sources(tmp_path, inputs):
    prepare_shards(config([inputs], tmp_path / "t"))
    with pytest.raises(ConfigError, match=r"must all be llm\.c shards"):
        convert_llmc_to_templar([tmp_path / "t" / "train_000000.npy"], tmp_path / "o", seq_len=8)
    tiny = write_llmc(tmp_path / "tiny_000000.bin", ramp(5))
    with pytest.raises(ShardFormatError, match="fewer than one sequence of 8"):
        convert_llmc_to_templar([tiny], tmp_path / "o2", seq_len=8)
