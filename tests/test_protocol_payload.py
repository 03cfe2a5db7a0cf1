from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import pickle
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_save

from tplr.data.sampler import sample_ids_digest
from tplr.protocol.payload import (
    INDEX_SUFFIX,
    VALUES_SUFFIX,
    PayloadExpectation,
    PayloadMeta,
    PayloadRejected,
    PayloadSchema,
    RejectReason,
    check_payload_size,
    decode_payload,
    encode_payload,
    sample_digest,
)
from tplr.train.compression import (
    CompressedTensor,
    CompressionSettings,
    ErrorFeedbackCompressor,
    decompress_all,
)

SHAPES = {"wte.weight": (40, 16), "h.0.mlp.weight": (16, 64), "ln_f.weight": (16,)}
SETTINGS = CompressionSettings(chunk_size=64, topk=4)
SCHEMA = PayloadSchema.for_model(SHAPES, SETTINGS)
DIGEST = sample_digest([10, 11, 12, 99])
BASE = "xxh3_128:" + "ab" * 16
META = PayloadMeta(
    run_id="run-a", window=12, uid=3, base_digest=BASE, sample_digest=DIGEST, sample_count=4
)
EXPECT = PayloadExpectation(
    run_id="run-a", window=12, uid=3, base_digest=BASE, sample_digest=DIGEST
)


def compressed_for(shapes=SHAPES, settings=SETTINGS, seed=0) -> dict[str, CompressedTensor]:
    generator = torch.Generator().manual_seed(seed)
    deltas = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    return ErrorFeedbackCompressor(settings).compress(deltas)


def raw_tensors(compressed: dict[str, CompressedTensor]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, part in compressed.items():
        tensors[name + INDEX_SUFFIX] = part.indices.clone()
        tensors[name + VALUES_SUFFIX] = part.values.clone()
    return tensors


def reject_reason(data: bytes, expect: PayloadExpectation = EXPECT, **kwargs) -> RejectReason:
    with pytest.raises(PayloadRejected) as info:
        decode_payload(data, SCHEMA, expect, **kwargs)
    assert info.value.hint
    assert info.value.reason.value in str(info.value)
    return info.value.reason


def test_valid_payload_round_trips():
    compressed = compressed_for()
    data = encode_payload(META, compressed)
    assert len(data) <= SCHEMA.max_bytes
    payload = decode_payload(data, SCHEMA, EXPECT)
    assert payload.meta == META
    restored = decompress_all(payload.tensors, SETTINGS.chunk_size)
    for name, dense in decompress_all(compressed, SETTINGS.chunk_size).items():
        assert torch.equal(restored[name], dense)
        assert restored[name].shape == SHAPES[name]
    # a gatherer that does not know the digest (a miner) skips that check
    assert decode_payload(data, SCHEMA, PayloadExpectation("run-a", 12, 3)).meta.uid == 3


def test_real_pickle_renamed_is_rejected_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    buffer = io.BytesIO()
    torch.save({"wte.weight.idx": torch.zeros(3), "trap": Trap()}, buffer)
    renamed = tmp_path / "3.safetensors"
    renamed.write_bytes(buffer.getvalue())
    assert reject_reason(renamed.read_bytes()) is RejectReason.NOT_SAFETENSORS
    assert reject_reason(pickle.dumps(Trap(), protocol=2)) is RejectReason.NOT_SAFETENSORS
    assert not marker.exists()
    assert reject_reason(b"") is RejectReason.NOT_SAFETENSORS
    assert reject_reason(b"\x04\x00\x00\x00\x00\x00\x00\x00[1] ") is RejectReason.NOT_SAFETENSORS


def test_truncated_tensor_data_is_rejected():
    data = encode_payload(META, compressed_for())
    assert reject_reason(data[:-10]) is RejectReason.NOT_SAFETENSORS


def test_oversized_payload_is_rejected_before_parsing():
    data = encode_payload(META, compressed_for())
    assert reject_reason(data + b" " * (SCHEMA.max_bytes - len(data) + 1)) is RejectReason.TOO_LARGE
    with pytest.raises(PayloadRejected, match="too_large"):
        check_payload_size(SCHEMA.max_bytes + 1, SCHEMA)
    check_payload_size(SCHEMA.max_bytes, SCHEMA)


def test_wrong_shapes_and_dtypes_are_rejected():
    other_shapes = {**SHAPES, "wte.weight": (80, 16)}
    assert reject_reason(encode_payload(META, compressed_for(other_shapes))) is (
        RejectReason.BAD_SHAPE
    )
    wider = CompressionSettings(chunk_size=64, topk=8)
    assert reject_reason(encode_payload(META, compressed_for(settings=wider))) is (
        RejectReason.BAD_SHAPE
    )
    tensors = raw_tensors(compressed_for())
    tensors["ln_f.weight.val"] = tensors["ln_f.weight.val"].float()
    data = safetensors_save(tensors, metadata=META.to_metadata())
    assert reject_reason(data) is RejectReason.BAD_DTYPE
    tensors = raw_tensors(compressed_for())
    tensors["ln_f.weight.idx"] = tensors["ln_f.weight.idx"].to(torch.int32)
    data = safetensors_save(tensors, metadata=META.to_metadata())
    assert reject_reason(data) is RejectReason.BAD_DTYPE


def test_missing_and_extra_keys_are_rejected():
    tensors = raw_tensors(compressed_for())
    del tensors["h.0.mlp.weight.val"]
    assert reject_reason(safetensors_save(tensors, metadata=META.to_metadata())) is (
        RejectReason.MISSING_KEYS
    )
    tensors = raw_tensors(compressed_for())
    tensors["sneaky"] = torch.zeros(1)
    assert reject_reason(safetensors_save(tensors, metadata=META.to_metadata())) is (
        RejectReason.EXTRA_KEYS
    )


def test_nan_values_are_rejected():
    tensors = raw_tensors(compressed_for())
    tensors["h.0.mlp.weight.val"][2, 1] = float("nan")
    assert reject_reason(safetensors_save(tensors, metadata=META.to_metadata())) is (
        RejectReason.NON_FINITE
    )
    tensors = raw_tensors(compressed_for())
    tensors["ln_f.weight.val"][0, 0] = float("-inf")
    assert reject_reason(safetensors_save(tensors, metadata=META.to_metadata())) is (
        RejectReason.NON_FINITE
    )


def test_out_of_range_and_duplicate_indices_are_rejected():
    tensors = raw_tensors(compressed_for())
    tensors["wte.weight.idx"][1, 0] = 64  # chunk_size is 64: valid indices are 0..63
    assert reject_reason(safetensors_save(tensors, metadata=META.to_metadata())) is (
        RejectReason.INDEX_OUT_OF_RANGE
    )
    tensors = raw_tensors(compressed_for())
    row = tensors["wte.weight.idx"][0]
    row[1] = row[0]
    assert reject_reason(safetensors_save(tensors, metadata=META.to_metadata())) is (
        RejectReason.DUPLICATE_INDEX
    )
    # signed index types (chunk > 256) must not go negative
    settings = CompressionSettings(chunk_size=1024, topk=4)
    schema = PayloadSchema.for_model({"w": (2048,)}, settings)
    tensors = raw_tensors(compressed_for({"w": (2048,)}, settings))
    assert tensors["w.idx"].dtype == torch.int16
    tensors["w.idx"][0, 0] = -5
    with pytest.raises(PayloadRejected) as info:
        decode_payload(safetensors_save(tensors, metadata=META.to_metadata()), schema, EXPECT)
    assert info.value.reason is RejectReason.INDEX_OUT_OF_RANGE


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"run_id": "run-b"}, RejectReason.WRONG_RUN),
        ({"window": 11}, RejectReason.WRONG_WINDOW),
        ({"uid": 4}, RejectReason.WRONG_UID),
        ({"base_digest": "xxh3_128:" + "cd" * 16}, RejectReason.WRONG_BASE),
        ({"sample_digest": sample_digest([10, 11, 12, 98])}, RejectReason.DIGEST_MISMATCH),
    ],
)
def test_identity_mismatches_are_rejected(change, reason):
    data = encode_payload(dataclasses.replace(META, **change), compressed_for())
    assert reject_reason(data) is reason


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        {**META.to_metadata(), "format": "something-else"},
        {**META.to_metadata(), "window": "-3"},
        {k: v for k, v in META.to_metadata().items() if k != "sample_digest"},
    ],
)
def test_bad_metadata_is_rejected(metadata):
    data = safetensors_save(raw_tensors(compressed_for()), metadata=metadata)
    assert reject_reason(data) is RejectReason.BAD_METADATA


@pytest.mark.parametrize("window", ["²", "١٢", "12 ", "+12", "1" * 30, ""])
def test_non_ascii_or_huge_numbers_are_bad_metadata(window):
    """Issue 10, item 1: ``"²".isdigit()`` is True and ``int("²")`` raises ValueError: one such
    payload used to stop every node that gathered it."""
    data = safetensors_save(
        raw_tensors(compressed_for()), metadata={**META.to_metadata(), "window": window}
    )
    assert reject_reason(data) is RejectReason.BAD_METADATA


def deep_header_payload(depth: int) -> bytes:
    header = json.dumps({"__metadata__": META.to_metadata()})[:-1]
    header += ', "x": ' + "[" * depth + "]" * depth + "}"
    encoded = header.encode()
    return struct.pack("<Q", len(encoded)) + encoded


def test_a_deeply_nested_header_is_rejected_not_a_recursion_error():
    """Issue 10, item 1: a header of thousands of nested ``[`` raised RecursionError."""
    assert reject_reason(deep_header_payload(5000)) is RejectReason.NOT_SAFETENSORS
    assert reject_reason(deep_header_payload(3)) is RejectReason.NOT_SAFETENSORS


def test_a_v1_payload_names_the_protocol_version():
    metadata = {**META.to_metadata(), "version": "1"}
    data = safetensors_save(raw_tensors(compressed_for()), metadata=metadata)
    with pytest.raises(PayloadRejected, match="upgrade") as info:
        decode_payload(data, SCHEMA, EXPECT)
    assert info.value.reason is RejectReason.PROTOCOL_VERSION


def test_an_all_zero_update_is_rejected():
    tensors = raw_tensors(compressed_for())
    for name in list(tensors):
        if name.endswith(VALUES_SUFFIX):
            tensors[name].zero_()
    assert reject_reason(safetensors_save(tensors, metadata=META.to_metadata())) is (
        RejectReason.ZERO_UPDATE
    )


def test_sample_digest_depends_on_ids_and_order():
    assert sample_digest([1, 2, 3]) == sample_digest(np.array([1, 2, 3], dtype=np.int64))
    assert sample_digest([1, 2, 3]) != sample_digest([3, 2, 1])
    assert sample_digest([1, 2, 3]) != sample_digest([1, 2])
    assert sample_digest(iter([5])) == "blake2b:" + sample_ids_digest(np.array([5]))


def test_reason_labels_are_low_cardinality_strings():
    assert len({reason.value for reason in RejectReason}) == len(RejectReason) <= 40
    assert all(reason.value.islower() and " " not in reason.value for reason in RejectReason)
