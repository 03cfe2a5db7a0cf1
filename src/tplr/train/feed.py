"""Feeding micro-batches to the device: check, pin, copy ahead, upcast on device.

``BatchFeed`` pulls exactly ``count`` micro-batches from the caller's iterator (never more,
so a caller's data for the next call is not eaten), optionally in a background thread that
runs ``depth`` batches ahead. Host tensors are checked (shape, dtype, token-id range) before
they reach the device, pinned on CUDA and copied with ``non_blocking=True``; "host format"
uint16/int32 tokens are upcast to int64 on the device.

A batch object with its own ``to_device(device)`` (``tplr.data``'s ``HostBatch``: views of a
reused pinned buffer guarded by a CUDA event) is moved by that method, never re-pinned; its
loader must allow ``depth + 2`` held batches (``LoaderConfig.hold_batches``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tplr.train.errors import BatchError, BatchesExhaustedError
from tplr.train.model.loss import IGNORE_INDEX

Batch = tuple[torch.Tensor, torch.Tensor]
HOST_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint16, torch.uint8)
_POLL_S = 0.1


@dataclass(frozen=True)
class BatchSpec:
    """What a batch must look like. ``None`` leaves a dimension free."""

    vocab_size: int
    max_seq_len: int
    batch_size: int | None = None
    seq_len: int | None = None
    check_token_ids: bool = True


def check_batch(batch: object, spec: BatchSpec, index: int) -> Batch:
    """Return ``(inputs, targets)`` or raise BatchError saying what is wrong with it."""
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise BatchError(
            f"batch {index} is a {type(batch).__name__}, expected (inputs, targets)",
            hint="yield pairs of integer tensors of shape (batch, seq_len)",
        )
    inputs, targets = batch
    for name, tensor in (("inputs", inputs), ("targets", targets)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in HOST_DTYPES:
            kind = getattr(tensor, "dtype", type(tensor).__name__)
            raise BatchError(
                f"batch {index} {name} has dtype {kind}; expected int64, int32 or uint16",
                hint="pass token ids as integer tensors",
            )
    if inputs.ndim != 2 or inputs.shape != targets.shape:
        raise BatchError(
            f"batch {index} shapes {tuple(inputs.shape)} / {tuple(targets.shape)}: "
            "inputs and targets must both be (batch, seq_len)"
        )
    batch_size, seq_len = inputs.shape
    wanted_b = spec.batch_size if spec.batch_size is not None else batch_size
    wanted_t = spec.seq_len if spec.seq_len is not None else min(seq_len, spec.max_seq_len)
    if (batch_size, seq_len) != (wanted_b, wanted_t) or seq_len < 1:
        raise BatchError(
            f"batch {index} has shape {tuple(inputs.shape)}, expected ({wanted_b}, {wanted_t})",
            hint="the loader's batch size and sequence length must match --micro-batch-size "
            "and --seq-len (and seq_len must not exceed the model's max_seq_len)",
        )
    if spec.check_token_ids and inputs.device.type == "cpu":
        _check_token_range(inputs, targets, spec.vocab_size, index)
    return inputs, targets


def _check_token_range(inputs: torch.Tensor, targets: torch.Tensor, vocab: int, index: int):
    for name, tensor in (("inputs", inputs), ("targets", targets)):
        values = tensor.numpy()  # host tensor: numpy reduces every int dtype, uint16 included
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= vocab:
            raise BatchError(
                f"batch {index} {name} holds token ids in [{low}, {high}], outside the model's "
                f"vocabulary [0, {vocab})",
                hint="the data was tokenized with a larger vocabulary: set --vocab-size to it",
            )


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy (non-blocking from pinned memory on CUDA) and upcast to int64 on the device."""
    if tensor.device == device:
        return tensor if tensor.dtype == torch.int64 else _upcast(tensor)
    if tensor.dtype == torch.uint16:
        # Copy the raw 16-bit words as int16 and undo the sign on the device.
        moved = tensor.view(torch.int16).to(device, non_blocking=True)
        return moved.to(torch.int64).bitwise_and_(0xFFFF)
    return tensor.to(device, non_blocking=True).to(torch.int64)


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype == torch.uint16:
        return tensor.view(torch.int16).to(torch.int64).bitwise_and_(0xFFFF)
    return tensor.to(torch.int64)


class BatchFeed:
    """Exactly ``count`` checked micro-batches from ``batches``, on ``device`` as int64."""

    def __init__(
        self,
        batches: Iterator[Batch],
        count: int,
        *,
        spec: BatchSpec,
        device: torch.device,
        depth: int = 2,
    ) -> None:
        self._batches = batches
        self._count = count
        self._spec = spec
        self._device = device
        self._pin = device.type == "cuda"
        self._depth = depth
        self._read = 0
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BatchFeed:
        if self._depth > 0 and self._count > 0:
            self._thread = threading.Thread(target=self._produce, name="tplr-batch-feed")
            self._thread.daemon = True
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def next_batch(self) -> Batch:
        """The next micro-batch on the device; raises what the reader raised."""
        item = self._next_from_thread() if self._thread is not None else self._read_host()
        if hasattr(item, "to_device"):  # the loader's own fast path (one copy + upcast)
            return item.to_device(self._device)
        inputs, targets = item
        return to_device(inputs, self._device), to_device(targets, self._device)

    def _read_host(self) -> object:
        index = self._read
        if index >= self._count:
            raise BatchesExhaustedError(f"feed asked for more than its {self._count} batches")
        try:
            raw = next(self._batches)
        except StopIteration:
            raise BatchesExhaustedError(
                f"the batch iterator ended after {index} of {self._count} micro-batches"
            ) from None
        self._read += 1
        inputs, targets = check_batch(raw, self._spec, index)
        if hasattr(raw, "to_device"):
            return raw
        if self._pin and inputs.device.type == "cpu" and not inputs.is_pinned():
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs, targets

    def _produce(self) -> None:
        try:
            while self._read < self._count and not self._stop.is_set():
                self._put(self._read_host())
        except BaseException as exc:  # handed to the consumer thread, which raises it
            self._put(exc)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _next_from_thread(self) -> object:
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if self._thread is not None and not self._thread.is_alive():
                    try:  # the producer may have put its last item just before exiting
                        item = self._queue.get_nowait()
                        break
                    except queue.Empty:
                        raise BatchesExhaustedError("the batch feed stopped early") from None
        if isinstance(item, BaseException):
            raise item
        return item


def fixed_shape_pieces(
    inputs: torch.Tensor, targets: torch.Tensor, rows: int, cols: int
) -> list[Batch]:
    """Cut a ``(B, T)`` batch into ``(rows, max(cols, T))`` pieces, padding the last rows and
    the columns with inputs 0 and targets ``IGNORE_INDEX`` (they add nothing to the loss).

    One shape for every evaluation batch: a compiled model never recompiles for a short
    last batch. Causal attention keeps right-padding from changing the real positions.
    """
    batch, width = inputs.shape
    width_out = max(cols, width)
    pieces = []
    for start in range(0, batch, rows):
        piece_in = inputs[start : start + rows]
        piece_t = targets[start : start + rows]
        if piece_in.shape != (rows, width_out):
            padded_in = inputs.new_zeros((rows, width_out))
            padded_t = targets.new_full((rows, width_out), IGNORE_INDEX)
            padded_in[: piece_in.shape[0], :width] = piece_in
            padded_t[: piece_t.shape[0], :width] = piece_t
            piece_in, piece_t = padded_in, padded_t
        pieces.append((piece_in, piece_t))
    return pieces
