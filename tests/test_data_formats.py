"""Token file formats: round trips, detection from bytes, and every validation error."""

from __future__ import annotations

import numpy as np
import pytest
from test_data_helpers import (
    LLAMA3_MAGIC,
    LLAMA3_VERSION,
    llmc_bytes,
    npy_bytes,
    ramp,
    write_llmc,
    write_templar,
)

from tplr.data.formats import (
    ShardFormatError,
    TokenFormat,
    detect_format,
    open_shard,
    open_token_file,
    sample_ids_path_for,
)
from tplr.data.tools.writers import TokenShardWriter, derive_sample_ids, write_sample_ids
from tplr.data.validate import check_token_ids, max_token_id, sampled_max_token_id
from tplr.errors import TplrError

# --- round trips ---------------------------------------------------------------------


def test_llmc_gpt2_round_trip_never_reads_the_header(tmp_path):
    tokens = ramp(5000)
    path = write_llmc(tmp_path / "edu_fineweb_train_000001.bin", tokens)
    shard = open_token_file(path)
    assert shard.format is TokenFormat.LLMC
    assert shard.dtype == np.dtype("<u2")
    assert shard.header_bytes == 1024
    assert shard.num_tokens == 5000
    assert shard.tokens[0] == tokens[0] and shard.tokens[-1] == tokens[-1]
    np.testing.assert_array_equal(shard.tokens, tokens)
    # The tutorial's raw-uint16 read would start with the magic's low half (20240520 & 0xFFFF).
    raw = np.fromfile(path, dtype="<u2")
    assert raw[0] == 20240520 & 0xFFFF and shard.tokens[0] != raw[0]
    assert isinstance(shard.tokens, np.memmap)  # zero-copy


def test_llmc_llama3_variant_reads_uint32(tmp_path):
    tokens = np.array([128000, 5, 128255, 70000], dtype=np.int64)
    path = write_llmc(
        tmp_path / "llama_000000.bin",
        tokens,
        magic=LLAMA3_MAGIC,
        version=LLAMA3_VERSION,
        dtype="<u4",
    )
    shard = open_token_file(path)
    assert shard.format is TokenFormat.LLMC_LLAMA3
    assert shard.dtype == np.dtype("<u4")
    np.testing.assert_array_equal(shard.tokens, tokens)


@pytest.mark.parametrize("dtype", ["<u2", "<u4"])
def test_templar_round_trip_with_sample_ids(tmp_path, dtype):
    tokens = ramp(12 * 16)
    ids = np.arange(12, dtype=np.uint64) * 977 + 5
    tokens_path, ids_path = write_templar(tmp_path, 3, tokens, 16, dtype=dtype, ids=ids)
    shard = open_shard(tokens_path)  # the ids file is found by the templar naming
    assert shard.format is TokenFormat.TEMPLAR
    assert shard.ids_path == ids_path
    assert shard.seq_len == 16  # inferred: tokens / ids
    assert shard.tokens_file.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(shard.tokens, tokens)
    np.testing.assert_array_equal(shard.sample_ids, ids)
    assert shard.tokens[0] == tokens[0] and shard.tokens[-1] == tokens[-1]


def test_templar_two_dimensional_npy_carries_its_sequence_length(tmp_path):
    rows = ramp(40).reshape(5, 8).astype("<u2")
    tokens_path = tmp_path / "train_000000.npy"
    tokens_path.write_bytes(npy_bytes(rows))
    write_sample_ids(tmp_path / "sample_ids_000000.bin", np.arange(5))
    shard = open_shard(tokens_path)
    assert shard.seq_len == 8
    np.testing.assert_array_equal(shard.tokens, rows.reshape(-1))
    with pytest.raises(ShardFormatError, match="stores rows of 8 tokens, but sequence length 4"):
        open_shard(tokens_path, seq_len=4)


def test_raw_uint16_only_when_asked(tmp_path):
    path = tmp_path / "raw.bin"
    tokens = ramp(100)
    path.write_bytes(tokens.astype("<u2").tobytes())
    with pytest.raises(ShardFormatError, match="not a recognised token file") as info:
        open_token_file(path)
    assert "--raw-uint16" in info.value.hint
    shard = open_token_file(path, raw_uint16=True)
    assert shard.format is TokenFormat.RAW_UINT16
    np.testing.assert_array_equal(shard.tokens, tokens)


def test_raw_uint16_refuses_a_file_with_an_llmc_header(tmp_path):
    path = write_llmc(tmp_path / "a_000000.bin", ramp(10))
    with pytest.raises(ShardFormatError, match=r"llm\.c magic 20240520") as info:
        detect_format(path, raw_uint16=True)
    assert "header in as tokens" in info.value.hint


def test_detection_uses_bytes_not_names(tmp_path):
    npy_named_bin = tmp_path / "train_000000.bin"
    npy_named_bin.write_bytes(npy_bytes(ramp(8).astype("<u2")))
    assert detect_format(npy_named_bin) is TokenFormat.TEMPLAR
    llmc_named_npy = write_llmc(tmp_path / "x_000001.npy", ramp(8))
    assert detect_format(llmc_named_npy) is TokenFormat.LLMC


@pytest.mark.parametrize("fmt", [TokenFormat.LLMC, TokenFormat.TEMPLAR])
def test_writer_output_is_read_back(tmp_path, fmt):
    name = "train_000000.npy" if fmt is TokenFormat.TEMPLAR else "train_000000.bin"
    tokens = ramp(3000)
    with TokenShardWriter(tmp_path / name, fmt, np.dtype("<u2")) as writer:
        writer.append(tokens[:1000])
        writer.append(tokens[1000:])
        written = writer.finish()
    assert written.num_tokens == 3000 and written.max_token_id == int(tokens.max())
    if fmt is TokenFormat.LLMC:
        assert (tmp_path / name).read_bytes() == llmc_bytes(tokens)
    else:
        np.testing.assert_array_equal(np.load(tmp_path / name), tokens)
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_aborts_on_error_leaving_nothing(tmp_path):
    target = tmp_path / "train_000000.bin"
    with pytest.raises(RuntimeError), TokenShardWriter(target, TokenFormat.LLMC, "<u2") as w:
        w.append(ramp(10))
        raise RuntimeError("boom")
    assert not target.exists() and not list(tmp_path.iterdir())


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
    with TokenShardWriter(tmp_path / "train_000000.bin", TokenFormat.LLMC, "<u2") as writer:
        with pytest.raises(ShardFormatError, match="token id 70000 does not fit"):
            writer.append(np.array([1, 70000]))
        writer.abort()


def test_derived_sample_ids_encode_shard_and_offset():
    ids = derive_sample_ids(3, np.array([0, 1, 10]), 1025)
    assert ids.dtype == np.uint64
    assert [int(i) >> 40 for i in ids] == [3, 3, 3]
    assert [int(i) & ((1 << 40) - 1) for i in ids] == [0, 1025, 10250]
    with pytest.raises(ShardFormatError, match="shard index -1"):
        derive_sample_ids(-1, np.array([0]), 4)


def test_sample_ids_path_follows_templar_naming(tmp_path):
    assert sample_ids_path_for(tmp_path / "train_000042.npy").name == "sample_ids_000042.bin"
    with pytest.raises(ShardFormatError, match="no shard number"):
        sample_ids_path_for(tmp_path / "tokens.npy")


# --- validation errors -----------------------------------------------------------------


def _error(path, *, names=None, **kwargs) -> ShardFormatError:
    with pytest.raises(ShardFormatError) as info:
        open_shard(path, **kwargs)
    assert isinstance(info.value, TplrError) and info.value.hint
    assert str(names or path) in str(info.value)  # the message names the faulty file
    return info.value


def test_empty_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"")
    assert "is empty (0 bytes)" in str(_error(tmp_path / "a.bin"))


def test_bad_magic(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(llmc_bytes(ramp(4), magic=12345))
    assert "first 4 bytes as int32: 12345" in str(_error(path))


def test_bad_version(tmp_path):
    path = write_llmc(tmp_path / "a.bin", ramp(4), version=2)
    assert "magic 20240520 but version 2; expected version 1" in str(_error(path))


def test_header_alone_truncated(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(llmc_bytes(ramp(4))[:100])
    assert "truncated: 100 bytes, but an llm.c header alone is 1024 bytes" in str(_error(path))


def test_size_disagrees_with_header(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(llmc_bytes(ramp(100), ntok=120))
    assert "is truncated: 1224 bytes, but the header says 120 uint16 tokens" in str(_error(short))
    long = tmp_path / "long.bin"
    long.write_bytes(llmc_bytes(ramp(100), ntok=90))
    assert "longer than its header says" in str(_error(long))


def test_header_with_no_tokens(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(llmc_bytes(ramp(0)))
    assert "header says it holds 0 tokens" in str(_error(path))


def test_templar_truncated_npy(tmp_path):
    tokens_path, _ = write_templar(tmp_path, 0, ramp(64), 16)
    data = tokens_path.read_bytes()
    tokens_path.write_bytes(data[:-10])
    assert "is truncated" in str(_error(tokens_path))


def test_templar_wrong_dtype(tmp_path):
    path = tmp_path / "train_000000.npy"
    path.write_bytes(npy_bytes(np.zeros(8, dtype=np.float32)))
    assert "holds <f4 values; templar token files are little-endian uint16 or uint32" in str(
        _error(path)
    )


def test_token_count_not_divisible_by_sequence_length(tmp_path):
    tokens_path, _ = write_templar(tmp_path, 0, ramp(100), 10)
    message = str(_error(tokens_path, seq_len=16))
    assert "holds 100 tokens, which is not divisible by the sequence length 16" in message


def test_ids_count_disagrees_with_tokens(tmp_path):
    tokens_path, ids_path = write_templar(tmp_path, 0, ramp(64), 16, ids=np.arange(3))
    error = _error(tokens_path, names=ids_path, seq_len=16)
    assert error.path == str(ids_path)
    assert "has 3 sample ids, but train_000000.npy holds 64 tokens = 4 sequences of 16" in str(
        error
    )
    # without a sequence length, 64 tokens / 3 ids is no whole sequence length
    assert "do not divide the 64 tokens" in str(_error(tokens_path, names=ids_path))


def test_truncated_sample_ids(tmp_path):
    tokens_path, ids_path = write_templar(tmp_path, 0, ramp(64), 16)
    ids_path.write_bytes(ids_path.read_bytes()[:-3])
    message = str(_error(tokens_path, names=ids_path))
    assert "is truncated: 29 bytes is not a whole number of uint64 sample ids" in message


def test_missing_sample_ids(tmp_path):
    tokens_path, ids_path = write_templar(tmp_path, 0, ramp(64), 16)
    ids_path.unlink()
    assert "sample_ids_000000.bin does not exist" in str(_error(tokens_path))


def test_missing_file(tmp_path):
    assert "does not exist" in str(_error(tmp_path / "nope.bin"))


# --- token ids against the vocabulary --------------------------------------------------


def test_token_id_at_or_above_vocab_is_found_in_the_sample(tmp_path):
    tokens = ramp(3_000_000, modulo=1000)
    tokens[-5] = 50257  # in the last sampled block, far beyond the first
    path = write_llmc(tmp_path / "a_000000.bin", tokens)
    shard = open_token_file(path)
    with pytest.raises(ShardFormatError) as info:
        check_token_ids(shard.tokens, 50257, path=path)
    assert f"token id 50257 at token position {3_000_000 - 5} is >= the model's vocabulary" in str(
        info.value
    )
    check_token_ids(shard.tokens, 50258, path=path)  # fits a bigger vocabulary
    assert sampled_max_token_id(shard.tokens) == 50257 == max_token_id(shard.tokens)


def test_recorded_max_token_id_checks(tmp_path):
    tokens = ramp(1000, modulo=300)
    path = write_llmc(tmp_path / "a_000000.bin", tokens)
    shard = open_token_file(path)
    with pytest.raises(ShardFormatError, match="manifest records max token id 299, which is >="):
        check_token_ids(shard.tokens, 299, path=path, recorded_max=299)
    with pytest.raises(ShardFormatError, match="exceeds the max token id 100 recorded"):
        check_token_ids(shard.tokens, 50257, path=path, recorded_max=100)
    check_token_ids(shard.tokens, 300, path=path, recorded_max=299)
