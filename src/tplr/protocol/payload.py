"""Gradient payloads (protocol v2): encoded, and strictly validated at the trust boundary.

A payload holds, per model parameter ``name``, two tensors ``{name}.idx`` (indices inside
each chunk, shape ``(n_chunks, k)``) and ``{name}.val`` (bf16/fp16 values, same shape),
plus string metadata in the safetensors header: format, version, run id, window, uid,
**base digest** (the model the Δ was computed from), sample digest, sample count and code
version. Safetensors only; nothing here ever unpickles.

Validation is ordered cheapest first (size, header, metadata, key set, dtypes and
shapes from the header alone, then the tensor data) and raises :class:`PayloadRejected`
with a :class:`~tplr.protocol.reasons.RejectReason`. The header is parsed by
:func:`tplr.untrusted.load_json` (bounded size and depth, no duplicate keys), numbers in
the metadata must be ASCII digits. Decoding is CPU work: call it in a worker thread.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from tplr import __version__
from tplr.data.sampler import sample_ids_digest
from tplr.errors import TplrError
from tplr.protocol.reasons import RejectReason
from tplr.train.compression import CompressedTensor, CompressionSettings
from tplr.untrusted import MalformedInput, load_json, parse_ascii_int

PAYLOAD_FORMAT = "tplr-gradient"
PAYLOAD_VERSION = "2"
INDEX_SUFFIX = ".idx"
VALUES_SUFFIX = ".val"
HEADER_ALLOWANCE_BYTES = 64 * 1024
"""Room for the JSON header beyond the tensor bytes when sizing the limit."""
_HEADER_BYTES_PER_TENSOR = 256
_MAX_METADATA_ENTRIES = 32
_MAX_METADATA_VALUE = 256
_SAFETENSORS_DTYPES = {
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
}
_MAX_UID = (1 << 31) - 1
_MAX_WINDOW = (1 << 40) - 1


class PayloadRejected(TplrError):
    """A peer's payload failed validation. ``reason`` is a :class:`RejectReason`."""

    hint = "the peer's payload is left out of this window and scores 0"

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
    base_digest: str  # the model at the start of ``window`` that the Δ was computed from
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
            "base_digest": self.base_digest,
            "sample_digest": self.sample_digest,
            "sample_count": str(self.sample_count),
            "code_version": self.code_version,
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> PayloadMeta:
        def field(name: str) -> str:
            value = metadata.get(name)
            if not isinstance(value, str) or len(value) > _MAX_METADATA_VALUE:
                raise PayloadRejected(
                    RejectReason.BAD_METADATA, f"metadata field {name!r} missing or not a string"
                )
            return value

        def number(name: str, max_value: int) -> int:
            try:
                return parse_ascii_int(field(name), what=f"metadata {name}", max_value=max_value)
            except MalformedInput as exc:
                raise PayloadRejected(RejectReason.BAD_METADATA, exc.message) from None

        if field("format") != PAYLOAD_FORMAT:
            raise PayloadRejected(
                RejectReason.BAD_METADATA,
                f"format {field('format')[:40]!r}, expected {PAYLOAD_FORMAT!r}",
            )
        if field("version") != PAYLOAD_VERSION:
            raise PayloadRejected(
                RejectReason.PROTOCOL_VERSION,
                f"protocol version {field('version')[:8]!r}, this run speaks version "
                f"{PAYLOAD_VERSION} (the miner must upgrade its node)",
            )
        return cls(
            run_id=field("run_id"),
            window=number("window", _MAX_WINDOW),
            uid=number("uid", _MAX_UID),
            base_digest=field("base_digest"),
            sample_digest=field("sample_digest"),
            sample_count=number("sample_count", 1 << 40),
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
    """What the checker knows independently: whose payload, for which run, window and base."""

    run_id: str
    window: int
    uid: int
    base_digest: str | None = None  # None: not checked
    sample_digest: str | None = None  # None: not checked (only validators recompute it)


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


def read_safetensors_header(
    data: bytes, *, max_header_bytes: int
) -> tuple[dict[str, dict], dict[str, Any]]:
    """Parse the header without touching tensor data: ``(tensors, metadata)``."""
    if len(data) < 8:
        raise PayloadRejected(RejectReason.NOT_SAFETENSORS, f"only {len(data)} bytes")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, max_header_bytes):
        raise PayloadRejected(
            RejectReason.NOT_SAFETENSORS,
            f"header length {header_len} does not fit in {len(data)} bytes "
            f"(or exceeds {max_header_bytes}): not safetensors",
        )
    try:
        header = load_json(
            data[8 : 8 + header_len], what="header", max_bytes=max_header_bytes, max_depth=3
        )
    except MalformedInput as exc:
        raise PayloadRejected(RejectReason.NOT_SAFETENSORS, exc.message) from None
    if not isinstance(header, dict):
        raise PayloadRejected(RejectReason.NOT_SAFETENSORS, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or len(metadata) > _MAX_METADATA_ENTRIES:
        raise PayloadRejected(
            RejectReason.BAD_METADATA,
            f"__metadata__ must be an object of at most {_MAX_METADATA_ENTRIES} strings",
        )
    for key, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (
            isinstance(shape, list)
            and len(shape) <= 8
            and all(type(dim) is int and 0 <= dim < 1 << 40 for dim in shape)
            and isinstance(entry.get("dtype"), str)
        ):
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
    if expect.base_digest is not None and meta.base_digest != expect.base_digest:
        raise PayloadRejected(
            RejectReason.WRONG_BASE,
            f"computed from model {meta.base_digest[:80]!r}, the global model of window "
            f"{expect.window} is {expect.base_digest!r}",
        )
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
        got_dtype = header[key]["dtype"]
        if got_dtype != _SAFETENSORS_DTYPES[dtype]:
            raise PayloadRejected(
                RejectReason.BAD_DTYPE,
                f"{key} has dtype {got_dtype[:20]}, expected {_SAFETENSORS_DTYPES[dtype]}",
            )
        if tuple(header[key]["shape"]) != shape:
            raise PayloadRejected(
                RejectReason.BAD_SHAPE,
                f"{key} has shape {tuple(header[key]['shape'])[:8]}, expected {shape}",
            )


def _check_values(tensors: Mapping[str, torch.Tensor], schema: PayloadSchema) -> None:
    chunk_size = schema.settings.chunk_size
    any_nonzero = False
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
        values = tensors[name + VALUES_SUFFIX]
        if not bool(torch.isfinite(values).all()):
            raise PayloadRejected(
                RejectReason.NON_FINITE, f"{name}{VALUES_SUFFIX} holds NaN or infinity"
            )
        any_nonzero = any_nonzero or bool(values.any())
    if not any_nonzero:
        raise PayloadRejected(RejectReason.ZERO_UPDATE, "every value is zero: no update")


def decode_payload(
    data: bytes, schema: PayloadSchema, expect: PayloadExpectation
) -> GradientPayload:
    """Validate ``data`` completely and return the typed payload, or raise PayloadRejected.

    Blocking CPU work: call it in a worker thread."""
    check_payload_size(len(data), schema)
    header_limit = HEADER_ALLOWANCE_BYTES + 2 * len(schema.param_shapes) * _HEADER_BYTES_PER_TENSOR
    header, metadata = read_safetensors_header(data, max_header_bytes=header_limit)
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
