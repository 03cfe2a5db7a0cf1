"""Fetching peers' payloads for a window, each within a deadline, then validating them.

:class:`PayloadFetcher` fetches ``gradients/{w}/{uid}.safetensors`` from every uid's store
concurrently (bounded), each peer inside its own ``asyncio.timeout``: HEAD first (the
size limit is enforced before any byte is downloaded; LastModified is kept for the
upload-time check), then one GET pinned to the HEAD's ETag, so a payload replaced
meanwhile is fetched again rather than mixed. Every request goes through the one retry
policy. A peer that fails is recorded with a low-cardinality reason and never stops the
others.

Validation is separate (:func:`validate_fetched`), because the same bytes are checked two
ways: for aggregation (identical rules on every node, so all nodes keep the same model)
and, by validators, additionally against the recomputed sample digest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tplr.comms.download_source import fetch_whole_object
from tplr.comms.errors import NotFound, PreconditionFailed, StoreError
from tplr.comms.retry import RetryPolicy, retry
from tplr.comms.store import ObjectInfo
from tplr.comms.transfer_metrics import TransferMetrics
from tplr.node.clock import WindowClock
from tplr.node.directory import PeerDirectory, UnknownPeer
from tplr.node.payload import (
    GradientPayload,
    PayloadExpectation,
    PayloadRejected,
    PayloadSchema,
    RejectReason,
    check_payload_size,
    decode_payload,
    payload_key,
)
from tplr.node.settings import GatherConfig

log = logging.getLogger(__name__)

TIMEOUT = "timeout"
UNREACHABLE = "unreachable"
UNKNOWN_PEER = "unknown_peer"
CHANGED = "changed"
FETCH_FAILURE_REASONS = (TIMEOUT, UNREACHABLE, UNKNOWN_PEER, CHANGED)
"""Reasons besides :class:`RejectReason` for which a peer's payload is not used."""


@dataclass(frozen=True, slots=True)
class FetchedPayload:
    uid: int
    data: bytes
    info: ObjectInfo


@dataclass
class FetchOutcome:
    window: int
    fetched: dict[int, FetchedPayload] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)  # posted nothing
    failures: dict[int, str] = field(default_factory=dict)  # uid -> reason label
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(len(item.data) for item in self.fetched.values())

    def subset(self, uids: Iterable[int]) -> FetchOutcome:
        """The outcome restricted to ``uids`` (uids never fetched are absent)."""
        wanted = set(uids)
        return FetchOutcome(
            window=self.window,
            fetched={u: p for u, p in self.fetched.items() if u in wanted},
            missing=[u for u in self.missing if u in wanted],
            failures={u: r for u, r in self.failures.items() if u in wanted},
            seconds=self.seconds,
        )

    def covers(self, uids: Iterable[int]) -> bool:
        known = set(self.fetched) | set(self.missing) | set(self.failures)
        return set(uids) <= known


class PayloadFetcher:
    """Fetch a window's payloads from many peers at once (see the module doc)."""

    def __init__(
        self,
        directory: PeerDirectory,
        config: GatherConfig,
        policy: RetryPolicy,
        *,
        transfer_metrics: TransferMetrics | None = None,
    ) -> None:
        self.directory = directory
        self.config = config
        self.policy = policy
        self.transfer_metrics = transfer_metrics

    async def fetch(self, window: int, uids: Iterable[int], *, max_bytes: int) -> FetchOutcome:
        outcome = FetchOutcome(window=window)
        started = time.monotonic()
        slots = asyncio.Semaphore(self.config.max_concurrency)
        async with asyncio.TaskGroup() as tasks:
            for uid in sorted(set(uids)):
                tasks.create_task(self._fetch_into(outcome, uid, window, max_bytes, slots))
        outcome.seconds = time.monotonic() - started
        return outcome

    async def _fetch_into(
        self,
        outcome: FetchOutcome,
        uid: int,
        window: int,
        max_bytes: int,
        slots: asyncio.Semaphore,
    ) -> None:
        reason: str | None = None
        try:
            async with slots, asyncio.timeout(self.config.timeout_s):
                outcome.fetched[uid] = await self._fetch_one(uid, window, max_bytes)
            return
        except NotFound:
            outcome.missing.append(uid)
            return
        except PayloadRejected as exc:
            reason, detail = exc.reason.value, exc.message
        except TimeoutError:
            reason, detail = TIMEOUT, f"no payload within {self.config.timeout_s:g}s"
        except UnknownPeer as exc:
            reason, detail = UNKNOWN_PEER, exc.message
        except PreconditionFailed as exc:
            reason, detail = CHANGED, exc.message
        except StoreError as exc:
            reason, detail = UNREACHABLE, f"{type(exc).__name__}: {exc.message}"
        outcome.failures[uid] = reason
        log.warning("window %d: payload of uid %d not used (%s): %s", window, uid, reason, detail)

    async def _fetch_one(self, uid: int, window: int, max_bytes: int) -> FetchedPayload:
        store = await self.directory.store_for(uid)
        key = payload_key(window, uid)

        async def attempt() -> FetchedPayload:
            def within_limit(info: ObjectInfo) -> None:  # before any byte of the body
                if info.size > max_bytes:
                    raise PayloadRejected(
                        RejectReason.TOO_LARGE, f"{info.size} bytes, the limit is {max_bytes}"
                    )

            started = time.monotonic()
            # one GET (where the store presigns: no HEAD, one version by construction), the
            # size limit checked from the answer's head, the body received off the loop
            data, info = await fetch_whole_object(store, key, check=within_limit)
            if self.transfer_metrics is not None:
                self.transfer_metrics.observe_part(
                    "download", info.size, time.monotonic() - started
                )
            return FetchedPayload(uid, data, info)

        return await retry(attempt, self.policy, describe=f"fetch {store.url(key)}")


def validate_fetched(
    fetched: FetchedPayload,
    schema: PayloadSchema,
    *,
    run_id: str,
    window: int,
    window_clock: WindowClock | None,
    sample_digest: str | None = None,
) -> GradientPayload:
    """Every payload check; the upload time only when ``window_clock`` is given."""
    check_payload_size(len(fetched.data), schema)
    expect = PayloadExpectation(
        run_id=run_id,
        window=window,
        uid=fetched.uid,
        sample_digest=sample_digest,
        window_clock=window_clock,
    )
    uploaded_at = fetched.info.last_modified if window_clock is not None else None
    return decode_payload(fetched.data, schema, expect, uploaded_at=uploaded_at)


@dataclass
class ValidatedPayloads:
    valid: dict[int, GradientPayload]
    rejected: dict[int, str]  # uid -> reason label


def validate_all(
    outcome: FetchOutcome,
    schema: PayloadSchema,
    *,
    run_id: str,
    window_clock: WindowClock | None,
    digests: Mapping[int, str] | None = None,
) -> ValidatedPayloads:
    """Validate every fetched payload (blocking: call it in a worker thread)."""
    result = ValidatedPayloads(valid={}, rejected=dict(outcome.failures))
    for uid, fetched in sorted(outcome.fetched.items()):
        try:
            result.valid[uid] = validate_fetched(
                fetched,
                schema,
                run_id=run_id,
                window=outcome.window,
                window_clock=window_clock,
                sample_digest=None if digests is None else digests.get(uid),
            )
        except PayloadRejected as exc:
            result.rejected[uid] = exc.reason.value
            log.info("window %d: uid %d rejected: %s", outcome.window, uid, exc.message)
    return result
