"""Gradient payloads: ``gradients/{w}/{uid}.safetensors``, encoded and strictly validated.

A payload holds, per model parameter ``name``, two tensors ``{name}.idx`` (indices inside
each chunk, shape ``(n_chunks, k)``) and ``{name}.val`` (bf16/fp16 values, same shape),
plus string metadata in the safetensors header: format, version, run id, window, uid,
sample digest, sample count and code version. Safetensors only; nothing here ever
unpickles (no ``torch.load``).

Validation is ordered cheapest first (size, header, metadata, key set, dtypes and
shapes from the header alone, then the tensor data) and raises :class:`PayloadRejected`
with a low-cardinality :class:`RejectReason` suitable as a metric label. Decoding a large
payload is CPU work: from the event loop use :func:`decode_payload_async`.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from tplr import __version__
from tplr.data.sampler import sample_ids_digest
from tplr.errors import TplrError
from tplr.node.clock import WindowClock
from tplr.train.compression import CompressedTensor, CompressionSettings

PAYLOAD_FORMAT = "tplr-gradient"
PAYLOAD_VERSION = "1"
INDEX_SUFFIX = ".idx"
VALUES_SUFFIX = ".val"
HEADER_ALLOWANCE_BYTES = 64 * 1024
"""Room for the JSON header beyond the tensor bytes when sizing the limit."""
_HEADER_BYTES_PER_TENSOR = 256
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_SAFETENSORS_DTYPES = {
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
}


class RejectReason(StrEnum):
    """Why a payload was refused; the values are stable metric labels."""

    NOT_SAFETENSORS = "not_safetensors"
    TOO_LARGE = "too_large"
    BAD_METADATA = "bad_metadata"
    MISSING_KEYS = "missing_keys"
    EXTRA_KEYS = "extra_keys"
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    INDEX_OUT_OF_RANGE = "index_out_of_range"
    DUPLICATE_INDEX = "duplicate_index"
    NON_FINITE = "non_finite"
    WRONG_RUN = "wrong_run"
    WRONG_WINDOW = "wrong_window"
    WRONG_UID = "wrong_uid"
    DIGEST_MISMATCH = "digest_mismatch"
    OUTSIDE_WINDOW = "outside_window"


class PayloadRejected(TplrError):
    """A peer's payload failed validation. ``reason`` is a :class:`RejectReason`."""

    hint = "the peer's payload is skipped for this window and scores 0"

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"payload rejected ({reason.value}): {message}")
        self.reason = reason


def payload_key(window: int, uid: int) -> str:
    return f"gradients/{window}/{uid}.safetensors"


def sample_digest(sample_ids: Iterable[int] | np.ndarray) -> str:
    """Digest of the ordered sample ids a miner trained on: the sampler's receipt digest
    (blake2b-256 of the ids as little-endian uint64), so miners and validators agree."""
    if not isinstance(sample_ids, np.ndarray):
        sample_ids = np.fromiter(sample_ids, dtype=np.uint64)
    return "blake2b:" + sample_ids_digest(sample_ids)


@dataclass(frozen=True, slots=True)
class PayloadMeta:
    run_id: str
    window: int
    uid: int
    sample_digest: str
    sample_count: int
    code_version: str = __version__

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": PAYLOAD_FORMAT,
            "version": PAYLOAD_VERSION,
            "run_id": self.run_id,
            "window": str(self.window),
            "uid": str(self.uid),
            "sample_digest": self.sample_digest,
            "sample_count": str(self.sample_count),
            "code_version": self.code_version,
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> PayloadMeta:
        def field(name: str) -> str:
            value = metadata.get(name)
            if not isinstance(value, str):
                raise PayloadRejected(RejectReason.BAD_METADATA, f"metadata field {name!r} missing")
            return value

        def number(name: str) -> int:
            value = field(name)
            if not value.isdigit() or len(value) > 18:
                raise PayloadRejected(
                    RejectReason.BAD_METADATA, f"metadata {name}={value[:40]!r} is not a count"
                )
            return int(value)

        if (field("format"), field("version")) != (PAYLOAD_FORMAT, PAYLOAD_VERSION):
            raise PayloadRejected(
                RejectReason.BAD_METADATA,
                f"format {metadata.get('format')!r} version {metadata.get('version')!r}, "
                f"expected {PAYLOAD_FORMAT!r} version {PAYLOAD_VERSION}",
            )
        return cls(
            run_id=field("run_id"),
            window=number("window"),
            uid=number("uid"),
            sample_digest=field("sample_digest"),
            sample_count=number("sample_count"),
            code_version=field("code_version"),
        )


@dataclass(frozen=True, slots=True)
class GradientPayload:
    meta: PayloadMeta
    tensors: dict[str, CompressedTensor]  # parameter name -> sent part


@dataclass(frozen=True)
class PayloadSchema:
    """What a valid payload looks like for one model and run: names, dtypes, shapes, size."""

    param_shapes: dict[str, tuple[int, ...]]
    settings: CompressionSettings
    max_bytes: int

    @classmethod
    def for_model(
        cls,
        param_shapes: Mapping[str, Iterable[int]],
        settings: CompressionSettings,
        *,
        max_bytes: int | None = None,
    ) -> PayloadSchema:
        """``max_bytes`` defaults to the exact tensor bytes plus a header allowance."""
        shapes = {name: tuple(int(d) for d in shape) for name, shape in param_shapes.items()}
        if max_bytes is None:
            data_bytes = sum(settings.compressed_bytes(shape) for shape in shapes.values())
            header = HEADER_ALLOWANCE_BYTES + 2 * len(shapes) * _HEADER_BYTES_PER_TENSOR
            max_bytes = data_bytes + header
        return cls(param_shapes=shapes, settings=settings, max_bytes=max_bytes)

    def expected_tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, int]]]:
        expected: dict[str, tuple[torch.dtype, tuple[int, int]]] = {}
        for name, shape in self.param_shapes.items():
            compressed = self.settings.compressed_shape(shape)
            expected[name + INDEX_SUFFIX] = (self.settings.index_dtype, compressed)
            expected[name + VALUES_SUFFIX] = (self.settings.value_dtype, compressed)
        return expected


@dataclass(frozen=True)
class PayloadExpectation:
    """What the gatherer knows independently: whose payload, for which run and window."""

    run_id: str
    window: int
    uid: int
    sample_digest: str | None = None  # None: not checked (miners gathering peers)
    window_clock: WindowClock | None = None  # with ``uploaded_at``: upload time checked


def encode_payload(meta: PayloadMeta, compressed: Mapping[str, CompressedTensor]) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    for name, part in compressed.items():
        tensors[name + INDEX_SUFFIX] = part.indices.contiguous().cpu()
        tensors[name + VALUES_SUFFIX] = part.values.contiguous().cpu()
    return safetensors_save(tensors, metadata=meta.to_metadata())


def check_payload_size(size_bytes: int, schema: PayloadSchema) -> None:
    """Call with the HEAD size before downloading a payload."""
    if size_bytes > schema.max_bytes:
        raise PayloadRejected(
            RejectReason.TOO_LARGE, f"{size_bytes} bytes, the limit is {schema.max_bytes}"
        )


def check_upload_time(
    window_clock: WindowClock, window: int, uploaded_at: datetime | float
) -> None:
    """The object's LastModified must lie between the window's start and upload deadline."""
    if not window_clock.uploaded_in_time(window, uploaded_at):
        stamp = uploaded_at.timestamp() if isinstance(uploaded_at, datetime) else uploaded_at
        start_s = window_clock.window_start_s(window)
        deadline_s = window_clock.upload_deadline_s(window)
        raise PayloadRejected(
            RejectReason.OUTSIDE_WINDOW,
            f"uploaded at {stamp:.3f}, window {window} accepts uploads from "
            f"{start_s:.3f} to {deadline_s:.3f} (unix seconds)",
        )


def read_safetensors_header(data: bytes) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse the header without touching tensor data: ``(tensors, metadata)``."""
    if len(data) < 8:
        raise PayloadRejected(RejectReason.NOT_SAFETENSORS, f"only {len(data)} bytes")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise PayloadRejected(
            RejectReason.NOT_SAFETENSORS,
            f"header length {header_len} does not fit in {len(data)} bytes (not safetensors)",
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadRejected(RejectReason.NOT_SAFETENSORS, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise PayloadRejected(RejectReason.NOT_SAFETENSORS, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise PayloadRejected(RejectReason.BAD_METADATA, "__metadata__ is not an object")
    for key, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list)):
            raise PayloadRejected(RejectReason.NOT_SAFETENSORS, f"bad header entry {key[:80]!r}")
    return header, metadata


def _check_identity(meta: PayloadMeta, expect: PayloadExpectation) -> None:
    if meta.run_id != expect.run_id:
        raise PayloadRejected(
            RejectReason.WRONG_RUN, f"run id {meta.run_id[:80]!r}, expected {expect.run_id!r}"
        )
    if meta.window != expect.window:
        raise PayloadRejected(
            RejectReason.WRONG_WINDOW, f"window {meta.window}, expected {expect.window}"
        )
    if meta.uid != expect.uid:
        raise PayloadRejected(RejectReason.WRONG_UID, f"uid {meta.uid}, expected {expect.uid}")
    if expect.sample_digest is not None and meta.sample_digest != expect.sample_digest:
        raise PayloadRejected(
            RejectReason.DIGEST_MISMATCH,
            f"sample digest {meta.sample_digest[:80]!r} does not match the samples assigned "
            f"to uid {expect.uid} in window {expect.window} ({expect.sample_digest!r})",
        )


def _check_layout(header: Mapping[str, dict], schema: PayloadSchema) -> None:
    expected = schema.expected_tensors()
    missing = sorted(set(expected) - set(header))
    if missing:
        raise PayloadRejected(
            RejectReason.MISSING_KEYS, f"{len(missing)} tensors missing, e.g. {missing[:3]}"
        )
    extra = sorted(set(header) - set(expected))
    if extra:
        shown = [key[:80] for key in extra[:3]]
        raise PayloadRejected(
            RejectReason.EXTRA_KEYS, f"{len(extra)} unexpected tensors, e.g. {shown}"
        )
    for key, (dtype, shape) in expected.items():
        got_dtype = header[key].get("dtype")
        if got_dtype != _SAFETENSORS_DTYPES[dtype]:
            raise PayloadRejected(
                RejectReason.BAD_DTYPE,
                f"{key} has dtype {str(got_dtype)[:20]}, expected {_SAFETENSORS_DTYPES[dtype]}",
            )
        if tuple(header[key]["shape"]) != shape:
            raise PayloadRejected(
                RejectReason.BAD_SHAPE,
                f"{key} has shape {tuple(header[key]['shape'])[:8]}, expected {shape}",
            )


def _check_values(tensors: Mapping[str, torch.Tensor], schema: PayloadSchema) -> None:
    chunk_size = schema.settings.chunk_size
    for name in schema.param_shapes:
        indices = tensors[name + INDEX_SUFFIX]
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= chunk_size):
            raise PayloadRejected(
                RejectReason.INDEX_OUT_OF_RANGE,
                f"{name}{INDEX_SUFFIX} holds indices outside [0, {chunk_size})",
            )
        ordered = indices.to(torch.int32).sort(dim=1).values  # (n_chunks, k)
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise PayloadRejected(
                RejectReason.DUPLICATE_INDEX, f"{name}{INDEX_SUFFIX} repeats an index in a chunk"
            )
        if not bool(torch.isfinite(tensors[name + VALUES_SUFFIX]).all()):
            raise PayloadRejected(
                RejectReason.NON_FINITE, f"{name}{VALUES_SUFFIX} holds NaN or infinity"
            )


def decode_payload(
    data: bytes,
    schema: PayloadSchema,
    expect: PayloadExpectation,
    *,
    uploaded_at: datetime | float | None = None,
) -> GradientPayload:
    """Validate ``data`` completely and return the typed payload, or raise PayloadRejected."""
    check_payload_size(len(data), schema)
    if uploaded_at is not None and expect.window_clock is not None:
        check_upload_time(expect.window_clock, expect.window, uploaded_at)
    header, metadata = read_safetensors_header(data)
    meta = PayloadMeta.from_metadata(metadata)
    _check_identity(meta, expect)
    _check_layout(header, schema)
    try:
        tensors = safetensors_load(data)
    except SafetensorError as exc:
        raise PayloadRejected(RejectReason.NOT_SAFETENSORS, f"unreadable: {exc}") from None
    _check_values(tensors, schema)
    compressed = {
        name: CompressedTensor(
            indices=tensors[name + INDEX_SUFFIX],
            values=tensors[name + VALUES_SUFFIX],
            shape=torch.Size(shape),
        )
        for name, shape in schema.param_shapes.items()
    }
    return GradientPayload(meta=meta, tensors=compressed)


async def decode_payload_async(
    data: bytes,
    schema: PayloadSchema,
    expect: PayloadExpectation,
    *,
    uploaded_at: datetime | float | None = None,
) -> GradientPayload:
    """:func:`decode_payload` in a worker thread, keeping the event loop free."""
    return await asyncio.to_thread(decode_payload, data, schema, expect, uploaded_at=uploaded_at)
