"""On-disk markers through which rank 0 tells the other local ranks about shards.

Rank 0 writes ``.tplr/ready-<index>.json`` (atomically) once every file of a shard is
verified, recording each file's size, mtime and inode; a marker whose files no longer
match (deleted, re-downloaded) is stale. ``.tplr/error-<index>.json`` carries a rank-0
failure so the other ranks raise it instead of waiting forever.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

MARKER_DIR = ".tplr"


def _marker_path(local_dir: Path, kind: str, index: int) -> Path:
    return local_dir / MARKER_DIR / f"{kind}-{index}.json"


def _name(local_dir: Path, path: Path) -> str:
    return os.path.relpath(path, local_dir)


def _stat_record(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp name: several processes may share one folder (the embedded store,
    # where every node reads the dataset in place) and write the same marker at once.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def write_ready(local_dir: Path, index: int, files: list[Path]) -> None:
    clear_error(local_dir, index)
    records = {_name(local_dir, p): _stat_record(p) for p in files}
    _write_json_atomic(_marker_path(local_dir, "ready", index), {"files": records})


def ready_is_valid(local_dir: Path, index: int, files: list[Path]) -> bool:
    """True when the marker exists and every file still matches what was verified."""
    marker = _marker_path(local_dir, "ready", index)
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))["files"]
        for p in files:
            if recorded.get(_name(local_dir, p)) != _stat_record(p):
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return len(recorded) == len(files)


def clear_ready(local_dir: Path, index: int) -> None:
    _marker_path(local_dir, "ready", index).unlink(missing_ok=True)


def write_error(local_dir: Path, index: int, message: str) -> None:
    _write_json_atomic(_marker_path(local_dir, "error", index), {"error": message})


def read_error(local_dir: Path, index: int) -> str | None:
    try:
        data = json.loads(_marker_path(local_dir, "error", index).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(data.get("error", "unknown error"))


def clear_error(local_dir: Path, index: int) -> None:
    _marker_path(local_dir, "error", index).unlink(missing_ok=True)
