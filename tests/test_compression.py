from __future__ import annotations

import math

import pytest
import torch

from tplr.errors import ConfigError
from tplr.train.compression import (
    CompressionError,
    CompressionSettings,
    ErrorFeedbackCompressor,
    compress_tensor,
    decompress_all,
    decompress_tensor,
    index_dtype_for,
)

SHAPES = {"wte": (50, 24), "h.0.attn": (24, 72), "h.0.bias": (7,), "ln.w": (3, 5, 11)}


def random_deltas(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * scale for name, shape in SHAPES.items()}


def test_index_dtype_is_the_smallest_that_fits():
    assert index_dtype_for(1) == torch.uint8
    assert index_dtype_for(256) == torch.uint8
    assert index_dtype_for(257) == torch.int16
    assert index_dtype_for(32768) == torch.int16
    assert index_dtype_for(32769) == torch.int32
    assert CompressionSettings(chunk_size=4096, topk=32).index_dtype == torch.int16


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"chunk_size": 0, "topk": 1}, "chunk_size"),
        ({"chunk_size": 64, "topk": 65}, "topk"),
        ({"chunk_size": 64, "topk": 0}, "topk"),
        ({"chunk_size": 64, "topk": 8, "error_feedback_beta": 1.5}, "error_feedback_beta"),
        ({"chunk_size": 64, "topk": 8, "value_dtype": torch.float32}, "value dtype"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        CompressionSettings(**kwargs)


@pytest.mark.parametrize("chunk_size", [16, 64, 300])
def test_round_trip_is_exact_when_k_equals_chunk(chunk_size):
    settings = CompressionSettings(chunk_size=chunk_size, topk=chunk_size)
    for name, delta in random_deltas(1).items():
        # bf16-representable values round-trip bit for bit
        representable = delta.to(torch.bfloat16).to(torch.float32)
        compressed = compress_tensor(representable, settings)
        assert compressed.indices.dtype == settings.index_dtype
        assert compressed.values.dtype == torch.bfloat16
        restored = decompress_tensor(compressed, chunk_size)
        assert restored.shape == delta.shape, name
        assert torch.equal(restored, representable), name


def test_topk_keeps_the_largest_magnitudes_of_each_chunk():
    settings = CompressionSettings(chunk_size=4, topk=2)
    tensor = torch.tensor([1.0, -5.0, 3.0, 0.5, 0.0, 0.25, -0.125, 2.0, 9.0])
    restored = decompress_tensor(compress_tensor(tensor, settings), 4)
    # chunk 0 keeps -5 and 3, chunk 1 keeps 2 and 0.25, chunk 2 (padded) keeps 9
    expected = torch.tensor([0.0, -5.0, 3.0, 0.0, 0.0, 0.25, 0.0, 2.0, 9.0])
    assert torch.equal(restored, expected)


def test_round_trip_on_random_tensors_keeps_only_the_top_k():
    settings = CompressionSettings(chunk_size=64, topk=8)
    for delta in random_deltas(2).values():
        restored = decompress_tensor(compress_tensor(delta, settings), 64)
        kept = restored != 0
        flat_kept = kept.reshape(-1)
        n_chunks = settings.chunk_count(delta.numel())
        assert int(flat_kept.sum()) <= n_chunks * 8
        # every kept entry is the bf16 rounding of the original
        assert torch.equal(restored[kept], delta[kept].to(torch.bfloat16).float())
        # within each full chunk, the smallest kept magnitude >= the largest dropped one
        full = delta.numel() // 64 * 64
        if full:
            magnitude = delta.reshape(-1)[:full].abs().view(-1, 64)
            chunk_kept = flat_kept[:full].view(-1, 64)
            smallest_kept = torch.where(chunk_kept, magnitude, torch.inf).min(dim=1).values
            largest_dropped = torch.where(chunk_kept, -torch.inf, magnitude).max(dim=1).values
            assert torch.all(smallest_kept >= largest_dropped)


@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16])
def test_error_feedback_conserves_the_unsent_mass_exactly(value_dtype):
    settings = CompressionSettings(
        chunk_size=32, topk=3, error_feedback_beta=0.9, value_dtype=value_dtype
    )
    compressor = ErrorFeedbackCompressor(settings)
    for window in range(4):
        deltas = random_deltas(10 + window, scale=0.01)
        before = {name: compressor.error_of(name).clone() for name in SHAPES} if window else {}
        sent = compressor.compress(deltas)
        dense_sent = decompress_all(sent, settings.chunk_size)
        for name, delta in deltas.items():
            old = before.get(name, torch.zeros(SHAPES[name]))
            expected = settings.error_feedback_beta * old + delta
            assert torch.equal(compressor.error_of(name) + dense_sent[name], expected), name
            assert sent[name].values.dtype == value_dtype


def test_error_feedback_eventually_sends_small_entries():
    settings = CompressionSettings(chunk_size=8, topk=1, error_feedback_beta=1.0)
    compressor = ErrorFeedbackCompressor(settings)
    delta = {"w": torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])}
    sent_positions = set()
    for _ in range(8):
        (compressed,) = compressor.compress(delta).values()
        sent_positions.add(int(compressed.indices[0, 0]))
    assert len(sent_positions) > 1  # accumulated error let the 0.5 entries through


def test_state_dict_round_trip_and_shape_change_refused():
    settings = CompressionSettings(chunk_size=16, topk=2)
    compressor = ErrorFeedbackCompressor(settings)
    compressor.compress(random_deltas(3))
    state = compressor.state_dict()
    restored = ErrorFeedbackCompressor(settings)
    restored.load_state_dict(state)
    nxt = random_deltas(4)
    a, b = compressor.compress(nxt), restored.compress(nxt)
    for name in SHAPES:
        assert torch.equal(a[name].values, b[name].values)
        assert torch.equal(a[name].indices, b[name].indices)
    with pytest.raises(CompressionError, match="changed shape") as info:
        compressor.compress({"wte": torch.zeros(2, 2)})
    assert info.value.hint


def test_non_finite_delta_is_refused_naming_the_parameter():
    compressor = ErrorFeedbackCompressor(CompressionSettings(chunk_size=16, topk=2))
    delta = random_deltas(5)
    delta["h.0.bias"][3] = float("nan")
    with pytest.raises(CompressionError, match=r"h\.0\.bias"):
        compressor.compress(delta)


def test_compressed_size_matches_the_tensors():
    settings = CompressionSettings(chunk_size=64, topk=8)
    for delta in random_deltas(6).values():
        compressed = compress_tensor(delta, settings)
        assert tuple(compressed.indices.shape) == settings.compressed_shape(delta.shape)
        nbytes = compressed.indices.nbytes + compressed.values.nbytes
        assert nbytes == settings.compressed_bytes(delta.shape)


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_chunk_shares_of_several_ranks_join_to_one_compressor(world_size):
    """Each rank owns a range of every parameter's chunks: its top-k rows and error rows,
    joined in rank order, are bit-identical to one compressor doing everything."""
    settings = CompressionSettings(chunk_size=16, topk=3, error_feedback_beta=0.9)
    whole = ErrorFeedbackCompressor(settings)
    shares = [
        ErrorFeedbackCompressor(settings, rank=r, world_size=world_size) for r in range(world_size)
    ]
    for window in range(3):
        deltas = random_deltas(20 + window, scale=0.01)
        expected = whole.compress(deltas)
        parts = [share.compress(deltas) for share in shares]
        for name, sent in expected.items():
            joined_indices = torch.cat([part[name].indices for part in parts])
            joined_values = torch.cat([part[name].values for part in parts])
            assert torch.equal(joined_indices, sent.indices), name
            assert torch.equal(joined_values, sent.values), name
    for name in SHAPES:
        rows = torch.cat([share.owned_rows()[name][0] for share in shares])
        numel = math.prod(SHAPES[name])
        assert torch.equal(rows.view(-1)[:numel].view(SHAPES[name]), whole.error_of(name))


def test_a_non_finite_delta_leaves_the_error_clean():
    """Regression: the error buffer took β·e + Δ before the NaN was found, so every later
    window failed too."""
    compressor = ErrorFeedbackCompressor(CompressionSettings(chunk_size=16, topk=2))
    good = random_deltas(1)
    compressor.compress(good)
    before = compressor.state_dict()
    bad = {k: v.clone() for k, v in good.items()}
    bad["h.0.bias"][0] = float("inf")
    with pytest.raises(CompressionError):
        compressor.compress(bad)
    after = compressor.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)
    compressor.compress(good)  # the next window works


def test_offloaded_errors_give_the_same_payload_and_are_pinned_on_cuda_only():
    """Offloading is a device decision: on CUDA the buffers live in pinned host memory
    between windows; on a CPU there is nothing to offload to, and nothing is pinned."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = CompressionSettings(chunk_size=64, topk=4)
    resident, offloaded = (
        ErrorFeedbackCompressor(settings),
        ErrorFeedbackCompressor(settings, offload=True),
    )
    for window in range(3):
        deltas = {k: v.to(device) for k, v in random_deltas(30 + window).items()}
        a, b = resident.compress(deltas), offloaded.compress(deltas)
        for name in deltas:
            assert torch.equal(a[name].indices.cpu(), b[name].indices.cpu())
            assert torch.equal(a[name].values.cpu(), b[name].values.cpu())
    for rows, _, _ in offloaded.owned_rows().values():
        assert rows.device.type == "cpu" and rows.is_pinned() == (device == "cuda")


def test_sparse_norm_equals_the_norm_of_the_decompressed_delta():
    """The validator's norm (reference and weights) comes from the sparse values; padding
    entries past a tensor's end, which decompression drops, do not count."""
    from tplr.protocol.aggregation import total_norm
    from tplr.train.compression import CompressedTensor, sparse_norm

    settings = CompressionSettings(chunk_size=64, topk=8)
    generator = torch.Generator().manual_seed(3)
    deltas = {
        "w": torch.randn(10, 13, generator=generator),
        "b": torch.randn(7, generator=generator),
    }
    parts = ErrorFeedbackCompressor(settings).compress(deltas)
    dense = decompress_all(parts, settings.chunk_size)
    assert sparse_norm(parts, settings.chunk_size) == pytest.approx(total_norm(dense), rel=1e-12)
    # a hostile payload puts a large value at a padding position of the last chunk
    part = parts["b"]
    values = part.values.clone()
    indices = part.indices.clone()
    indices[0, 0], values[0, 0] = 60, 1e3  # "b" has 7 entries: index 60 is padding
    hostile = {**parts, "b": CompressedTensor(indices, values, part.shape)}
    expected = total_norm(decompress_all(hostile, settings.chunk_size))
    assert sparse_norm(hostile, settings.chunk_size) == pytest.approx(expected, rel=1e-6)
