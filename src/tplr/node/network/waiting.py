"""Polling for something another node publishes, with a clear log line while waiting."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tplr.comms.errors import NotFound, StoreError
from tplr.errors import TplrError
from tplr.node.process.lifecycle import NodeStopped, Shutdown
from tplr.protocol.clock import Clock

log = logging.getLogger(__name__)
T = TypeVar("T")


class WaitTimedOut(TplrError):
    """Something another node should publish did not appear in time."""


async def poll_until_found(
    probe: Callable[[], Awaitable[T]],
    *,
    what: str,
    advice: str,
    clock: Clock,
    shutdown: Shutdown,
    interval_s: float,
    timeout_s: float | None = None,
    log_every_s: float = 60.0,
) -> T:
    """Call ``probe`` until it stops raising ``NotFound`` (or a retryable store error).

    Logs ``waiting for {what} ({advice})`` at once and then every ``log_every_s``.
    Raises :class:`NodeStopped` on a stop request, :class:`WaitTimedOut` after ``timeout_s``.
    """
    started_s = clock.now()
    last_log_s: float | None = None
    while True:
        try:
            return await probe()
        except NotFound:
            reason = "not there yet"
        except StoreError as exc:
            if not exc.retryable:
                raise
            reason = f"{type(exc).__name__}: {exc.message}"
        waited_s = clock.now() - started_s
        if timeout_s is not None and waited_s >= timeout_s:
            raise WaitTimedOut(f"{what} did not appear within {timeout_s:g}s", hint=advice)
        if last_log_s is None or clock.now() - last_log_s >= log_every_s:
            log.info("waiting for %s (%s); %s; waited %.0fs", what, reason, advice, waited_s)
            last_log_s = clock.now()
        slept, _ = await shutdown.unless_stopped(clock.sleep(interval_s))
        if not slept:
            raise NodeStopped(f"stopped while waiting for {what}")
