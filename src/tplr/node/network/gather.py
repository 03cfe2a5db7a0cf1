"""Fetching peers' commitments and payloads for a window, each within a deadline.

:class:`PayloadFetcher` reads from many peers concurrently (bounded), each peer inside its
own ``asyncio.timeout``: HEAD first (the size limit is enforced before any byte is
downloaded; ``LastModified`` is kept for the timing checks), then one GET pinned to the
HEAD's ETag. Every request goes through the one retry policy. A peer that fails is
recorded with a :class:`~tplr.protocol.reasons.RejectReason` and never stops the others:
**any** exception raised while handling one peer's data — ours included — becomes that
peer's rejection (``internal_error``, logged with its traceback at DEBUG), so another
node's bytes can only ever hurt that node's score.

- :meth:`PayloadFetcher.snapshot_commitments`: the validators' snapshot of the window's
  commitments, taken between the commit deadline and the opening of the reveal phase.
- :meth:`PayloadFetcher.fetch`: the revealed payloads; :func:`check_reveals` then keeps
  only those whose bytes match a commitment of the snapshot and were revealed in time.
- :func:`validate_all`: every payload check (a worker thread), with the same backstop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from tplr.comms.download.source import fetch_whole_object
from tplr.comms.errors import NotFound, PreconditionFailed, StoreError
from tplr.comms.retry import RetryPolicy, retry
from tplr.comms.stores.base import ObjectInfo, ObjectStore
from tplr.comms.transfer_metrics import TransferMetrics
from tplr.node.network.directory import PeerDirectory, UnknownPeer
from tplr.node.process.settings import GatherConfig
from tplr.protocol.clock import WindowClock
from tplr.protocol.commitments import (
    MAX_COMMITMENT_BYTES,
    CommitmentInvalid,
    ObservedCommitment,
    commitment_key,
    parse_commitment,
)
from tplr.protocol.payload import (
    GradientPayload,
    PayloadExpectation,
    PayloadRejected,
    PayloadSchema,
    decode_payload,
    payload_key,
)
from tplr.protocol.reasons import RejectReason

log = logging.getLogger(__name__)
T = TypeVar("T")
VALIDATION_THREADS = min(8, os.cpu_count() or 1)


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
    failures: dict[int, RejectReason] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(len(item.data) for item in self.fetched.values())


@dataclass
class CommitmentSnapshot:
    window: int
    accepted: dict[int, ObservedCommitment] = field(default_factory=dict)
    rejected: dict[int, RejectReason] = field(default_factory=dict)  # incl. no_commitment


class PayloadFetcher:
    """Fetch a window's commitments and payloads from many peers at once."""

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

    async def _for_each(
        self,
        window: int,
        uids: Iterable[int],
        what: str,
        one: Callable[[int], Awaitable[T]],
    ) -> tuple[dict[int, T], list[int], dict[int, RejectReason]]:
        """Run ``one(uid)`` for every uid, bounded and each under its own deadline."""
        results: dict[int, T] = {}
        missing: list[int] = []
        failures: dict[int, RejectReason] = {}
        slots = asyncio.Semaphore(self.config.max_concurrency)

        async def guarded(uid: int) -> None:
            try:
                async with slots, asyncio.timeout(self.config.timeout_s):
                    results[uid] = await one(uid)
                return
            except NotFound:
                missing.append(uid)
                return
            except PayloadRejected as exc:
                reason, detail = exc.reason, exc.message
            except TimeoutError:
                reason, detail = RejectReason.TIMEOUT, f"nothing within {self.config.timeout_s:g}s"
            except UnknownPeer as exc:
                reason, detail = RejectReason.UNKNOWN_PEER, exc.message
            except PreconditionFailed as exc:
                reason, detail = RejectReason.CHANGED, exc.message
            except StoreError as exc:
                reason, detail = RejectReason.UNREACHABLE, f"{type(exc).__name__}: {exc.message}"
            except Exception as exc:  # backstop: one peer's bytes never stop the node
                reason, detail = RejectReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"
                log.debug("window %d: %s of uid %d failed", window, what, uid, exc_info=True)
            failures[uid] = reason
            log.warning(
                "window %d: %s of uid %d not used (%s): %s", window, what, uid, reason, detail
            )

        async with asyncio.TaskGroup() as tasks:
            for uid in sorted(set(uids)):
                tasks.create_task(guarded(uid))
        return results, sorted(missing), failures

    async def fetch_object(
        self, store: ObjectStore, key: str, *, max_bytes: int, reason: RejectReason
    ) -> FetchedPayload:
        """One GET where the store presigns (no HEAD: one version by construction), else HEAD
        then a GET pinned to its ETag; the size checked against ``max_bytes`` from the answer's
        head before any byte of the body is read, the body received off the event loop."""

        async def attempt() -> FetchedPayload:
            def within_limit(info: ObjectInfo) -> None:  # before any byte of the body
                if info.size > max_bytes:
                    raise PayloadRejected(reason, f"{info.size} bytes, the limit is {max_bytes}")

            started = time.monotonic()
            # one GET (where the store presigns: no HEAD, one version by construction), the
            # size limit checked from the answer's head, the body received off the loop
            data, info = await fetch_whole_object(store, key, check=within_limit)
            if self.transfer_metrics is not None:
                self.transfer_metrics.observe_part(
                    "download", info.size, time.monotonic() - started
                )
            return FetchedPayload(-1, data, info)

        return await retry(attempt, self.policy, describe=f"fetch {store.url(key)}")

    async def _fetch_one(self, uid: int, window: int, max_bytes: int) -> FetchedPayload:
        store = await self.directory.store_for(uid)
        fetched = await self.fetch_object(
            store, payload_key(window, uid), max_bytes=max_bytes, reason=RejectReason.TOO_LARGE
        )
        return FetchedPayload(uid, fetched.data, fetched.info)

    async def fetch(self, window: int, uids: Iterable[int], *, max_bytes: int) -> FetchOutcome:
        """The revealed payloads ``gradients/{w}/{uid}.safetensors`` of ``uids``."""
        started = time.monotonic()
        fetched, missing, failures = await self._for_each(
            window, uids, "payload", lambda uid: self._fetch_one(uid, window, max_bytes)
        )
        return FetchOutcome(window, fetched, missing, failures, time.monotonic() - started)

    async def snapshot_commitments(
        self,
        window: int,
        uids: Iterable[int],
        *,
        run_id: str,
        windows: WindowClock,
        check_store_clock: bool,
    ) -> CommitmentSnapshot:
        """Read every miner's commitment for ``window``; call it after the commit deadline.

        A commitment counts when it parses, names this run, window and uid, was observed
        before the reveal phase opened, and (``check_store_clock``) its ``LastModified``
        lies in the window before the commit deadline."""

        async def one(uid: int) -> ObservedCommitment:
            store = await self.directory.store_for(uid)
            fetched = await self.fetch_object(
                store,
                commitment_key(window, uid),
                max_bytes=MAX_COMMITMENT_BYTES,
                reason=RejectReason.BAD_COMMITMENT,
            )
            try:
                commitment = parse_commitment(fetched.data, run_id=run_id, window=window, uid=uid)
            except CommitmentInvalid as exc:
                raise PayloadRejected(RejectReason.BAD_COMMITMENT, exc.message) from None
            observed_at = windows.clock.now()
            stamped = fetched.info.last_modified
            if observed_at > windows.reveal_open_s(window) or (
                check_store_clock and not windows.committed_in_time(window, stamped)
            ):
                raise PayloadRejected(
                    RejectReason.LATE_COMMITMENT,
                    f"stamped {stamped.isoformat()}, observed at {observed_at:.3f}; the commit "
                    f"deadline was {windows.commit_deadline_s(window):.3f} (unix seconds)",
                )
            return ObservedCommitment(commitment, stamped, observed_at)

        accepted, missing, failures = await self._for_each(window, uids, "commitment", one)
        snapshot = CommitmentSnapshot(window, accepted, dict(failures))
        for uid in missing:
            snapshot.rejected[uid] = RejectReason.NO_COMMITMENT
        return snapshot


def check_reveals(
    outcome: FetchOutcome,
    snapshot: CommitmentSnapshot,
    *,
    windows: WindowClock,
    check_store_clock: bool,
) -> tuple[dict[int, FetchedPayload], dict[int, RejectReason]]:
    """Keep the payloads whose bytes match their commitment and were revealed in time."""
    matched: dict[int, FetchedPayload] = {}
    rejected: dict[int, RejectReason] = dict(outcome.failures)
    for uid in outcome.missing:
        rejected[uid] = RejectReason.NOT_REVEALED
    for uid, fetched in sorted(outcome.fetched.items()):
        observed = snapshot.accepted.get(uid)
        if observed is None:
            rejected[uid] = RejectReason.NO_COMMITMENT
        elif check_store_clock and not windows.revealed_in_time(
            outcome.window, fetched.info.last_modified
        ):
            rejected[uid] = RejectReason.LATE_REVEAL
        elif not observed.commitment.matches(fetched.data):
            rejected[uid] = RejectReason.REVEAL_MISMATCH
        else:
            matched[uid] = fetched
    for uid, reason in sorted(rejected.items()):
        if reason is not RejectReason.NOT_REVEALED:
            log.info("window %d: reveal of uid %d refused (%s)", outcome.window, uid, reason)
    return matched, rejected


@dataclass
class ValidatedPayloads:
    valid: dict[int, GradientPayload]
    rejected: dict[int, RejectReason]


def validate_all(
    payloads: Mapping[int, FetchedPayload],
    schema: PayloadSchema,
    expectations: Mapping[int, PayloadExpectation],
) -> ValidatedPayloads:
    """Every payload check (blocking: call it in a worker thread; the payloads are checked
    in a few threads, torch releasing the GIL). Any failure on one payload, whatever it is,
    is that payload's rejection."""

    def one(uid: int) -> GradientPayload | RejectReason:
        try:
            return decode_payload(payloads[uid].data, schema, expectations[uid])
        except PayloadRejected as exc:
            log.info("uid %d rejected: %s", uid, exc.message)
            return exc.reason
        except Exception as exc:  # backstop: a bug or a gap in our checks
            log.warning("uid %d rejected (internal_error): %s: %s", uid, type(exc).__name__, exc)
            log.debug("validation of uid %d failed", uid, exc_info=True)
            return RejectReason.INTERNAL_ERROR

    result = ValidatedPayloads(valid={}, rejected={})
    uids = sorted(payloads)
    workers = max(1, min(VALIDATION_THREADS, len(uids)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="validate") as pool:
        for uid, outcome in zip(uids, pool.map(one, uids), strict=True):
            if isinstance(outcome, RejectReason):
                result.rejected[uid] = outcome
            else:
                result.valid[uid] = outcome
    return result
