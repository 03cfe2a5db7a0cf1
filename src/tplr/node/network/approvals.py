"""Publishing, waiting for and fetching the lead's approvals (the rules: protocol/approval).

The lead publishes ``approvals/{w}.json`` and copies the approved payload bytes to
``approved/{w}/{uid}.safetensors`` in its own bucket, the copies first, so a reader never
sees an approval whose payloads are missing. Every other node reads the approval (waiting
for it, bounded), fetches the copies from the lead (never from the miners: a miner could
swap its bytes after approval or answer different nodes differently), checks each against
the approved SHA-256 and size, and decodes it with the full payload checks. Anything that
does not match is an :class:`ApprovalUnavailable`: the node does not apply a partial set;
it resyncs from the lead's checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from tplr.comms.errors import NotFound, StoreError
from tplr.comms.stores.base import ObjectStore
from tplr.comms.transfer_config import TransferConfig
from tplr.comms.transfer_metrics import TransferMetrics
from tplr.comms.upload import upload_bytes
from tplr.errors import TplrError
from tplr.node.network.gather import PayloadFetcher
from tplr.protocol.approval import (
    MAX_APPROVAL_BYTES,
    Approval,
    ApprovalInvalid,
    approval_key,
    mirror_key,
    parse_approval,
)
from tplr.protocol.clock import WindowClock
from tplr.protocol.commitments import payload_sha256
from tplr.protocol.payload import (
    GradientPayload,
    PayloadExpectation,
    PayloadRejected,
    PayloadSchema,
    decode_payload,
)
from tplr.protocol.reasons import RejectReason

log = logging.getLogger(__name__)


class ApprovalUnavailable(TplrError):
    """The approved set of a window cannot be applied exactly (missing, broken, mismatched)."""

    hint = "the node loads the lead validator's next checkpoint instead of guessing"


async def publish_approval(
    store: ObjectStore,
    approval: Approval,
    payloads: Mapping[int, bytes],
    *,
    transfer: TransferConfig,
    metrics: TransferMetrics | None = None,
) -> None:
    """Mirror the approved payloads (concurrently), then write the approval."""
    async with asyncio.TaskGroup() as tasks:
        for uid in approval.approved_uids():
            tasks.create_task(
                upload_bytes(
                    store,
                    payloads[uid],
                    mirror_key(approval.window, uid),
                    config=transfer,
                    metrics=metrics,
                )
            )
    await upload_bytes(store, approval.to_json(), approval_key(approval.window), config=transfer)


async def read_approval(store: ObjectStore, *, run_id: str, window: int) -> Approval:
    """The approval of ``window``; ``NotFound`` until the lead has published it."""
    key = approval_key(window)
    info = await store.head(key)
    if info.size > MAX_APPROVAL_BYTES:
        raise ApprovalInvalid(f"{store.url(key)} is {info.size} bytes: too large")
    return parse_approval(await store.get(key), run_id=run_id, window=window, source=store.url(key))


async def wait_for_approval(
    store: ObjectStore,
    *,
    run_id: str,
    window: int,
    windows: WindowClock,
    give_up_at_s: float,
    interval_s: float,
) -> Approval | None:
    """Poll from the approval deadline of ``window`` until ``give_up_at_s``; None if absent.

    Transient store errors count as "not yet"; a broken approval raises ApprovalInvalid."""
    await windows.sleep_until(min(windows.approval_deadline_s(window), give_up_at_s))
    while True:
        try:
            return await read_approval(store, run_id=run_id, window=window)
        except NotFound:
            pass
        except StoreError as exc:
            if not exc.retryable:
                raise
            log.info("window %d: approval not readable yet: %s", window, exc.message)
        remaining_s = windows.seconds_until(give_up_at_s)
        if remaining_s <= 0:
            return None
        await windows.clock.sleep(min(interval_s, remaining_s))


async def fetch_approved(
    fetcher: PayloadFetcher,
    lead_store: ObjectStore,
    approval: Approval,
    schema: PayloadSchema,
    *,
    run_id: str,
) -> dict[int, GradientPayload]:
    """The approved payloads from the lead's mirror, each checked; ApprovalUnavailable else."""

    async def one(uid: int) -> GradientPayload:
        entry = approval.entry(uid)
        fetched = await fetcher.fetch_object(
            lead_store,
            mirror_key(approval.window, uid),
            max_bytes=min(entry.bytes, schema.max_bytes),
            reason=RejectReason.TOO_LARGE,
        )
        if payload_sha256(fetched.data) != entry.sha256 or len(fetched.data) != entry.bytes:
            raise ApprovalUnavailable(
                f"the lead's copy of uid {uid}'s payload for window {approval.window} does not "
                "match the approved hash"
            )
        expect = PayloadExpectation(
            run_id=run_id, window=approval.window, uid=uid, base_digest=approval.base_digest
        )
        return await asyncio.to_thread(decode_payload, fetched.data, schema, expect)

    payloads: dict[int, GradientPayload] = {}
    try:
        async with asyncio.TaskGroup() as tasks:
            jobs = {uid: tasks.create_task(one(uid)) for uid in approval.approved_uids()}
    except* (StoreError, PayloadRejected, ApprovalUnavailable) as group:
        first = group.exceptions[0]
        raise ApprovalUnavailable(
            f"window {approval.window}: an approved payload cannot be used: {first}"
        ) from None
    for uid, job in jobs.items():
        payloads[uid] = job.result()
    return payloads
