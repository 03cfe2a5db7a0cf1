#!/usr/bin/env python
"""What resume re-verification costs: re-hashing a fully journaled download from disk.

Writes a sidecar of ``--size`` random bytes and a journal that records every part as
complete, then opens the sidecar as a resumed download does (every journaled part hashed
again before it is trusted), from the page cache ("warm") and after dropping this file's
cached pages ("cold", ``posix_fadvise``; other files' caches are untouched), with xxh3
alone and with MD5 too (what a multipart-ETag check needs).

    .venv/bin/python scripts/bench_reverify.py              # 1 GiB, 32 MiB parts
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import xxhash

from tplr.comms.download.journal import JournalHeader, JournalWriter, PartRecord
from tplr.comms.download.sidecar import Sidecar, sidecar_paths
from tplr.units import parse_size


def journal_everything(journal: Path, header: JournalHeader, data: bytes, md5: bool) -> None:
    import hashlib

    records = []
    for index in range(header.part_count):
        part = data[index * header.part_size : (index + 1) * header.part_size]
        digest = hashlib.md5(part).hexdigest() if md5 else None
        records.append(PartRecord(index, xxhash.xxh3_128_hexdigest(part), digest))
    writer = JournalWriter.create(journal, header)
    writer.append(records)
    writer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--part-size", type=parse_size, default=parse_size("32MiB"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tplr-bench-reverify"))
    args = parser.parse_args()
    dest = args.workdir / "shard.bin"
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial, journal = sidecar_paths(dest)
    data = np.random.default_rng(1).bytes(args.size)
    partial.write_bytes(data)
    header = JournalHeader("bench", args.size, "etag", args.part_size)
    for md5 in (False, True):
        for cache in ("warm", "cold"):
            journal_everything(journal, header, data, md5)
            if cache == "cold":
                os.sync()
                fd = os.open(partial, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            sidecar = Sidecar(dest, header)
            resumed = sidecar.open(lambda _path: 1 << 50, md5=md5)
            sidecar.close()
            assert len(resumed.done) == header.part_count
            rate = resumed.verified_bytes / 1e6 / resumed.verify_seconds
            what = "xxh3 + MD5" if md5 else "xxh3"
            print(f"{what:10s} {cache}: {resumed.verified_bytes / 2**20:.0f} MiB re-verified in"
                  f" {resumed.verify_seconds:.2f} s ({rate:.0f} MB/s)")  # fmt: skip
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
