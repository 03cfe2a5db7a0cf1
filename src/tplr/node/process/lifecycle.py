"""Process lifecycle of a node: uvloop, signals, a supervised main task, exit codes.

``run_node(main, grace_s=...)`` runs ``main(shutdown)`` on a uvloop event loop. The first
SIGTERM or SIGINT sets :class:`Shutdown`: the node stops taking new work at its next safe
point (every long wait races against it), so an upload in flight finishes; after
``grace_s`` (or at a second signal) the main task is cancelled, which aborts transfers
cleanly (multipart uploads are aborted; stores publish objects atomically, so no partial
file ever appears under a final name). A stop by signal exits 0; a
:class:`~tplr.errors.TplrError` exits 2 with its message and hint; anything else exits 1
with a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

from tplr.errors import ConfigError, TplrError
from tplr.node.process.log_setup import CONTEXT, LogFormat, configure_logging, json_logging

if TYPE_CHECKING:
    from tplr.node.process.settings import NodeSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NodeStopped(Exception):
    """Raised inside the node when a stop request interrupts a wait; exits 0."""


class Shutdown:
    """A stop request that the node's long waits race against."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.reason: str | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str = "requested") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    async def wait(self) -> None:
        await self._event.wait()

    async def unless_stopped(self, awaitable: Awaitable[T]) -> tuple[bool, T | None]:
        """Await ``awaitable`` unless a stop comes first: ``(True, result)`` or ``(False, None)``.

        On a stop the awaitable is cancelled (it must tolerate that: a sleep, a poll).
        """
        work = asyncio.ensure_future(awaitable)
        if self.requested:
            work.cancel()
            await asyncio.wait({work})
            return False, None
        stopper = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pending = {task for task in (work, stopper) if not task.done()}
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if work.done() and not work.cancelled():
            return True, work.result()
        return False, None


async def supervise(
    main: Callable[[Shutdown], Awaitable[None]],
    *,
    grace_s: float,
    signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
) -> int:
    """Run ``main`` in a task; signals request a stop, then cancel it after ``grace_s``."""
    loop = asyncio.get_running_loop()
    shutdown = Shutdown()
    main_task = loop.create_task(main(shutdown), name="tplr-node")

    def on_signal(signum: signal.Signals) -> None:
        name = signal.Signals(signum).name
        if shutdown.requested:
            log.warning("second %s: stopping now", name)
            main_task.cancel()
            return
        log.warning(
            "received %s: finishing the current step (up to %.0fs); send it again to stop now",
            name,
            grace_s,
        )
        shutdown.request(name)
        loop.call_later(grace_s, _cancel_after_grace, main_task)

    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await main_task
    except NodeStopped as stop:
        log.info("stopped: %s", stop)
        return EXIT_OK
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if shutdown.requested and (current is None or not current.cancelling()):
            log.info("stopped (%s)", shutdown.reason)
            return EXIT_OK
        raise
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    if shutdown.requested:
        log.info("stopped cleanly (%s)", shutdown.reason)
    return EXIT_OK


def _cancel_after_grace(task: asyncio.Task) -> None:
    if not task.done():
        log.warning("grace period over: cancelling the node's work")
        task.cancel()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop where uvloop exists (Linux, macOS), else the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_node(main: Callable[[Shutdown], Awaitable[None]], *, grace_s: float) -> int:
    """Run a node's main coroutine to completion on uvloop; returns the exit code."""
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(supervise(main, grace_s=grace_s))
    except TplrError as exc:
        report_error(exc)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return EXIT_OK


def exit_code_for(exc: TplrError) -> int:
    """2 for a usage/configuration error, 1 for a failure at run time."""
    from tplr.protocol.run_spec import RunSpecConflict, RunSpecInvalid

    if isinstance(exc, ConfigError | RunSpecConflict | RunSpecInvalid):
        return EXIT_CONFIG
    return EXIT_FAILED


def report_error(exc: TplrError) -> None:
    """``error: ...`` and ``hint: ...`` on stderr (one JSON line with ``--log-format json``)."""
    if json_logging():
        log.error("error: %s%s", exc.message, f" hint: {exc.hint}" if exc.hint else "")
        return
    print(f"error: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)


def check_single_process(environ: Mapping[str, str]) -> None:
    """Nodes run as one process per host for now; refuse a torchrun launch clearly."""
    from tplr.train.parallel.distributed import LaunchEnv

    launch = LaunchEnv.from_environ(environ)
    if launch.world_size > 1:
        raise ConfigError(
            f"this node was started as rank {launch.rank} of {launch.world_size} (torchrun); "
            "miner and validator nodes run as a single process",
            hint="start it with python (NPROC_PER_NODE=1 in the container), one node per host",
        )


def configure_process(
    *,
    log_level: str,
    torch_threads: int | None,
    log_format: LogFormat = "text",
    debug_wire: bool = False,
    role: str | None = None,
    uid: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Process-wide settings, applied by the entry point only (never at import)."""
    CONTEXT.role, CONTEXT.uid = role, uid
    rank = (environ or {}).get("RANK", "0")
    CONTEXT.rank = int(rank) if rank.isascii() and rank.isdigit() else 0
    configure_logging(log_level, log_format=log_format, debug_wire=debug_wire)
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)


def configure_node_process(settings: NodeSettings, environ: Mapping[str, str]) -> None:
    """``configure_process`` from a node's settings; then the settings' warnings are logged."""
    node = settings.node
    configure_process(
        log_level=node.log_level,
        torch_threads=node.torch_threads,
        log_format=node.log_format,
        debug_wire=node.debug_wire,
        role=settings.role,
        uid=node.uid,
        environ=environ,
    )
    for notice in settings.notices:
        log.warning("%s", notice)
