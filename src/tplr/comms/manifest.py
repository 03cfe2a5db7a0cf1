"""The dataset manifest: sizes and per-part hashes of the files under a prefix.

Format (JSON, ``manifest.json`` beside the files it describes)::

    {
      "format": "tplr-manifest",
      "version": 1,
      "hash": "xxh3_128",            # per-part hash algorithm, hex digests
      "part_size": 33554432,         # bytes per part; the last part may be shorter
      "files": {
        "train_000000.npy": {
          "size": 123456789,
          "parts": ["9f0c…", …],     # ceil(size / part_size) digests, in order
          …                          # optional metadata: tokens, dtype, max_token_id, …
        }
      }
    }

Keys in ``files`` are relative to the manifest's own directory/prefix and use ``/``.
Readers ignore unknown fields, so later versions can add metadata.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tplr.comms.errors import IntegrityError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tplr-manifest"
MANIFEST_VERSION = 1
HASH_ALGORITHM = "xxh3_128"
DEFAULT_PART_SIZE = 32 * 1024 * 1024
_READ_CHUNK = 4 * 1024 * 1024


def new_part_hasher() -> xxhash.xxh3_128:
    """A streaming hasher for one part (update with bytes, then ``hexdigest()``)."""
    return xxhash.xxh3_128()


def hash_bytes(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


class ManifestEntry(BaseModel):
    """One file. Extra fields (token metadata) are kept as given."""

    model_config = ConfigDict(extra="allow")

    size: int = Field(ge=0)
    parts: list[str]

    def part_count(self, part_size: int) -> int:
        return -(-self.size // part_size)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION
    hash: str = HASH_ALGORITHM
    part_size: int = Field(default=DEFAULT_PART_SIZE, gt=0)
    files: dict[str, ManifestEntry] = Field(default_factory=dict)

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = "manifest") -> Manifest:
        try:
            manifest = cls.model_validate_json(data)
        except ValidationError as exc:
            raise IntegrityError(
                f"{source} is not a valid tplr manifest: {exc.errors()[0]['msg']}",
                location=source,
                hint="regenerate it with `tplr manifest DIR`",
            ) from exc
        if manifest.format != MANIFEST_FORMAT or manifest.version > MANIFEST_VERSION:
            raise IntegrityError(
                f"{source} has format {manifest.format!r} version {manifest.version}; "
                f"this tplr reads {MANIFEST_FORMAT!r} up to version {MANIFEST_VERSION}",
                location=source,
                hint="upgrade tplr or regenerate the manifest",
            )
        if manifest.hash != HASH_ALGORITHM:
            raise IntegrityError(
                f"{source} uses hash {manifest.hash!r}; only {HASH_ALGORITHM!r} is supported",
                location=source,
            )
        for key, entry in manifest.files.items():
            if len(entry.parts) != entry.part_count(manifest.part_size):
                raise IntegrityError(
                    f"{source}: {key} has {len(entry.parts)} part hashes, expected "
                    f"{entry.part_count(manifest.part_size)} for {entry.size} bytes",
                    location=source,
                    hint="regenerate it with `tplr manifest DIR`",
                )
        return manifest

    def to_json(self) -> str:
        return self.model_dump_json(indent=1) + "\n"

    def entry(self, key: str) -> ManifestEntry:
        try:
            return self.files[key]
        except KeyError:
            raise IntegrityError(f"the manifest has no entry for {key!r}", location=key) from None

    def part_range(self, key: str, index: int) -> tuple[int, int]:
        """``(offset, length)`` of part ``index`` of ``key``."""
        size = self.entry(key).size
        offset = index * self.part_size
        return offset, min(self.part_size, size - offset)


def hash_file_parts(path: Path, part_size: int) -> tuple[int, list[str]]:
    """Size and per-part xxh3-128 digests of a local file (streamed, bounded memory)."""
    size = path.stat().st_size
    digests: list[str] = []
    buf = bytearray(min(_READ_CHUNK, max(part_size, 1)))
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        remaining = size
        while remaining > 0:
            hasher = new_part_hasher()
            part_left = min(part_size, remaining)
            while part_left > 0:
                n = fh.readinto(view[: min(len(buf), part_left)])
                if not n:
                    raise IntegrityError(f"{path} shrank while hashing", location=str(path))
                hasher.update(view[:n])
                part_left -= n
                remaining -= n
            digests.append(hasher.hexdigest())
    return size, digests


def build_manifest(
    root: Path,
    files: Iterable[Path] | None = None,
    *,
    part_size: int = DEFAULT_PART_SIZE,
    workers: int | None = None,
    metadata: dict[str, dict] | None = None,
) -> Manifest:
    """Hash ``files`` (default: every regular file under ``root`` except the manifest)."""
    root = Path(root)
    if files is None:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    paths = [Path(p) for p in files]
    keys = [p.relative_to(root).as_posix() for p in paths]
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda p: hash_file_parts(p, part_size), paths))
    metadata = metadata or {}
    entries = {
        key: ManifestEntry(size=size, parts=parts, **metadata.get(key, {}))
        for key, (size, parts) in zip(keys, results, strict=True)
    }
    return Manifest(part_size=part_size, files=dict(sorted(entries.items())))


def write_manifest_atomic(manifest: Manifest, path: Path) -> None:
    """Write ``path`` via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(manifest.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def read_manifest(path: Path) -> Manifest:
    path = Path(path)
    return Manifest.from_json(path.read_bytes(), source=str(path))
