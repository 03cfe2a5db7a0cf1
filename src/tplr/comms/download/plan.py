"""How an object is cut into parts and how many are fetched at once.

Defaults scale with the object so that no tuning is needed to fill a link:

- part size: ``size / 128`` rounded up to a whole MiB, kept within 8-64 MiB (a part is one
  ranged GET, so its latency is paid once per 8-64 MiB, and it is the unit that is
  verified, journaled and re-fetched on error). Objects up to 8 MiB are one part.
- workers: one per request, at most 128. Many parallel streams are what beats a
  per-stream bandwidth limit (one R2 stream across a WAN); each costs a 1 MiB receive
  buffer, never more with the object size. Measured on 2 cores: 128 streams of 16 MiB
  beat 64 of 32 MiB by ~20 % against per-stream-limited origins and lose ~8 % on an
  unlimited loopback.

A manifest fixes the part size (its per-part hashes are the verification unit), and so
does an MD5-based multipart ETag when its part size can be inferred (each part's MD5 is
then computed while it streams). When such fixed parts are too few for 64 streams, each
is fetched as several concurrent pieces of at least 8 MiB and hashed once it is whole.
``DOWNLOAD_PART_SIZE`` / ``DOWNLOAD_MAX_WORKERS`` (``--part-size`` / ``--workers``)
override the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024
MIN_AUTO_PART_BYTES = 8 * MiB
MAX_AUTO_PART_BYTES = 64 * MiB
MAX_AUTO_WORKERS = 128
STREAM_FALLBACK_BUFFER_BYTES = 1 * MiB  # get_range-only stores: memory = slots x this


@dataclass(frozen=True, slots=True)
class Part:
    index: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class DownloadPlan:
    size: int
    part_size: int
    workers: int
    piece_size: int = 0  # request size; parts larger than this are fetched in pieces

    @property
    def part_count(self) -> int:
        return -(-self.size // self.part_size)

    def part(self, index: int) -> Part:
        offset = index * self.part_size
        return Part(index, offset, min(self.part_size, self.size - offset))

    def parts(self) -> list[Part]:
        return [self.part(i) for i in range(self.part_count)]

    @property
    def request_count(self) -> int:
        piece = self.piece_size or self.part_size
        return sum(-(-p.length // piece) for p in self.parts())


def auto_part_size(size: int) -> int:
    """The default part size for an object of ``size`` bytes (see module doc)."""
    if size <= MIN_AUTO_PART_BYTES:
        return max(size, 1)
    per_worker = -(-size // MAX_AUTO_WORKERS)
    rounded = -(-per_worker // MiB) * MiB
    return min(max(rounded, MIN_AUTO_PART_BYTES), MAX_AUTO_PART_BYTES)


def piece_size_for(part_size: int, part_count: int, streams: int) -> int:
    """Cut parts imposed from outside into pieces (at least 8 MiB, whole MiB) until there
    are about ``streams`` requests: a 200 MiB shard with a manifest of 32 MiB parts is
    fetched as 25 requests of 8 MiB instead of 7 of 32 MiB."""
    if part_count >= streams or part_size <= MIN_AUTO_PART_BYTES:
        return part_size
    per_part = -(-streams // max(part_count, 1))
    share = -(-part_size // per_part)
    piece = -(-share // MiB) * MiB
    return min(part_size, max(piece, MIN_AUTO_PART_BYTES))


def plan_download(
    size: int,
    *,
    part_size: int | None = None,
    workers: int | None = None,
    fixed_part_size: int | None = None,
) -> DownloadPlan:
    """Choose part size, request (piece) size and worker count.

    ``fixed_part_size`` (from a manifest or the ETag) wins over ``part_size`` (configured),
    which wins over the size-based default. Only a fixed part size is cut into pieces; a
    configured one is also the request size. ``workers`` defaults to one per request, at
    most 128.
    """
    chosen = fixed_part_size or part_size or auto_part_size(size)
    part_count = -(-size // chosen)
    piece = chosen
    if fixed_part_size is not None:
        piece = piece_size_for(chosen, part_count, workers or MAX_AUTO_WORKERS)
    plan = DownloadPlan(size=size, part_size=chosen, workers=1, piece_size=piece)
    chosen_workers = workers or min(MAX_AUTO_WORKERS, max(plan.request_count, 1))
    return DownloadPlan(size=size, part_size=chosen, workers=chosen_workers, piece_size=piece)
