"""Host and bucket probes of ``tplr doctor``: clock skew, bucket rights, free disk, GPU memory."""

from __future__ import annotations

import asyncio
import email.utils
import secrets
import time
from pathlib import Path

import aiohttp

from tplr.comms.config import BucketConfig
from tplr.comms.diskspace import FreeSpaceProbe, free_bytes
from tplr.comms.errors import AccessDenied, StoreError
from tplr.comms.stores.base import ObjectStore
from tplr.comms.stores.s3 import S3Store
from tplr.comms.transfer_config import TransferConfig
from tplr.doctor.report import CheckResult, fail, failure_of, ok, skip, warn
from tplr.units import format_size

PROBE_PREFIX = "doctor/"


async def clock_skew_s(endpoint: str, bucket: str, *, timeout_s: float = 10.0) -> float:
    """Seconds the store's clock is ahead of ours (from its ``Date`` header; negative: behind).

    An unsigned HEAD of the bucket is enough: S3 and R2 stamp every answer, a 403 included.
    """
    url = f"{endpoint.rstrip('/')}/{bucket}"
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    started = time.time()
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.head(url, allow_redirects=False) as response,
        ):
            date = response.headers.get("Date")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise StoreError(
            f"no answer from {url}: {type(exc).__name__}: {exc}",
            hint="check the endpoint URL, DNS and firewalls",
        ) from None
    finished = time.time()
    if not date:
        raise StoreError(f"{url} sent no Date header", hint="is this an S3 endpoint?")
    try:
        server_s = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        raise StoreError(f"{url} sent an unreadable Date header {date[:60]!r}") from None
    # Date has one-second resolution: compare with the middle of the request, allow 1 s.
    return server_s - (started + finished) / 2


async def check_clock(variable: str, config: BucketConfig, max_skew_s: float) -> CheckResult:
    name = f"clock ({variable})"
    endpoint = config.resolved_endpoint()
    skew = await clock_skew_s(endpoint, config.bucket_name)
    where = "ahead of" if skew > 0 else "behind"
    detail = f"the store's clock is {abs(skew):.1f}s {where} this host ({endpoint})"
    if abs(skew) > max_skew_s:
        return fail(
            name,
            f"{detail}; more than {max_skew_s:g}s: upload times are judged by the store's "
            "clock, so enable NTP time sync (timedatectl set-ntp true)",
        )
    return ok(name, detail)


async def check_write_rights(
    name: str, store: ObjectStore, *, uid: int, read_store: ObjectStore | None = None
) -> list[CheckResult]:
    """Put, get and delete a probe object; the peers' read key must read it, not write."""
    key = f"{PROBE_PREFIX}{uid}-{secrets.token_hex(4)}.probe"
    body = secrets.token_bytes(32)
    try:
        await store.put(key, body)
    except AccessDenied as exc:
        return [failure_of(f"{name} write", exc)]
    results: list[CheckResult] = []
    try:
        if await store.get(key) != body:
            return [fail(f"{name} write", f"{store.url(key)} read back different bytes")]
        results.append(ok(f"{name} write", f"put, get and delete of {store.url(key)} work"))
        if read_store is not None:
            results.append(await _check_read_key(name, read_store, key, body))
    finally:
        await store.delete(key)
    return results


async def _check_read_key(name: str, read_store: ObjectStore, key: str, body: bytes):
    try:
        if await read_store.get(key) != body:
            return fail(f"{name} read key", "the read key sees different bytes")
    except AccessDenied as exc:
        return failure_of(f"{name} read key", exc)
    try:
        await read_store.put(key + ".by-read-key", b"")
    except AccessDenied:
        return ok(f"{name} read key", "reads, and may not write (as peers need)")
    await read_store.delete(key + ".by-read-key")
    return warn(
        f"{name} read key",
        "the READ_* key may also write: peers holding it could overwrite your objects; "
        "give them a read-only token",
    )


async def check_read_rights(name: str, store: ObjectStore, prefix: str) -> CheckResult:
    count = 0
    async for _ in store.list(prefix):
        count += 1
        if count >= 1000:
            break
    shown = "1000+" if count >= 1000 else str(count)
    if count == 0:
        return warn(name, f"read works, but nothing under {store.url(prefix)}")
    return ok(name, f"read works: {shown} object(s) under {store.url(prefix)}")


def existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


async def check_free_disk(
    directory: Path, needed_bytes: int, margin_bytes: int, probe: FreeSpaceProbe | None
) -> CheckResult:
    where = existing_parent(directory)
    free = await asyncio.to_thread(probe or free_bytes, where)
    wanted = needed_bytes + margin_bytes
    detail = (
        f"{format_size(free)} free at {where}; the next shard needs {format_size(needed_bytes)} "
        f"+ {format_size(margin_bytes)} margin"
    )
    if free < wanted:
        return fail(
            "disk",
            f"{detail}: short by {format_size(wanted - free)} (free space, move "
            "DATASET_LOCAL_DIR to a larger disk, or lower DATASET_DISK_MARGIN)",
        )
    return ok("disk", detail)


def rough_training_memory_bytes(parameters: int, *, tokens_per_micro_batch: int, d_model: int,
                                n_layer: int) -> int:  # fmt: skip
    """A LOCAL, rough estimate until tplr.train ships its memory estimator: fp32 weights,
    gradients, AdamW moments, error feedback, snapshot and Δ (7 x 4 bytes per parameter),
    plus activations of one micro-batch (~34 bytes per token, layer and model width)."""
    return 28 * parameters + 34 * tokens_per_micro_batch * d_model * n_layer


def gpu_summary() -> tuple[int, list[tuple[str, int]]]:
    """``(count, [(name, total bytes)])`` of the CUDA devices this process can see."""
    import torch

    if not torch.cuda.is_available():
        return 0, []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append((props.name, int(props.total_memory)))
    return len(devices), devices


def open_bucket(config: BucketConfig, transfer: TransferConfig) -> S3Store:
    return S3Store(config, transfer, max_connections=4)


def skipped_clock() -> CheckResult:
    return skip("clock", "no remote store configured (embedded store): nothing to compare")
