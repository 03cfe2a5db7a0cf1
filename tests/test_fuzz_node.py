"""Property-based fuzzing of every parser of another node's (or a lead's, or a swappable
file's) bytes in the node layer: only typed errors come out, memory stays bounded.

The budget is the profile's (tests/conftest.py): CI runs a fixed, derandomized sample."""

from __future__ import annotations

import json
import struct
import tracemalloc

import torch
from hypothesis import given
from hypothesis import strategies as st

from tplr.errors import ConfigError
from tplr.node.network.checkpoints import GlobalCheckpointError, parse_pointer
from tplr.node.network.peers import PeersFileError, parse_announcement, parse_peer_list, parse_peers
from tplr.node.network.reports import ReportError, parse_report
from tplr.protocol.approval import ApprovalInvalid, parse_approval
from tplr.protocol.commitments import CommitmentInvalid, commit_to, parse_commitment
from tplr.protocol.payload import (
    PayloadExpectation,
    PayloadMeta,
    PayloadRejected,
    PayloadSchema,
    decode_payload,
    encode_payload,
)
from tplr.protocol.run_spec import RunSpec, RunSpecError
from tplr.train.compression import CompressionSettings, ErrorFeedbackCompressor

SETTINGS = CompressionSettings(chunk_size=16, topk=4)
SHAPES = {"w": (8, 16), "b": (16,)}
SCHEMA = PayloadSchema.for_model(SHAPES, SETTINGS)
EXPECT = PayloadExpectation("run", 3, 1, "base", None)


def valid_payload() -> bytes:
    generator = torch.Generator().manual_seed(0)
    deltas = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    parts = ErrorFeedbackCompressor(SETTINGS).compress(deltas)
    return encode_payload(PayloadMeta("run", 3, 1, "base", "d", 8), parts)


VALID = valid_payload()
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.binary(max_size=600))
def test_payload_from_random_bytes(data):
    try:
        decode_payload(data, SCHEMA, EXPECT)
    except PayloadRejected:
        pass


@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=8))
def test_payload_with_flipped_bytes(flips):
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    try:
        decode_payload(bytes(data), SCHEMA, EXPECT)
    except PayloadRejected:
        pass


@given(json_values)
def test_payload_header_of_any_json(header):
    encoded = json.dumps(header).encode()
    try:
        decode_payload(struct.pack("<Q", len(encoded)) + encoded, SCHEMA, EXPECT)
    except PayloadRejected:
        pass


def test_a_header_bomb_allocates_nothing_large():
    bombs = [
        struct.pack("<Q", 2**63) + b"{}",  # a header length far past the data
        struct.pack("<Q", 60_000) + b"[" * 30_000 + b"]" * 30_000,  # deep, under the limit
    ]
    tracemalloc.start()
    try:
        for bomb in bombs:
            try:
                decode_payload(bomb, SCHEMA, EXPECT)
            except PayloadRejected:
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, peak


COMMITMENT = json.loads(commit_to(b"x", run_id="run", window=3, uid=1).to_json())


@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_commitment_from_anything(data):
    try:
        parse_commitment(data, run_id="run", window=3, uid=1)
    except CommitmentInvalid:
        pass


@given(st.dictionaries(st.sampled_from(sorted(COMMITMENT)), json_values, max_size=3))
def test_commitment_with_changed_fields(changes):
    try:
        parse_commitment(
            json.dumps({**COMMITMENT, **changes}).encode(), run_id="run", window=3, uid=1
        )
    except CommitmentInvalid:
        pass


@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_approval_from_anything(data):
    try:
        parse_approval(data, run_id="run", window=3, source="approvals/3.json")
    except ApprovalInvalid:
        pass


SPEC = json.loads(
    RunSpec(
        run_id="r",
        genesis_s=1e9,
        window_seconds=60,
        inner_steps=2,
        inner_lr=1e-3,
        outer_lr=1.0,
        micro_batch_size=2,
        batch_size=4,
        sequence_length=16,
        model="tiny",
        windows_per_shard=2,
        seed=1,
    ).to_json()
)


@given(st.dictionaries(st.sampled_from(sorted(SPEC)), json_values, max_size=4))
def test_run_spec_with_changed_fields(changes):
    try:
        RunSpec.from_json(json.dumps({**SPEC, **changes}).encode())
    except RunSpecError:
        pass


@given(st.binary(max_size=300))
def test_run_spec_from_random_bytes(data):
    try:
        RunSpec.from_json(data)
    except RunSpecError:
        pass


@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_reports_peer_lists_announcements_and_pointers(data):
    for parse, errors in (
        (parse_report, ReportError),
        (parse_peer_list, ConfigError),
        (parse_announcement, ConfigError),
        (parse_pointer, GlobalCheckpointError),
    ):
        try:
            parse(data, source="fuzz")
        except errors:
            pass


@given(st.text(max_size=300) | json_values.map(json.dumps))
def test_peers_file_of_any_text(text):
    try:
        parse_peers(text, path="peers.yaml")
    except PeersFileError:
        pass
