"""Verifying a downloaded file against an MD5-based S3/R2 ETag.

- A single PUT's ETag is the hex MD5 of the object.
- A multipart object's ETag is ``md5(concat(part md5 digests))-N``. R2 (and S3 clients)
  use equal parts except a smaller last one, but the ETag does not say how large: the
  part size is inferred from ``N`` and the size, trying the sizes common tools use and
  the smallest size that fits; a part size ``p`` is possible only if
  ``(N - 1) * p < size <= N * p``.
- Anything else (no MD5 form, e.g. SSE-KMS objects or a plain web server) cannot be
  verified this way; the caller says so and falls back to the size check.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
MB = 1000 * 1000
_READ_CHUNK_BYTES = 8 * MiB
_ETAG_RE = re.compile(r"^([0-9a-f]{32})(?:-(\d+))?$")
# Part sizes of common uploaders: boto3/aws-cli (8 MiB), rclone (5 MiB), R2 dashboard and
# wrangler, s3cmd (15 MiB), minio-go (16 MiB), tplr's own uploads (64 MiB), and round MBs.
COMMON_PART_SIZES = (
    *(n * MiB for n in (5, 8, 10, 15, 16, 20, 25, 32, 50, 64, 100, 128, 256, 512, 1024)),
    *(n * MB for n in (5, 8, 10, 16, 20, 25, 50, 64, 100, 128, 256, 500)),
)


@dataclass(frozen=True, slots=True)
class Md5Etag:
    """An ETag in MD5 form. ``parts`` is None for a single PUT, else the part count."""

    digest: str
    parts: int | None

    @property
    def text(self) -> str:
        return self.digest if self.parts is None else f"{self.digest}-{self.parts}"


def parse_md5_etag(etag: str) -> Md5Etag | None:
    """The MD5 form of ``etag``, or None if it has none (then it cannot be verified)."""
    match = _ETAG_RE.match(etag.strip().strip('"').lower())
    if not match:
        return None
    parts = int(match.group(2)) if match.group(2) else None
    if parts == 0:
        return None
    return Md5Etag(match.group(1), parts)


def part_size_candidates(size: int, parts: int) -> list[int]:
    """Plausible equal part sizes for a ``parts``-part object of ``size`` bytes, likeliest first."""
    if parts == 1:
        return [max(size, 1)]

    def fits(p: int) -> bool:
        return p > 0 and (parts - 1) * p < size <= parts * p

    smallest = -(-size // parts)
    derived = [
        -(-smallest // MiB) * MiB,  # tools that round the part size up to a MiB
        -(-smallest // MB) * MB,
        smallest,
    ]
    found: list[int] = []
    for candidate in (*COMMON_PART_SIZES, *derived):
        if fits(candidate) and candidate not in found:
            found.append(candidate)
    return found


def multipart_etag_of(part_md5s: list[str]) -> str:
    joined = b"".join(bytes.fromhex(d) for d in part_md5s)
    return f"{hashlib.md5(joined).hexdigest()}-{len(part_md5s)}"


def _md5_of_range(fd: int, offset: int, length: int) -> str:
    hasher = hashlib.md5()
    while length > 0:
        chunk = os.pread(fd, min(_READ_CHUNK_BYTES, length), offset)
        if not chunk:
            raise OSError(f"the file is shorter than expected at offset {offset}")
        hasher.update(chunk)  # releases the GIL: parts hash in parallel threads
        offset += len(chunk)
        length -= len(chunk)
    return hasher.hexdigest()


def part_md5s_of_file(fd: int, size: int, part_size: int, threads: int = 2) -> list[str]:
    ranges = [(off, min(part_size, size - off)) for off in range(0, size, part_size)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda r: _md5_of_range(fd, *r), ranges))


def file_matches_etag(
    source: Path | int, size: int, etag: Md5Etag, *, skip_part_sizes: tuple[int, ...] = ()
) -> int | None:
    """Read ``source`` (a path, or an open file descriptor, which is not closed) and
    compare it with ``etag``. Blocking (run it in a thread).

    Returns the matching part size (the size itself for a single-part ETag), or None
    when no candidate matches. ``skip_part_sizes`` were already checked by the caller.
    """
    if not isinstance(source, int):
        fd = os.open(source, os.O_RDONLY)
        try:
            return file_matches_etag(fd, size, etag, skip_part_sizes=skip_part_sizes)
        finally:
            os.close(fd)
    if etag.parts is None:
        return size if _md5_of_range(source, 0, size) == etag.digest else None
    for candidate in part_size_candidates(size, etag.parts):
        if candidate in skip_part_sizes:
            continue
        if multipart_etag_of(part_md5s_of_file(source, size, candidate)) == etag.text:
            return candidate
    return None
