"""On-disk markers through which rank 0 tells the other local ranks about shards.

Rank 0 writes ``.tplr/ready-<index>.json`` (atomically) once every file of a shard is
verified, recording each file's size, mtime and inode; a marker whose files no longer
match (deleted, re-downloaded) is stale. ``.tplr/error-<index>.json`` carries a rank-0
failure so the other ranks raise it instead of waiting forever.

A local user can swap these files, so reading them is a trust boundary: a marker is read
without following a symlink, at most :data:`MAX_MARKER_BYTES`, as bounded JSON with a
checked shape. A malformed ready marker is stale (rank 0 verifies the files again, other
ranks keep waiting); a malformed error marker raises :class:`MarkerError`. The marker
folder itself must resolve under the dataset folder. Every function here does file I/O:
call it from a worker thread.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from tplr.errors import TplrError
from tplr.untrusted import MalformedInput, load_json, open_no_follow, resolve_under

log = logging.getLogger(__name__)

MARKER_DIR = ".tplr"
MAX_MARKER_BYTES = 1 << 20
MAX_ERROR_CHARS = 4000
_STAT_FIELDS = ("size", "mtime_ns", "inode")


class MarkerError(TplrError):
    """A marker file under the dataset folder is malformed or points outside it."""

    hint = "delete the dataset folder's .tplr/ directory; rank 0 writes fresh markers"


def _marker_path(local_dir: Path, kind: str, index: int) -> Path:
    try:
        return resolve_under(local_dir, f"{MARKER_DIR}/{kind}-{index}.json", what="marker")
    except MalformedInput as exc:
        raise MarkerError(exc.message) from None


def _name(local_dir: Path, path: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(local_dir).resolve())


def _stat_record(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp name: several processes may share one folder (the embedded store,
    # where every node reads the dataset in place) and write the same marker at once.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = open_no_follow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with open(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_marker(path: Path) -> object:
    """The JSON of a marker; FileNotFoundError when absent, MarkerError when malformed."""
    try:
        fd = open_no_follow(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a symlink was put in its place
        raise MarkerError(f"marker {path} cannot be opened: {exc.strerror}") from None
    with open(fd, "rb") as fh:
        data = fh.read(MAX_MARKER_BYTES + 1)
    try:
        return load_json(data, what=f"marker {path}", max_bytes=MAX_MARKER_BYTES, max_depth=4)
    except MalformedInput as exc:
        raise MarkerError(exc.message) from None


def write_ready(local_dir: Path, index: int, files: list[Path]) -> None:
    clear_error(local_dir, index)
    records = {_name(local_dir, p): _stat_record(p) for p in files}
    _write_json_atomic(_marker_path(local_dir, "ready", index), {"files": records})


def _recorded_files(document: object) -> dict[str, dict[str, int]] | None:
    """The ``files`` table of a ready marker, if it has the shape write_ready gives it."""
    if not isinstance(document, dict) or not isinstance(document.get("files"), dict):
        return None
    files = document["files"]
    for record in files.values():
        if not isinstance(record, dict) or set(record) != set(_STAT_FIELDS):
            return None
        if not all(type(record[name]) is int for name in _STAT_FIELDS):
            return None
    return files


def ready_is_valid(local_dir: Path, index: int, files: list[Path]) -> bool:
    """True when the marker exists and every file still matches what was verified.

    A missing, malformed or swapped marker is not valid (the files are verified again)."""
    try:
        recorded = _recorded_files(_read_marker(_marker_path(local_dir, "ready", index)))
        if recorded is None:
            log.warning("ignoring shard %d's malformed ready marker", index)
            return False
        for path in files:
            if recorded.get(_name(local_dir, path)) != _stat_record(path):
                return False
    except OSError:  # a file or the marker is gone: verify again
        return False
    except MarkerError as exc:
        log.warning("ignoring shard %d's ready marker: %s", index, exc.message)
        return False
    return len(recorded) == len(files)


def clear_ready(local_dir: Path, index: int) -> None:
    _marker_path(local_dir, "ready", index).unlink(missing_ok=True)


def write_error(local_dir: Path, index: int, message: str) -> None:
    text = message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 3] + "..."
    _write_json_atomic(_marker_path(local_dir, "error", index), {"error": text})


def read_error(local_dir: Path, index: int) -> str | None:
    """Rank 0's failure for shard ``index``; None when there is none (no marker).

    Raises :class:`MarkerError` for a marker that is there but malformed."""
    path = _marker_path(local_dir, "error", index)
    try:
        document = _read_marker(path)
    except FileNotFoundError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("error"), str):
        raise MarkerError(f"marker {path} is not an error marker written by rank 0")
    return document["error"][:MAX_ERROR_CHARS]


def clear_error(local_dir: Path, index: int) -> None:
    _marker_path(local_dir, "error", index).unlink(missing_ok=True)
