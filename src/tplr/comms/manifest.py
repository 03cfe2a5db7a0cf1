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
from typing import Annotated, Any

import xxhash
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from tplr.comms.errors import IntegrityError
from tplr.untrusted import MalformedInput, check_key, load_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tplr-manifest"
MANIFEST_VERSION = 1
HASH_ALGORITHM = "xxh3_128"
DEFAULT_PART_SIZE = 32 * 1024 * 1024
_READ_CHUNK = 4 * 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
"""A manifest larger than this is refused unread (2 TB in 32 MiB parts is ~2.4 MB)."""
MAX_MANIFEST_DEPTH = 16
MAX_OBJECT_BYTES = 1 << 50
MAX_PART_SIZE = 1 << 40
_PART_DIGEST = r"^[0-9a-f]{1,128}$"
_MAX_TEXT_FIELD = 64
# Optional metadata that readers act on (token counts, vocabulary, format): typed here, at the
# edge, so no reader ever meets ``"abc"`` where a count belongs. Other fields pass as given.
COUNT_FIELDS = (
    "tokens",
    "sequences",
    "seq_len",
    "max_token_id",
    "shard_index",
    "vocab_size",
    "eot_token_id",
    "shards",
    "val_shards",
)
TEXT_FIELDS = ("format", "dtype", "tokenizer")
DATASET_SECTION = "dataset"


class ManifestError(IntegrityError):
    """A manifest is malformed: bad JSON, a wrong type, an unsafe key, inconsistent parts."""

    hint = "regenerate it with `tplr manifest DIR` (or `tplr shards prepare`/`convert`)"


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def describe_validation_error(exc: ValidationError) -> str:
    """The first problem of a pydantic error as ``field.path: message`` (bounded)."""
    first = exc.errors()[0]
    where = "".join(
        f"[{part!r}]" if isinstance(part, int) or "." in str(part) else f".{part}"
        for part in first["loc"]
    ).lstrip(".")
    return f"{where or 'document'}: {str(first['msg'])[:200]}"


def check_metadata(fields: dict[str, Any] | None, *, source: str, within: str = "") -> None:
    """The known metadata fields of ``fields`` have the right types (others pass as given).

    ``within`` names where the fields sit (``"dataset."``), for the error message."""
    for name, value in (fields or {}).items():
        if value is None:
            continue
        problem = None
        if name in COUNT_FIELDS and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62
        ):
            problem = "must be a whole number >= 0"
        elif name in TEXT_FIELDS and (not isinstance(value, str) or len(value) > _MAX_TEXT_FIELD):
            problem = f"must be a string of at most {_MAX_TEXT_FIELD} characters"
        if problem is not None:
            raise ManifestError(
                f"{source}: {within}{name} {problem}, got {_shown(value)}", location=source
            )


def _shown(value: object) -> str:
    text = repr(value) if isinstance(value, str | int | float) else _json_type(value)
    return text if len(text) <= 60 else text[:57] + "..."


def new_part_hasher() -> xxhash.xxh3_128:
    """A streaming hasher for one part (update with bytes, then ``hexdigest()``)."""
    return xxhash.xxh3_128()


def hash_bytes(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


class ManifestEntry(BaseModel):
    """One file. Extra fields (token metadata) are kept as given."""

    model_config = ConfigDict(extra="allow")

    size: int = Field(ge=0, le=MAX_OBJECT_BYTES)
    parts: list[Annotated[str, StringConstraints(pattern=_PART_DIGEST)]]

    def part_count(self, part_size: int) -> int:
        return -(-self.size // part_size)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION
    hash: str = HASH_ALGORITHM
    part_size: int = Field(default=DEFAULT_PART_SIZE, gt=0, le=MAX_PART_SIZE)
    files: dict[str, ManifestEntry] = Field(default_factory=dict)

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = "manifest") -> Manifest:
        """Parse an untrusted manifest: bounded size and depth, strict types, safe keys.

        Raises :class:`ManifestError` naming ``source`` and the offending field.
        """
        try:
            document = load_json(
                data, what=source, max_bytes=MAX_MANIFEST_BYTES, max_depth=MAX_MANIFEST_DEPTH
            )
        except MalformedInput as exc:
            raise ManifestError(exc.message, location=source) from None
        if not isinstance(document, dict):
            raise ManifestError(
                f"{source} must hold a JSON object, not a {_json_type(document)}",
                location=source,
            )
        try:
            manifest = cls.model_validate(document, strict=True)
        except ValidationError as exc:
            raise ManifestError(
                f"{source} is not a valid tplr manifest: {describe_validation_error(exc)}",
                location=source,
            ) from None
        manifest._check(source)
        return manifest

    def _check(self, source: str) -> None:
        if self.format != MANIFEST_FORMAT or self.version > MANIFEST_VERSION:
            raise ManifestError(
                f"{source} has format {self.format[:40]!r} version {self.version}; "
                f"this tplr reads {MANIFEST_FORMAT!r} up to version {MANIFEST_VERSION}",
                location=source,
                hint="upgrade tplr or regenerate the manifest",
            )
        if self.hash != HASH_ALGORITHM:
            raise ManifestError(
                f"{source} uses hash {self.hash[:40]!r}; only {HASH_ALGORITHM!r} is supported",
                location=source,
            )
        check_metadata(self.model_extra, source=source)
        section = (self.model_extra or {}).get(DATASET_SECTION)
        if section is not None:
            if not isinstance(section, dict):
                raise ManifestError(
                    f"{source}: {DATASET_SECTION} must be an object, not a {_json_type(section)}",
                    location=source,
                )
            check_metadata(section, source=source, within=f"{DATASET_SECTION}.")
        for key, entry in self.files.items():
            try:
                check_key(key, what="file key")
            except MalformedInput as exc:
                raise ManifestError(f"{source}: {exc.message}", location=source) from None
            check_metadata(entry.model_extra, source=source, within=f"files[{key!r}].")
            if len(entry.parts) != entry.part_count(self.part_size):
                raise ManifestError(
                    f"{source}: {key} has {len(entry.parts)} part hashes, expected "
                    f"{entry.part_count(self.part_size)} for {entry.size} bytes",
                    location=source,
                )

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
