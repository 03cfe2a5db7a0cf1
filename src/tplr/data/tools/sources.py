"""Text inputs of ``tplr shards prepare``: discovery, deterministic work units, reading.

- ``.txt``: the whole file is one document (UTF-8).
- ``.jsonl``: one JSON object per line, the document in its ``text`` field.
- ``.parquet``: a ``text`` column (needs pyarrow: ``pip install 'tplr[parquet]'``).

Inputs are de-duplicated and ordered by resolved path, and split into tasks (byte
ranges of a ``.jsonl`` at line boundaries, row groups of a ``.parquet``) that depend
only on the files, never on the worker count, so the output is the same bytes
whatever order the inputs were given in and however many workers run.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tplr.errors import TplrError
from tplr.untrusted import json_depth

SUFFIX_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
JSONL_TASK_BYTES = 8 * 1024 * 1024
MAX_JSONL_DEPTH = 64


class PrepareInputError(TplrError):
    """An input file of ``tplr shards prepare`` is missing, unsupported or malformed."""

    def __reduce__(self) -> tuple:  # keep the hint when raised in a worker process
        return (_rebuild_error, (type(self), self.message, self.hint))


def _rebuild_error(cls: type[TplrError], message: str, hint: str) -> TplrError:
    return cls(message, hint=hint)


@dataclass(frozen=True, slots=True)
class SourceTask:
    """A unit of tokenization work: a byte range (txt/jsonl) or row groups (parquet)."""

    path: str
    kind: str
    start: int
    stop: int
    size_bytes: int


def _kind_of(path: Path) -> str:
    kind = SUFFIX_KINDS.get(path.suffix.lower())
    if kind is None:
        raise PrepareInputError(
            f"{path}: unsupported input type {path.suffix!r}",
            hint="inputs must be .txt, .jsonl (a 'text' field) or .parquet (a 'text' column)",
        )
    return kind


def discover_inputs(paths: Iterable[Path | str]) -> list[Path]:
    """Files named, plus supported files under named directories; sorted, de-duplicated."""
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.update(
                p.resolve() for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIX_KINDS
            )
        elif path.is_file():
            _kind_of(path)
            found.add(path.resolve())
        else:
            raise PrepareInputError(f"input {path} does not exist", hint="check --input")
    if not found:
        raise PrepareInputError(
            "no input files found", hint="pass .txt, .jsonl or .parquet files or folders of them"
        )
    return sorted(found, key=lambda p: p.as_posix())


def parquet_module() -> Any:
    """``pyarrow.parquet``, imported only when a parquet input is used."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise PrepareInputError(
            "reading .parquet inputs needs pyarrow, which is not installed",
            hint="pip install 'tplr[parquet]' (or pyarrow), or convert the inputs to .jsonl",
        ) from exc
    return pq


def _jsonl_tasks(path: Path, size: int, task_bytes: int) -> list[SourceTask]:
    bounds = [0]
    with open(path, "rb") as fh:
        while bounds[-1] + task_bytes < size:
            fh.seek(bounds[-1] + task_bytes)
            fh.readline()  # move to the start of the next line
            position = fh.tell()
            if position >= size:
                break
            bounds.append(position)
    bounds.append(size)
    return [SourceTask(str(path), "jsonl", a, b, b - a) for a, b in itertools.pairwise(bounds)]


def _parquet_tasks(path: Path, size: int) -> list[SourceTask]:
    groups = parquet_module().ParquetFile(path).metadata.num_row_groups
    return [
        SourceTask(str(path), "parquet", g, g + 1, size // max(groups, 1)) for g in range(groups)
    ]


def plan_tasks(
    files: Iterable[Path], *, jsonl_task_bytes: int = JSONL_TASK_BYTES
) -> list[SourceTask]:
    tasks: list[SourceTask] = []
    for path in files:
        kind = _kind_of(path)
        size = path.stat().st_size
        if kind == "txt":
            tasks.append(SourceTask(str(path), "txt", 0, size, size))
        elif kind == "jsonl":
            tasks.extend(_jsonl_tasks(path, size, jsonl_task_bytes))
        else:
            tasks.extend(_parquet_tasks(path, size))
    return tasks


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PrepareInputError(
            f"{where}: not valid UTF-8 at byte {exc.start}",
            hint="re-encode the input as UTF-8",
        ) from exc


def _parse_line(line: bytes, where: str) -> Any:
    """One JSON value, nesting bounded before parsing (no RecursionError, no huge ints).

    NaN/Infinity in other fields are accepted as Python's json reads them: the input is
    the operator's own text, and only the ``text`` field is used."""
    depth = json_depth(line)
    if depth > MAX_JSONL_DEPTH:
        raise PrepareInputError(
            f"{where}: the JSON nests {depth} levels deep (at most {MAX_JSONL_DEPTH})",
            hint="each line must be a JSON object with a string text field",
        )
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise PrepareInputError(f"{where}: invalid JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of thousands of digits
        raise PrepareInputError(f"{where}: invalid JSON: {str(exc)[:200]}") from None


def _jsonl_documents(task: SourceTask, text_field: str) -> list[str]:
    with open(task.path, "rb") as fh:
        fh.seek(task.start)
        data = fh.read(task.stop - task.start)
    texts = []
    offset = task.start
    for line in data.split(b"\n"):
        where = f"{task.path} (line at byte {offset})"
        offset += len(line) + 1
        if not line.strip():
            continue
        record = _parse_line(line, where)
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise PrepareInputError(
                f"{where}: no string {text_field!r} field",
                hint=f"each line must be a JSON object with a {text_field!r} string",
            )
        texts.append(text)
    return texts


def _parquet_documents(task: SourceTask, text_field: str) -> list[str]:
    pq = parquet_module()
    parquet = pq.ParquetFile(task.path)
    if text_field not in parquet.schema_arrow.names:
        raise PrepareInputError(
            f"{task.path}: no {text_field!r} column (columns: {parquet.schema_arrow.names})",
            hint=f"inputs need a {text_field!r} string column",
        )
    texts = []
    for group in range(task.start, task.stop):
        column = parquet.read_row_group(group, columns=[text_field]).column(0)
        texts.extend(t for t in column.to_pylist() if t is not None)
    return texts


def read_documents(task: SourceTask, text_field: str = "text") -> list[str]:
    """The documents of one task, in file order."""
    if task.kind == "txt":
        with open(task.path, "rb") as fh:
            return [_decode(fh.read(), task.path)]
    if task.kind == "jsonl":
        return _jsonl_documents(task, text_field)
    return _parquet_documents(task, text_field)
