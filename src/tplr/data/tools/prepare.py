"""``tplr shards prepare``: text -> token shards + sample ids + manifest, deterministically.

Documents are tokenized in worker processes (spawned, so safe from threaded
parents); results come back in task order, so the shards are the same bytes for any
worker count and any input order (see :mod:`tplr.data.tools.sources`). Each document is
``[eot] + tokens``; the stream is packed into rows and shards by
:class:`~tplr.data.tools.packer.ShardPacker`; the manifest is written last.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm import tqdm

from tplr.comms.manifest import DEFAULT_PART_SIZE, Manifest
from tplr.data.dataset_manifest import DatasetInfo, ShardRecord, write_dataset_manifest
from tplr.data.formats import TokenFormat
from tplr.data.tools.packer import ShardPacker, ensure_empty_dir
from tplr.data.tools.sources import SourceTask, discover_inputs, plan_tasks, read_documents
from tplr.data.tools.tokenizers import Tokenizer, get_tokenizer, token_dtype_for
from tplr.data.tools.writers import FileSpaceProbe, free_bytes_for
from tplr.errors import ConfigError, TplrError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

FLAG_NAMES = {
    "inputs": "--input",
    "out_dir": "--out",
    "seq_len": "--seq-len",
    "shard_tokens": "--shard-tokens",
    "val_shards": "--val-shards",
    "workers": "--workers",
    "part_size": "--part-size",
}


class PrepareConfig(BaseModel):
    """Settings of one ``tplr shards prepare`` run (flags in :data:`FLAG_NAMES`)."""

    model_config = ConfigDict(frozen=True)

    inputs: list[Path] = Field(min_length=1)
    out_dir: Path
    tokenizer: Literal["gpt2", "bytes"] = "gpt2"
    seq_len: int = Field(ge=2, le=1 << 20)
    shard_tokens: int = Field(ge=2)
    format: Literal["templar", "llmc"] = "templar"
    val_shards: int = Field(default=1, ge=0, le=1 << 20)
    workers: int = Field(default=1, ge=1, le=256)
    text_field: str = "text"
    part_size: int = Field(default=DEFAULT_PART_SIZE, ge=64 * 1024)
    progress: bool = True

    @property
    def token_format(self) -> TokenFormat:
        return TokenFormat.TEMPLAR if self.format == "templar" else TokenFormat.LLMC

    @property
    def row_len(self) -> int:
        """Tokens per stored sample: templar sequences, or llm.c windows of seq_len + 1."""
        return self.seq_len if self.format == "templar" else self.seq_len + 1

    @model_validator(mode="after")
    def _shard_holds_a_row(self) -> PrepareConfig:
        if self.shard_tokens < self.row_len:
            raise ValueError(
                f"--shard-tokens {self.shard_tokens} is smaller than one sequence "
                f"({self.row_len} tokens); use at least {self.row_len}"
            )
        return self

    @classmethod
    def from_values(cls, **values: object) -> PrepareConfig:
        """Validate, turning pydantic errors into a :class:`ConfigError` naming the flag."""
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            message = str(first["msg"]).removeprefix("Value error, ")
            field = str(first["loc"][0]) if first["loc"] else ""
            if field:  # a field's own bound: name its flag and the value given
                flag = FLAG_NAMES.get(field, f"--{field.replace('_', '-')}")
                message = f"{flag}: {message} (got {first.get('input')!r})"
            raise ConfigError(
                message, hint="see `tplr shards prepare --help` for the allowed values"
            ) from exc


@dataclass(frozen=True, slots=True)
class PrepareResult:
    records: list[ShardRecord]
    manifest: Manifest
    dropped_tokens: int
    documents_bytes: int


# --- worker side -------------------------------------------------------------------

_worker_state: dict[str, object] = {}


def _init_worker(tokenizer_name: str, text_field: str) -> None:
    _worker_state["tokenizer"] = get_tokenizer(tokenizer_name)
    _worker_state["text_field"] = text_field


def _tokenize_in_worker(task: SourceTask) -> np.ndarray:
    tokenizer = _worker_state["tokenizer"]
    return tokenize_task(task, tokenizer, str(_worker_state["text_field"]))  # type: ignore[arg-type]


def tokenize_task(task: SourceTask, tokenizer: Tokenizer, text_field: str) -> np.ndarray:
    texts = [t for t in read_documents(task, text_field) if t]
    return tokenizer.encode_documents(texts)


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple,
    max_in_flight: int,
) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` spawned processes, results in input order."""
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=initializer, initargs=initargs
    )
    try:
        pending: deque[Future[R]] = deque()
        iterator = iter(items)
        for item in iterator:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max_in_flight:
                break
        while pending:
            try:
                result = pending.popleft().result()
            except BrokenProcessPool as exc:
                raise TplrError(
                    "a tokenizer worker process died (out of memory, or killed)",
                    hint="retry with fewer --workers, or --workers 1 to see the failure in-process",
                ) from exc
            for item in iterator:
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _token_batches(config: PrepareConfig, tokenizer: Tokenizer, tasks: list[SourceTask]):
    if config.workers == 1:
        return (tokenize_task(task, tokenizer, config.text_field) for task in tasks)
    return ordered_map(
        _tokenize_in_worker,
        tasks,
        workers=config.workers,
        initializer=_init_worker,
        initargs=(config.tokenizer, config.text_field),
        max_in_flight=2 * config.workers,
    )


def _pack(
    config: PrepareConfig, tokenizer: Tokenizer, tasks: list[SourceTask], packer: ShardPacker
) -> None:
    total = sum(t.size_bytes for t in tasks)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="tokenize",
        disable=not config.progress,
        file=sys.stderr,
    )
    try:
        with bar:
            for task, tokens in zip(tasks, _token_batches(config, tokenizer, tasks), strict=True):
                packer.add(tokens)
                bar.update(task.size_bytes)
        packer.finish()
    except BaseException:
        packer.abort()
        raise


def prepare_shards(
    config: PrepareConfig, *, free_space_probe: FileSpaceProbe = free_bytes_for
) -> PrepareResult:
    """Tokenize ``config.inputs`` into shards under ``config.out_dir``; manifest last.

    ``free_space_probe`` (free bytes for a file about to be written) is checked before
    every write; a full disk raises InsufficientSpace. A run that fails for any reason
    removes every file it wrote, so the folder is empty again and the command can be rerun.
    """
    tokenizer = get_tokenizer(config.tokenizer)  # fails here, before any work, if unavailable
    files = discover_inputs(config.inputs)
    ensure_empty_dir(config.out_dir)
    tasks = plan_tasks(files)
    packer = ShardPacker(
        config.out_dir,
        fmt=config.token_format,
        dtype=token_dtype_for(tokenizer.vocab_size),
        seq_len=config.seq_len,
        row_len=config.row_len,
        rows_per_shard=config.shard_tokens // config.row_len,
        free_space=free_space_probe,
    )
    try:
        _pack(config, tokenizer, tasks, packer)
        manifest, info = _write_manifest(config, tokenizer, packer, free_space_probe)
    except BaseException:
        packer.remove_published()
        raise
    log.info(
        "wrote %d shard(s), %d tokens to %s (%d trailing tokens dropped)",
        len(packer.records),
        info.tokens,
        config.out_dir,
        packer.dropped_tokens,
    )
    documents_bytes = sum(t.size_bytes for t in tasks)
    return PrepareResult(packer.records, manifest, packer.dropped_tokens, documents_bytes)


def _write_manifest(
    config: PrepareConfig, tokenizer: Tokenizer, packer: ShardPacker, free_space: FileSpaceProbe
) -> tuple[Manifest, DatasetInfo]:
    records = packer.records
    if not records:
        raise TplrError(
            f"the inputs gave fewer tokens than one sequence ({config.row_len} tokens)",
            hint="add input text or lower --seq-len",
        )
    if config.val_shards >= len(records):
        raise ConfigError(
            f"--val-shards {config.val_shards} would hold out every one of the "
            f"{len(records)} shard(s) written, leaving nothing to train on",
            hint="lower --val-shards or --shard-tokens (nothing was kept)",
        )
    info = DatasetInfo(
        tokenizer=tokenizer.name,
        vocab_size=tokenizer.vocab_size,
        eot_token_id=tokenizer.eot_token_id,
        seq_len=config.seq_len,
        val_shards=config.val_shards,
        format=str(config.token_format),
        dtype=records[0].dtype,
        shards=len(records),
        tokens=sum(r.num_tokens for r in records),
    )
    manifest = write_dataset_manifest(
        config.out_dir, records, info, part_size=config.part_size, free_space=free_space
    )
    return manifest, info
