"""Error feedback and chunked top-k compression of pseudo-gradients.

Each parameter's error buffer ``e`` (float32) accumulates ``e ← β·e + Δ``. The buffer is
kept flattened and zero-padded to whole chunks, viewed as ``(n_chunks, chunk_size)``;
per chunk the ``k`` entries of largest magnitude are sent as (index inside the chunk,
value quantised to bf16/fp16). The *quantised* sent values are subtracted from ``e``, so
nothing is lost: ``e_new + decompress(sent) == β·e_old + Δ`` exactly in float32.

Everything is vectorised over chunks (one ``topk``, one ``gather``, one ``scatter_add``
per tensor); the only Python loop is over parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from tplr.errors import ConfigError, TplrError
from tplr.train.parallel.sharding import shard_rows

VALUE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}
"""Value dtypes a run may choose (``compression_value_dtype`` in run.json)."""

_INDEX_DTYPES: tuple[tuple[int, torch.dtype], ...] = (
    (2**8, torch.uint8),
    (2**15, torch.int16),
    (2**31, torch.int32),
)
_FP16_MAX = torch.finfo(torch.float16).max


class CompressionError(TplrError):
    """A tensor could not be compressed (e.g. it holds NaN or infinity)."""


def index_dtype_for(chunk_size: int) -> torch.dtype:
    """Smallest safetensors-supported integer type that holds ``0 .. chunk_size - 1``.

    uint8 up to 256, int16 up to 32768, int32 beyond (safetensors has U8/I16/I32; torch's
    uint16 support is partial, so int16 is used for the middle range).
    """
    for limit, dtype in _INDEX_DTYPES:
        if chunk_size <= limit:
            return dtype
    raise ConfigError(f"chunk size {chunk_size} is too large (max {2**31})")


@dataclass(frozen=True, slots=True)
class CompressionSettings:
    """Compression hyperparameters; they come from the run's ``run.json``."""

    chunk_size: int
    topk: int
    error_feedback_beta: float = 0.95
    value_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_size <= 2**31:
            raise ConfigError(
                f"compression chunk_size must be in [1, 2**31], got {self.chunk_size}",
                hint="fix compression_chunk_size in run.json",
            )
        if not 1 <= self.topk <= self.chunk_size:
            raise ConfigError(
                f"compression topk must be in [1, chunk_size={self.chunk_size}], got {self.topk}",
                hint="fix compression_topk in run.json",
            )
        if not 0.0 <= self.error_feedback_beta <= 1.0:
            raise ConfigError(
                f"error_feedback_beta must be in [0, 1], got {self.error_feedback_beta}",
                hint="fix error_feedback_beta in run.json",
            )
        if self.value_dtype not in VALUE_DTYPES.values():
            raise ConfigError(
                f"compression value dtype must be bfloat16 or float16, got {self.value_dtype}",
                hint="fix compression_value_dtype in run.json",
            )

    @property
    def index_dtype(self) -> torch.dtype:
        return index_dtype_for(self.chunk_size)

    def chunk_count(self, numel: int) -> int:
        return max(1, math.ceil(numel / self.chunk_size))

    def compressed_shape(self, shape: Iterable[int]) -> tuple[int, int]:
        """``(n_chunks, k)``: the shape of the index and value tensors for a parameter."""
        return (self.chunk_count(math.prod(shape)), self.topk)

    def compressed_bytes(self, shape: Iterable[int]) -> int:
        n_chunks, k = self.compressed_shape(shape)
        per_entry = self.index_dtype.itemsize + self.value_dtype.itemsize
        return n_chunks * k * per_entry


@dataclass(frozen=True, slots=True)
class CompressedTensor:
    """One parameter's sent part: positions inside each chunk and their values."""

    indices: torch.Tensor  # (n_chunks, k), settings.index_dtype, each in [0, chunk_size)
    values: torch.Tensor  # (n_chunks, k), settings.value_dtype
    shape: torch.Size  # the dense parameter's shape


def _padded_chunks(flat: torch.Tensor, chunk_size: int) -> torch.Tensor:
    n_chunks = max(1, math.ceil(flat.numel() / chunk_size))
    padding = n_chunks * chunk_size - flat.numel()
    if padding:
        flat = torch.nn.functional.pad(flat, (0, padding))
    return flat.view(n_chunks, chunk_size)


def select_topk(
    chunks: torch.Tensor, numel: int, shape: torch.Size, settings: CompressionSettings
) -> CompressedTensor:
    """Pick the ``k`` largest-magnitude entries of each row of ``chunks`` (n_chunks, chunk).

    Entries past ``numel`` (the padding of the last chunk) rank below every real entry.
    """
    magnitude = chunks.abs()  # (n_chunks, chunk)
    padding = magnitude.numel() - numel
    if padding:
        magnitude.view(-1)[numel:] = -1.0
    indices = magnitude.topk(settings.topk, dim=1, sorted=False).indices  # (n_chunks, k) int64
    values = chunks.gather(1, indices)
    if settings.value_dtype == torch.float16:
        values = values.clamp(-_FP16_MAX, _FP16_MAX)
    return CompressedTensor(
        indices=indices.to(settings.index_dtype),
        values=values.to(settings.value_dtype),
        shape=torch.Size(shape),
    )


def compress_tensor(tensor: torch.Tensor, settings: CompressionSettings) -> CompressedTensor:
    """Top-k of ``tensor`` chunk by chunk, without error feedback."""
    flat = tensor.detach().reshape(-1).to(torch.float32)
    chunks = _padded_chunks(flat, settings.chunk_size)  # (n_chunks, chunk)
    return select_topk(chunks, flat.numel(), tensor.shape, settings)


def decompress_tensor(
    compressed: CompressedTensor,
    chunk_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense tensor of ``compressed.shape``: the sent values at their places, zeros elsewhere.

    Duplicate indices (never produced by :func:`compress_tensor`) would be summed.
    """
    indices = compressed.indices.to(device=device, dtype=torch.int64)  # (n_chunks, k)
    values = compressed.values.to(device=device, dtype=dtype)
    numel = math.prod(compressed.shape)
    dense = torch.zeros(indices.shape[0], chunk_size, dtype=dtype, device=indices.device)
    dense.scatter_add_(1, indices, values)
    return dense.view(-1)[:numel].view(compressed.shape)


def sparse_norm(compressed: Mapping[str, CompressedTensor], chunk_size: int) -> float:
    """The L2 norm of the dense Δ the parts decompress to, without building it (float64).

    Entries that decompression drops (padding past the tensor's end) are left out, and
    indices must be unique per chunk (validated payloads are), so this equals
    ``total_norm(decompress_all(...))`` up to summation order."""
    total = torch.zeros((), dtype=torch.float64)
    for name in sorted(compressed):
        part = compressed[name]
        numel = math.prod(part.shape)
        rows = torch.arange(part.indices.shape[0], dtype=torch.int64).unsqueeze(1)
        inside = rows * chunk_size + part.indices.to(torch.int64) < numel  # (n_chunks, k)
        values = part.values.to(torch.float64)
        total += values.square().mul_(inside).sum()
    return float(total.sqrt())


def decompress_all(
    compressed: Mapping[str, CompressedTensor],
    chunk_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    return {
        name: decompress_tensor(part, chunk_size, dtype=dtype, device=device)
        for name, part in compressed.items()
    }


class ErrorFeedbackCompressor:
    """Keeps one float32 error buffer per parameter and compresses with error feedback.

    With ``world_size`` > 1 (torchrun), rank ``r`` owns the error of a contiguous range of
    every parameter's chunks (:func:`~tplr.train.parallel.sharding.shard_rows` of the chunk count)
    and :meth:`compress` returns that range only; :func:`tplr.train.parallel.compression_dist.
    compress_across_ranks` joins the ranges into the whole payload. Chunks are independent,
    so the joined payload and the errors are bit-identical to one process doing it all.

    ``offload``: on CUDA, keep the buffers in pinned host memory between calls and bring
    each to the device only while its parameter is compressed.

    Not thread-safe; one compressor per miner process. ``state_dict``/``load_state_dict``
    (one process) and :meth:`owned_rows`/:meth:`load_rows` (any world size) carry the
    buffers across restarts.
    """

    def __init__(
        self,
        settings: CompressionSettings,
        *,
        rank: int = 0,
        world_size: int = 1,
        offload: bool = False,
    ) -> None:
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.offload = offload
        self._errors: dict[str, torch.Tensor] = {}  # name -> (owned chunks, chunk) float32
        self._shapes: dict[str, torch.Size] = {}

    def chunk_range(self, numel: int) -> tuple[int, int]:
        """``[start, stop)`` of the chunks of a ``numel``-element tensor this rank owns."""
        return shard_rows(self.settings.chunk_count(numel), self.rank, self.world_size)

    @torch.no_grad()
    def compress(self, deltas: Mapping[str, torch.Tensor]) -> dict[str, CompressedTensor]:
        """``e ← β·e + Δ``; send top-k of ``e`` per chunk; ``e ← e − quantised sent``.

        ``deltas`` are whole tensors; with ``world_size`` > 1 the result holds this rank's
        chunk range of each (indices and values of shape ``(owned chunks, k)``)."""
        check_finite(deltas)  # all or nothing: no error buffer moves for a bad Δ
        sent = {name: self.compress_one(name, delta) for name, delta in deltas.items()}
        self.finish(deltas.values())
        return sent

    def finish(self, on: Iterable[torch.Tensor]) -> None:
        """With ``offload``, wait until the errors copied back to host memory have landed
        (before anything reads the pinned buffers on the host: a saved state, a restart)."""
        if self.offload:
            for device in {t.device for t in on if t.device.type == "cuda"}:
                torch.cuda.synchronize(device)

    def compress_one(self, name: str, delta: torch.Tensor) -> CompressedTensor:
        """One parameter's share (the caller has checked Δ is finite)."""
        numel = delta.numel()
        start, stop = self.chunk_range(numel)
        chunk = self.settings.chunk_size
        flat = delta.detach().reshape(-1)[start * chunk : stop * chunk]
        home = self._error_buffer(name, delta.shape, delta.device)
        error = home.to(delta.device, non_blocking=True) if self.offload else home
        error.mul_(self.settings.error_feedback_beta)
        error.view(-1)[: flat.numel()].add_(flat)
        sent = select_topk(error, flat.numel(), delta.shape, self.settings)
        error.scatter_add_(1, sent.indices.to(torch.int64), -sent.values.to(torch.float32))
        if error is not home:
            home.copy_(error, non_blocking=True)
        return sent

    def _error_buffer(self, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        error = self._errors.get(name)
        if error is None:
            start, stop = self.chunk_range(math.prod(shape))
            on_host = self.offload and device.type == "cuda"
            error = torch.zeros(
                stop - start,
                self.settings.chunk_size,
                dtype=torch.float32,
                device="cpu" if on_host else device,
                pin_memory=on_host,
            )
            self._errors[name] = error
            self._shapes[name] = torch.Size(shape)
        elif self._shapes[name] != shape:
            raise CompressionError(
                f"parameter {name!r} changed shape from {tuple(self._shapes[name])} "
                f"to {tuple(shape)}",
                hint="the model config changed; start a fresh compressor (drop the error state)",
            )
        return error

    def error_of(self, name: str) -> torch.Tensor:
        """The error buffer of one parameter, in the parameter's shape (a view; one process)."""
        self._require_whole("error_of")
        numel = math.prod(self._shapes[name])
        return self._errors[name].view(-1)[:numel].view(self._shapes[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._require_whole("state_dict")
        return {name: self.error_of(name).clone() for name in self._errors}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._require_whole("load_state_dict")
        self._errors.clear()
        self._shapes.clear()
        for name, error in state.items():
            buffer = self._error_buffer(name, error.shape, error.device)
            buffer.view(-1)[: error.numel()].copy_(error.reshape(-1))

    def owned_rows(self) -> dict[str, tuple[torch.Tensor, int, torch.Size]]:
        """name -> (this rank's error rows ``(owned chunks, chunk)``, first chunk, shape)."""
        return {
            name: (error, self.chunk_range(math.prod(self._shapes[name]))[0], self._shapes[name])
            for name, error in self._errors.items()
        }

    def load_rows(
        self, name: str, shape: torch.Size, owned: torch.Tensor, device: torch.device
    ) -> None:
        """Set this rank's error rows of a parameter (``owned``: ``(owned chunks, chunk)``,
        a CPU tensor) in a buffer for ``device`` (host memory when offloading on CUDA)."""
        start, stop = self.chunk_range(math.prod(shape))
        expected = (stop - start, self.settings.chunk_size)
        if tuple(owned.shape) != expected:
            raise CompressionError(
                f"saved error of {name!r} has shape {tuple(owned.shape)}, expected {expected}",
                hint="it was saved with another chunk size or model; drop the saved state",
            )
        self._errors.pop(name, None)
        self._error_buffer(name, torch.Size(shape), device).copy_(owned)

    def reset(self) -> None:
        """Forget every error buffer (a fresh compressor)."""
        self._errors.clear()
        self._shapes.clear()

    def _require_whole(self, what: str) -> None:
        if self.world_size != 1:
            raise CompressionError(
                f"{what} needs the whole error; this compressor holds rank {self.rank}'s share",
                hint="use owned_rows / load_rows under torchrun",
            )


def check_finite(deltas: Mapping[str, torch.Tensor]) -> None:
    """Raise CompressionError naming the first parameter whose Δ holds NaN or infinity."""
    if not deltas:
        return
    where = next(iter(deltas.values())).device
    flags = torch.stack([torch.isfinite(t.detach()).all().to(where) for t in deltas.values()])
    if not bool(flags.all()):  # one sync for all tensors
        bad = next(name for name, ok in zip(deltas, flags.tolist(), strict=True) if not ok)
        raise CompressionError(
            f"pseudo-gradient of parameter {bad!r} holds NaN or infinity",
            hint="the inner steps diverged; lower the learning rate or restore a checkpoint",
        )
