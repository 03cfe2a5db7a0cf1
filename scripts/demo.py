#!/usr/bin/env python
"""A short demo of the transfer engine on the embedded local store under ``./.tplr/``.

1. generate a file of random bytes (``--size``, default 96 MiB);
2. publish it with a manifest of per-part hashes into the local store (``tplr.comms.upload``);
3. fetch it back with the download engine: interrupt the first attempt halfway, then
   resume it, verifying every part against the manifest;
4. print the summaries and check the copy is bit-exact.

    .venv/bin/python scripts/demo.py [--size 256MiB] [--root .tplr]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from tplr.comms.buffers import TransferSlots
from tplr.comms.download.engine import download
from tplr.comms.manifest import MANIFEST_NAME, Manifest, build_manifest
from tplr.comms.stores.local import LocalStore
from tplr.comms.transfer_config import TransferConfig
from tplr.comms.upload import upload_file
from tplr.units import format_size, parse_size

PART_BYTES = 8 * 1024 * 1024
KEY = "demo/sample.bin"


def generate(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            chunk = os.urandom(min(left, 16 * 1024 * 1024))
            fh.write(chunk)
            left -= len(chunk)


async def publish(store: LocalStore, src: Path) -> Manifest:
    manifest = await asyncio.to_thread(build_manifest, src.parent, [src], part_size=PART_BYTES)
    result = await upload_file(store, src, KEY)
    await store.put(f"demo/{MANIFEST_NAME}", manifest.to_json().encode())
    print(f"published {store.url(KEY)}: {format_size(result.size)}, ETag {result.etag}")
    return manifest


class CancelHalfway:
    """A progress sink that cancels the download once half of its bytes have arrived."""

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.total = self.done = 0

    def start(self, description: str, total_bytes: int, done_bytes: int) -> None:
        self.total, self.done = total_bytes, done_bytes

    def advance(self, num_bytes: int) -> None:
        self.done += num_bytes
        if self.task is not None and self.done >= self.total // 2:
            self.task.cancel()
            self.task = None

    def close(self) -> None:
        return None


async def interrupted_fetch(store: LocalStore, manifest: Manifest, dest: Path) -> None:
    """Start a fetch of one part at a time and cancel it halfway (as Ctrl-C would)."""
    halfway = CancelHalfway()
    task = asyncio.create_task(
        download(store, KEY, dest, manifest=manifest, slots=TransferSlots(1), progress=halfway)
    )
    halfway.task = task
    try:
        await task
    except asyncio.CancelledError:
        journal = dest.with_name(dest.name + ".partial.journal")
        print(f"interrupted halfway; {journal.name} keeps the verified parts")


async def main(root: Path, size: int) -> int:
    src = root / "demo" / "src" / "sample.bin"
    dest = root / "demo" / "fetched" / "sample.bin"
    dest.unlink(missing_ok=True)
    generate(src, size)
    async with LocalStore(root / "store") as store:
        manifest = await publish(store, src)
        manifest = Manifest.from_json(await store.get(f"demo/{MANIFEST_NAME}"))
        await interrupted_fetch(store, manifest, dest)
        result = await download(
            store, KEY, dest, config=TransferConfig(), manifest=manifest, progress=False
        )
    print(
        f"fetched {result.path}: {format_size(result.size)} in {result.seconds:.2f} s"
        f" ({result.megabytes_per_second:.0f} MB/s this run), {result.parts_resumed} parts"
        f" resumed, {result.retries} retries, verified: {result.verified}"
    )
    same = src.read_bytes() == dest.read_bytes()
    print("bit-exact copy" if same else "COPY DIFFERS")
    return 0 if same else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("96MiB"))
    parser.add_argument("--root", type=Path, default=Path(".tplr"))
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.root, args.size)))
