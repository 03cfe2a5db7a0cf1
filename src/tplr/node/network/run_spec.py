"""Publishing and reading ``run.json`` (the model and its rules: :mod:`tplr.protocol.run_spec`).

Creation is write-if-absent and atomic: ``ObjectStore.put_if_absent`` (S3 ``PutObject``
with ``If-None-Match: *``, supported by AWS S3 and Cloudflare R2; a hard link on a local
directory). When two creators race, exactly one wins and the other adopts its spec.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tplr.comms.errors import AlreadyExists
from tplr.comms.stores.base import ObjectStore
from tplr.protocol.run_spec import MAX_RUN_SPEC_BYTES, RUN_SPEC_KEY, RunSpec, RunSpecInvalid

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PublishedRunSpec:
    spec: RunSpec  # the spec in effect (ours, or the one already there)
    created: bool  # True if this call wrote run.json
    location: str


async def read_run_spec(store: ObjectStore, key: str = RUN_SPEC_KEY) -> RunSpec:
    """Read and validate run.json; ``NotFound`` if it is not there yet."""
    info = await store.head(key)
    if info.size > MAX_RUN_SPEC_BYTES:
        raise RunSpecInvalid(
            f"{store.url(key)} is {info.size} bytes, a run spec is at most {MAX_RUN_SPEC_BYTES}"
        )
    data = await store.get(key)
    return RunSpec.from_json(data, source=store.url(key))


async def publish_run_spec(
    store: ObjectStore,
    spec: RunSpec,
    *,
    key: str = RUN_SPEC_KEY,
) -> PublishedRunSpec:
    """Create run.json unless it exists; never overwrite. Returns the spec in effect."""
    location = store.url(key)
    try:
        await store.put_if_absent(key, spec.to_json())
    except AlreadyExists:
        existing = await read_run_spec(store, key)
        log.info("run.json already exists at %s; using run %s", location, existing.run_id)
        return PublishedRunSpec(existing, created=False, location=location)
    log.info("created run.json at %s for run %s", location, spec.run_id)
    return PublishedRunSpec(spec, created=True, location=location)
