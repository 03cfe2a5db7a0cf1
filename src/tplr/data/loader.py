"""Batches of ``(B, T)`` inputs and targets from a :class:`SharedShardedDataset`.

A batch is one vectorised gather of ``B`` rows (``np.take`` on the memory map, no
per-sample Python loop) into a reused host buffer of ``(B, row_len)`` tokens in the
shard's own width (uint16, or uint32 read as int32): the *host format*. From there:

- ``output="int64"`` on CPU: fresh, contiguous int64 ``inputs = rows[:, :-1]`` and
  ``targets = rows[:, 1:]`` tensors.
- on CUDA (either output): the host buffer is pinned; ``to_device`` copies it with
  ``non_blocking=True`` and upcasts to int64 on the device; a CUDA event recorded
  after the copy guards the buffer until the copy has finished.

:class:`BatchLoader` keeps ``prefetch_batches`` batches in flight on background
threads (``workers``) and hands them out in order, so batches are deterministic given
the sample indices. CUDA-only calls sit behind ``device.type == "cuda"`` checks: the
CPU path makes no CUDA call.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from tplr.data.dataset import SharedShardedDataset
from tplr.data.validate import batch_token_range_error
from tplr.errors import TplrError

HOST_TORCH_DTYPES = {np.dtype("<u2"): torch.uint16, np.dtype("<u4"): torch.int32}


class LoaderConfig(BaseModel):
    """Batch loader settings (one per training/evaluation loop)."""

    model_config = ConfigDict(frozen=True)

    batch_size: int = Field(ge=1, le=1 << 16)
    prefetch_batches: int = Field(default=2, ge=1, le=64)
    # background threads assembling batches; 0 assembles each batch in the caller's thread
    # when it is asked for (no handoff: best when the consumer has nothing to overlap)
    workers: int = Field(default=1, ge=0, le=32)
    output: Literal["int64", "host"] = "int64"
    # Host batches live in reused buffers: how many the consumer may hold at once (the
    # one in use plus any it reads ahead, e.g. depth + 2 for the trainer's BatchFeed).
    hold_batches: int = Field(default=1, ge=1, le=64)
    # Every batch's max token id is checked against the vocabulary (this, else the
    # dataset's ``vocab_size``): one max per batch, so a bad id never reaches the model.
    vocab_size: int | None = Field(default=None, ge=1)
    token_range_check: bool = True


class StaleBatchError(TplrError):
    """A host batch was used after its reused buffer had been refilled."""

    hint = "raise LoaderConfig.hold_batches to the number of batches the consumer holds at once"


class Batch(tuple):
    """``(inputs, targets)``, each ``(B, T)`` int64 on the loader's device; ``.indices``."""

    indices: np.ndarray

    def __new__(cls, inputs: torch.Tensor, targets: torch.Tensor, indices: np.ndarray) -> Batch:
        batch = super().__new__(cls, (inputs, targets))
        batch.indices = indices
        return batch

    @property
    def inputs(self) -> torch.Tensor:
        return self[0]

    @property
    def targets(self) -> torch.Tensor:
        return self[1]


@dataclass(slots=True)
class _Slot:
    """A reused host buffer and, on CUDA, the event after its last device copy."""

    rows: torch.Tensor  # (B, row_len), pinned on CUDA hosts
    copied: object | None = None  # torch.cuda.Event
    batch_number: int = -1  # the batch whose rows the buffer holds now


class HostBatch(Batch):
    """The host format: ``rows`` ``(B, row_len)`` uint16/int32 in a reused (pinned on
    CUDA) buffer, valid until the next batch is requested. As a tuple it is
    ``(rows[:, :-1], rows[:, 1:])`` (views); :meth:`to_device` is the fast way to the
    model: one copy of ``rows``, then the int64 upcast on the device.
    """

    rows: torch.Tensor
    _slot: _Slot
    _number: int

    def __new__(cls, rows: torch.Tensor, indices: np.ndarray, slot: _Slot) -> HostBatch:
        batch = super().__new__(cls, rows[:, :-1], rows[:, 1:], indices)
        batch.rows = rows
        batch._slot = slot
        batch._number = slot.batch_number
        return batch

    def check_fresh(self) -> None:
        """Raise :class:`StaleBatchError` if the buffer now holds a later batch."""
        if self._slot.batch_number != self._number:
            raise StaleBatchError(
                f"host batch {self._number} was used after its buffer was refilled with batch "
                f"{self._slot.batch_number}"
            )

    def to_device(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ``(inputs, targets)``, each ``(B, T)`` contiguous, on ``device``."""
        self.check_fresh()
        device = torch.device(device)
        if device.type != "cuda":
            inputs, targets = _widen_on_host(self.rows.numpy())
            return (
                (inputs, targets)
                if device.type == "cpu"
                else (inputs.to(device), targets.to(device))
            )
        is_u16 = self.rows.dtype == torch.uint16
        words = self.rows.view(torch.int16) if is_u16 else self.rows  # uint16 kernels are partial
        on_device = words.to(device, non_blocking=True)  # async H2D copy from pinned memory
        copied = torch.cuda.Event()
        copied.record()
        self._slot.copied = copied  # the producer waits on it before refilling the buffer
        wide = on_device.to(torch.int64)  # (B, row_len), upcast on the device
        if is_u16:
            wide.bitwise_and_(0xFFFF)  # undo the int16 sign extension
        return wide[:, :-1].contiguous(), wide[:, 1:].contiguous()


def _widen_on_host(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh contiguous int64 ``(rows[:, :-1], rows[:, 1:])`` on the CPU.

    numpy's widening copy runs on this thread; torch's CPU copy would fan out to its
    intra-op thread pool, whose wake-up costs more than the copy at this size.
    """
    shape = (rows.shape[0], rows.shape[1] - 1)
    inputs = torch.empty(shape, dtype=torch.int64)
    targets = torch.empty(shape, dtype=torch.int64)
    np.copyto(inputs.numpy(), rows[:, :-1])
    np.copyto(targets.numpy(), rows[:, 1:])
    return inputs, targets


class _Deferred:
    """A batch to produce on demand, in the thread that asks for it (``workers=0``)."""

    def __init__(self, produce: Callable[[int], Batch | HostBatch], number: int) -> None:
        self._produce = produce
        self._number = number

    def result(self) -> Batch | HostBatch:
        return self._produce(self._number)

    def cancel(self) -> bool:
        return True


class BatchAssembler:
    """Gathers rows of ``dataset`` into host buffers; thread-safe for distinct buffers.

    With ``vocab_size``, each gathered batch's largest id is checked against it, and
    :class:`~tplr.data.validate.TokenIdOutOfRange` names the shard, sample and token of
    the first id beyond it (:class:`BatchLoader` passes its config's or the dataset's)."""

    def __init__(
        self,
        dataset: SharedShardedDataset,
        batch_size: int,
        *,
        pin_memory: bool,
        vocab_size: int | None = None,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.pin_memory = pin_memory
        self.vocab_size = vocab_size
        dtype = np.dtype(dataset.token_dtype).newbyteorder("<")
        self.host_torch_dtype = HOST_TORCH_DTYPES[dtype]
        # uint32 ids are < 2**31 once range-checked, so int32 reads them unchanged
        self._rows = dataset.rows if dtype.itemsize == 2 else dataset.rows.view(np.int32)
        self._unsigned = np.dtype("<u2") if dtype.itemsize == 2 else np.dtype("<u4")

    def new_host_buffer(self) -> torch.Tensor:
        shape = (self.batch_size, self.dataset.row_len)
        return torch.empty(shape, dtype=self.host_torch_dtype, pin_memory=self.pin_memory)

    def gather(self, indices: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` into ``out[:len(indices)]`` with one vectorised gather."""
        return self.gather_checked(self.dataset.check_indices(indices), out)

    def gather_checked(self, indices: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """:meth:`gather` for indices already passed through ``dataset.check_indices``."""
        view = out[: len(indices)]
        rows = view.numpy()  # (B, row_len), shares the buffer
        # One call for the whole (B, row_len) batch. mode="clip" skips numpy's bounds
        # pass and its buffered copy; the indices were range-checked by the caller.
        np.take(self._rows, indices, axis=0, out=rows, mode="clip")
        if self.vocab_size is not None:
            ids = rows.view(self._unsigned)  # int32 words as the uint32 ids they hold
            if int(ids.max()) >= self.vocab_size:  # one max per batch
                raise batch_token_range_error(
                    ids, indices, self.vocab_size, path=self.dataset.shard.path
                )
        return view

    def int64_batch(
        self, indices: np.ndarray, scratch: torch.Tensor, *, checked: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh contiguous int64 ``(inputs, targets)`` on the CPU, each ``(B, T)``."""
        if not checked:
            indices = self.dataset.check_indices(indices)
        return _widen_on_host(self.gather_checked(indices, scratch).numpy())


class BatchLoader:
    """Iterate ``Batch`` (``output="int64"``) or ``HostBatch`` (``output="host"``).

    ``indices`` are this rank's sample indices (from the sampler), consumed in order,
    ``batch_size`` at a time (the last batch may be smaller). Use as a context
    manager, or call :meth:`close`, to stop the background threads early.
    """

    def __init__(
        self,
        dataset: SharedShardedDataset,
        indices: np.ndarray,
        *,
        config: LoaderConfig,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self._indices = dataset.check_indices(indices)
        is_cuda = self.device.type == "cuda"
        vocab_size = (config.vocab_size or dataset.vocab_size) if config.token_range_check else None
        self._assembler = BatchAssembler(
            dataset, config.batch_size, pin_memory=is_cuda, vocab_size=vocab_size
        )
        # one slot per batch in flight plus those the consumer holds
        count = config.prefetch_batches + config.hold_batches
        self._slots = [_Slot(self._assembler.new_host_buffer()) for _ in range(count)]
        self._pool = (
            ThreadPoolExecutor(config.workers, thread_name_prefix="tplr-batches")
            if config.workers
            else None
        )
        self._pending: deque[Future | _Deferred] = deque()
        self._next_batch = 0
        self._closed = False
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return -(-len(self._indices) // self.config.batch_size)

    def _batch_indices(self, number: int) -> np.ndarray:
        size = self.config.batch_size
        return self._indices[number * size : (number + 1) * size]

    def _produce(self, number: int) -> Batch | HostBatch:
        slot = self._slots[number % len(self._slots)]
        if slot.copied is not None:  # only set on CUDA: wait for the last copy out of it
            slot.copied.synchronize()  # type: ignore[attr-defined]
            slot.copied = None
        slot.batch_number = number
        indices = self._batch_indices(number)
        if self.config.output == "int64" and self.device.type == "cpu":
            inputs, targets = self._assembler.int64_batch(indices, slot.rows, checked=True)
            return Batch(inputs, targets, indices)
        return HostBatch(self._assembler.gather_checked(indices, slot.rows), indices, slot)

    def _submit_next(self) -> None:
        if self._next_batch < len(self):
            if self._pool is not None:
                self._pending.append(self._pool.submit(self._produce, self._next_batch))
            else:  # workers=0: produced when result() is called, in the caller's thread
                self._pending.append(_Deferred(self._produce, self._next_batch))
            self._next_batch += 1

    def __iter__(self) -> Iterator[Batch | HostBatch]:
        return self

    def __next__(self) -> Batch | HostBatch:
        with self._lock:
            if self._closed:
                raise StopIteration
            while len(self._pending) < self.config.prefetch_batches and self._next_batch < len(
                self
            ):
                self._submit_next()
            if not self._pending:
                self.close()
                raise StopIteration
            head = self._pending[0]
        try:
            batch = head.result()
        except BaseException:
            self.close()
            raise
        with self._lock:
            if not self._closed:
                self._pending.popleft()
                self._submit_next()
        if isinstance(batch, HostBatch) and self.config.output == "int64":
            inputs, targets = batch.to_device(self.device)  # CUDA: non-blocking copy + upcast
            return Batch(inputs, targets, batch.indices)
        return batch

    def close(self) -> None:
        self._closed = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
