"""SharedShardedDataset and the batch loader, checked against a slow reference loop."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from test_data_helpers import LLAMA3_MAGIC, LLAMA3_VERSION, ramp, write_llmc, write_templar

from tplr.data.dataset import SampleIndexError, SharedShardedDataset
from tplr.data.formats import ShardFormatError
from tplr.data.loader import (
    BatchAssembler,
    BatchLoader,
    HostBatch,
    LoaderConfig,
    StaleBatchError,
)
from tplr.data.sampler import window_sample_indices
from tplr.data.validate import TokenIdOutOfRange


@pytest.fixture
def llmc_dataset(tmp_path) -> SharedShardedDataset:
    path = write_llmc(tmp_path / "edu_fineweb_train_000005.bin", ramp(10_000))
    return SharedShardedDataset.open(path, seq_len=32, vocab_size=50257)


@pytest.fixture
def templar_dataset(tmp_path) -> SharedShardedDataset:
    tokens = ramp(300 * 16, modulo=70_000)  # ids above 65535: uint32 shard
    ids = np.arange(300, dtype=np.uint64) * 3 + 11
    tokens_path, _ = write_templar(tmp_path, 2, tokens, 16, dtype="<u4", ids=ids)
    return SharedShardedDataset.open(tokens_path, seq_len=16)


def reference_batch(tokens: np.ndarray, row_len: int, indices) -> tuple[torch.Tensor, ...]:
    """The obvious per-sample loop, from the raw token array."""
    inputs = torch.zeros(len(indices), row_len - 1, dtype=torch.int64)
    targets = torch.zeros(len(indices), row_len - 1, dtype=torch.int64)
    for i, index in enumerate(indices):
        row = [int(t) for t in tokens[index * row_len : (index + 1) * row_len]]
        inputs[i] = torch.tensor(row[:-1])
        targets[i] = torch.tensor(row[1:])
    return inputs, targets


# --- the dataset ---------------------------------------------------------------------


def test_llmc_stream_rows_are_windows_of_seq_len_plus_one(llmc_dataset):
    ds = llmc_dataset
    tokens = ramp(10_000)
    assert ds.row_len == 33 and ds.context_len == 32
    assert len(ds) == 10_000 // 33  # the tail shorter than a window is unused
    np.testing.assert_array_equal(ds[2], tokens[66:99])
    np.testing.assert_array_equal(ds[len(ds) - 1], tokens[(len(ds) - 1) * 33 : len(ds) * 33])
    assert np.shares_memory(ds[2], ds.shard.tokens)  # a view, not a copy
    assert ds.sample_id(2) == (5 << 40) | 66  # shard number from the name, token offset
    np.testing.assert_array_equal(
        ds.sample_ids(np.array([0, 3])), np.array([5 << 40, (5 << 40) | 99], dtype=np.uint64)
    )


def test_templar_rows_are_stored_sequences_with_stored_ids(templar_dataset):
    ds = templar_dataset
    assert ds.row_len == 16 and ds.context_len == 15 and len(ds) == 300
    np.testing.assert_array_equal(ds[4], ramp(300 * 16, modulo=70_000)[64:80])
    assert ds.sample_id(4) == 4 * 3 + 11
    assert ds.token_dtype == np.dtype("<u4")


def test_dataset_errors(tmp_path, templar_dataset):
    with pytest.raises(SampleIndexError, match=r"sample 300 is outside 0\.\.299"):
        templar_dataset[300]
    with pytest.raises(SampleIndexError, match="sample index -1 is outside"):
        templar_dataset.sample_ids(np.array([0, -1]))
    with pytest.raises(ShardFormatError, match=r"stores sequences of 16 tokens \(4800 tokens"):
        SharedShardedDataset.open(templar_dataset.shard.path, seq_len=32)
    short = write_llmc(tmp_path / "s_000000.bin", ramp(10))
    with pytest.raises(ShardFormatError, match="fewer than one sample of 33"):
        SharedShardedDataset.open(short, seq_len=32)
    nameless = write_llmc(tmp_path / "tokens.bin", ramp(100))
    with pytest.raises(ShardFormatError, match="no shard number"):
        SharedShardedDataset.open(nameless, seq_len=8)
    assert len(SharedShardedDataset.open(nameless, seq_len=8, shard_index=0)) == 11


def test_vocab_check_at_open(tmp_path):
    tokens = ramp(1000)
    tokens[500] = 60000
    path = write_llmc(tmp_path / "a_000000.bin", tokens)
    with pytest.raises(ShardFormatError, match="token id 60000 at token position 500"):
        SharedShardedDataset.open(path, seq_len=8, vocab_size=50257)


# --- batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1, 3])
@pytest.mark.parametrize("prefetch", [1, 4])
def test_int64_batches_equal_the_reference_bit_for_bit(llmc_dataset, workers, prefetch):
    ds = llmc_dataset
    indices = window_sample_indices(
        run_seed=1, uid=3, window=9, shard_index=5, num_samples=len(ds), count=150
    )
    config = LoaderConfig(batch_size=32, prefetch_batches=prefetch, workers=workers)
    with BatchLoader(ds, indices, config=config) as loader:
        batches = list(loader)
    assert len(batches) == len(loader) == 5  # 4 full batches and one of 22
    for number, batch in enumerate(batches):
        expected = indices[number * 32 : (number + 1) * 32]
        ref_inputs, ref_targets = reference_batch(ramp(10_000), 33, expected)
        inputs, targets = batch
        assert inputs.dtype == torch.int64 and inputs.is_contiguous()
        assert targets.is_contiguous() and inputs.shape == (len(expected), 32)
        assert torch.equal(inputs, ref_inputs) and torch.equal(targets, ref_targets)
        np.testing.assert_array_equal(batch.indices, expected)


def test_host_format_rows_and_their_upcast(templar_dataset):
    ds = templar_dataset
    indices = np.array([299, 0, 17, 17, 150, 3, 42])
    tokens = ramp(300 * 16, modulo=70_000)
    config = LoaderConfig(batch_size=4, prefetch_batches=2, output="host")
    with BatchLoader(ds, indices, config=config) as loader:
        for number, batch in enumerate(loader):
            assert isinstance(batch, HostBatch)
            expected = indices[number * 4 : (number + 1) * 4]
            assert batch.rows.dtype == torch.int32  # uint32 shard, read as int32
            assert batch.rows.shape == (len(expected), 16)
            ref_inputs, ref_targets = reference_batch(tokens, 16, expected)
            # as a tuple: (B, T) views of the rows, in the host dtype
            assert torch.equal(batch[0].to(torch.int64), ref_inputs)
            inputs, targets = batch.to_device("cpu")
            assert torch.equal(inputs, ref_inputs) and torch.equal(targets, ref_targets)
            assert inputs.is_contiguous() and inputs.dtype == torch.int64


def test_uint16_host_rows_keep_ids_above_32767(tmp_path):
    tokens = ramp(2000, modulo=50257, start=40000)  # ids above int16's range
    ds = SharedShardedDataset.open(write_llmc(tmp_path / "a_000000.bin", tokens), seq_len=15)
    assembler = BatchAssembler(ds, 8, pin_memory=False)
    buffer = assembler.new_host_buffer()
    assert buffer.dtype == torch.uint16
    rows = assembler.gather(np.arange(8), buffer)
    assert rows.data_ptr() == buffer.data_ptr()  # filled in place, no new buffer
    inputs, targets = HostBatch(rows, np.arange(8), _slot_of(buffer)).to_device("cpu")
    ref_inputs, ref_targets = reference_batch(tokens, 16, range(8))
    assert torch.equal(inputs, ref_inputs) and torch.equal(targets, ref_targets)
    assert int(inputs.max()) > 32767


def _slot_of(buffer):
    from tplr.data.loader import _Slot

    return _Slot(buffer, batch_number=0)


def test_batches_are_deterministic_given_the_indices(llmc_dataset):
    indices = window_sample_indices(
        run_seed=5, uid=1, window=2, shard_index=5, num_samples=len(llmc_dataset), count=96
    )

    def run(workers):
        config = LoaderConfig(batch_size=16, workers=workers, prefetch_batches=3)
        with BatchLoader(llmc_dataset, indices, config=config) as loader:
            return torch.cat([b.inputs for b in loader])

    assert torch.equal(run(1), run(2))


def test_llama3_shard_batches(tmp_path):
    tokens = ramp(4000, modulo=128256, start=100_000)
    path = write_llmc(
        tmp_path / "l_000000.bin", tokens, magic=LLAMA3_MAGIC, version=LLAMA3_VERSION, dtype="<u4"
    )
    ds = SharedShardedDataset.open(path, seq_len=63, vocab_size=128256)
    with BatchLoader(ds, np.array([5, 1]), config=LoaderConfig(batch_size=2)) as loader:
        (batch,) = list(loader)
    ref_inputs, ref_targets = reference_batch(tokens, 64, [5, 1])
    assert torch.equal(batch.inputs, ref_inputs) and torch.equal(batch.targets, ref_targets)


def test_bad_indices_fail_before_any_batch(llmc_dataset):
    with pytest.raises(SampleIndexError, match=f"sample index {len(llmc_dataset)} is outside"):
        BatchLoader(
            llmc_dataset, np.array([0, len(llmc_dataset)]), config=LoaderConfig(batch_size=1)
        )
    assembler = BatchAssembler(llmc_dataset, 2, pin_memory=False)
    with pytest.raises(SampleIndexError):
        assembler.gather(np.array([-1, 0]), assembler.new_host_buffer())


def test_close_early_stops_the_threads(llmc_dataset):
    config = LoaderConfig(batch_size=4, workers=2, prefetch_batches=4)
    loader = BatchLoader(llmc_dataset, np.arange(200), config=config)
    next(loader)
    loader.close()
    assert list(loader) == []
    alive = [t for t in threading.enumerate() if t.name.startswith("tplr-batches")]
    assert alive == []


def test_host_batches_feed_the_training_worker(templar_dataset):
    """The trainer's BatchFeed takes the loader's host batches as (inputs, targets) pairs;
    it reads ahead, so it holds up to depth + 2 batches: hold_batches says so."""
    from tplr.train.feed import BatchFeed, BatchSpec

    indices = np.arange(0, 32)
    spec = BatchSpec(vocab_size=70_000, max_seq_len=15, batch_size=8, seq_len=15)
    config = LoaderConfig(batch_size=8, output="host", prefetch_batches=1, hold_batches=4)
    with (
        BatchLoader(templar_dataset, indices, config=config) as loader,
        BatchFeed(iter(loader), 4, spec=spec, device=torch.device("cpu"), depth=2) as feed,
    ):
        time.sleep(0.3)  # let the feed read ahead as far as it can
        for number in range(4):
            inputs, targets = feed.next_batch()
            ref_inputs, ref_targets = reference_batch(
                ramp(300 * 16, modulo=70_000), 16, indices[number * 8 : (number + 1) * 8]
            )
            assert torch.equal(inputs, ref_inputs) and torch.equal(targets, ref_targets)


def test_a_host_batch_held_too_long_is_refused(templar_dataset):
    config = LoaderConfig(batch_size=2, output="host", prefetch_batches=1, hold_batches=1)
    with BatchLoader(templar_dataset, np.arange(12), config=config) as loader:
        first = next(loader)
        first.to_device("cpu")  # fine while it is the batch in use
        next(loader)
        next(loader)  # refills the first batch's buffer
        with pytest.raises(StaleBatchError, match="host batch 0 was used after its buffer"):
            first.to_device("cpu")
    config = config.model_copy(update={"hold_batches": 3})
    with BatchLoader(templar_dataset, np.arange(12), config=config) as loader:
        held = [next(loader) for _ in range(3)]
        for number, batch in enumerate(held):
            inputs, _ = batch.to_device("cpu")
            expected, _ = reference_batch(
                ramp(300 * 16, modulo=70_000), 16, range(number * 2, number * 2 + 2)
            )
            assert torch.equal(inputs, expected)


# --- token ids beyond the vocabulary, outside the blocks checked at open ----------------


def shard_with_one_bad_token(tmp_path, *, dtype: str, bad_id: int) -> tuple:
    """2M tokens: more than the 1M sampled at open, so position 100_003 (between the
    first and second sampled blocks) is never looked at when the shard is opened."""
    tokens = ramp(2_000_000, modulo=1000)
    tokens[100_003] = bad_id
    if dtype == "<u2":
        path = write_llmc(tmp_path / "edu_fineweb_train_000003.bin", tokens)
        seq_len, row_len = 15, 16  # llm.c windows of seq_len + 1
    else:
        path, _ = write_templar(tmp_path, 3, tokens, 16, dtype=dtype)
        seq_len, row_len = 16, 16
    return path, seq_len, 100_003 // row_len, 100_003 % row_len


@pytest.mark.parametrize("output", ["int64", "host"])
@pytest.mark.parametrize("dtype", ["<u2", "<u4"])
def test_a_batch_with_a_token_beyond_the_vocabulary_is_refused_naming_shard_and_row(
    tmp_path, output, dtype
):
    bad_id = 5000 if dtype == "<u2" else 3_000_000_000  # above int32's range for uint32
    path, seq_len, row, column = shard_with_one_bad_token(tmp_path, dtype=dtype, bad_id=bad_id)
    ds = SharedShardedDataset.open(path, seq_len=seq_len, vocab_size=1000)  # opens fine
    indices = np.array([7, row, 9])
    config = LoaderConfig(batch_size=3, output=output, workers=1)
    with (
        BatchLoader(ds, indices, config=config) as loader,
        pytest.raises(TokenIdOutOfRange) as info,
    ):
        next(loader)
    error = info.value
    assert isinstance(error, ShardFormatError) and error.path == str(path)
    assert f"sample {row} " in error.message and f"token {column} of the row" in error.message
    assert f"token id {bad_id}" in error.message and "vocabulary size 1000" in error.message
    # Batches without it are fine, and the check can be named off for benchmarks.
    with BatchLoader(ds, np.array([7, 9]), config=config) as loader:
        assert len(list(loader)) == 1
    unchecked = config.model_copy(update={"token_range_check": False})
    with BatchLoader(ds, indices, config=unchecked) as loader:
        assert len(list(loader)) == 1


def test_the_loader_vocabulary_overrides_the_datasets(tmp_path):
    path, seq_len, row, _ = shard_with_one_bad_token(tmp_path, dtype="<u2", bad_id=5000)
    ds = SharedShardedDataset.open(path, seq_len=seq_len)  # no vocabulary given at open
    with BatchLoader(ds, np.array([row]), config=LoaderConfig(batch_size=1)) as loader:
        assert len(list(loader)) == 1
    config = LoaderConfig(batch_size=1, vocab_size=1000)
    loader = BatchLoader(ds, np.array([row]), config=config)
    with loader, pytest.raises(TokenIdOutOfRange, match=f"sample {row} "):
        next(loader)
