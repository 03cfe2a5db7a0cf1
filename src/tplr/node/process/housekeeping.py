"""Background work beside a node's window loop, in one ``asyncio.TaskGroup``.

The window loop must not wait for chores such as deleting expired payloads, so each
finished window is handed to a :class:`Housekeeper` task that does them in the
background. A failed chore is logged and retried with the next window; it never stops
the node. :func:`run_with_housekeeping` runs both and stops the housekeeper when the loop
ends (or cancels the loop if the housekeeper fails unexpectedly).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tplr.comms.errors import StoreError

log = logging.getLogger(__name__)

Chore = Callable[[int], Awaitable[None]]


class Housekeeper:
    def __init__(self, chore: Chore, *, name: str) -> None:
        self._chore = chore
        self.name = name
        self._finished: asyncio.Queue[int] = asyncio.Queue()

    def window_done(self, window: int) -> None:
        """Called by the window loop; never blocks it."""
        self._finished.put_nowait(window)

    async def run(self) -> None:
        while True:
            window = await self._finished.get()
            while not self._finished.empty():  # behind: only the newest window matters
                window = self._finished.get_nowait()
            try:
                await self._chore(window)
            except StoreError as exc:
                log.warning(
                    "%s after window %d failed (retried next window): %s", self.name, window, exc
                )


async def run_with_housekeeping(loop: Awaitable[None], housekeeper: Housekeeper) -> None:
    """Run the window loop and its housekeeper together; stop the housekeeper at the end.

    A single failure leaves as itself (not wrapped in an ExceptionGroup), so a typed error
    still reaches the entry point with its message and hint.
    """
    try:
        async with asyncio.TaskGroup() as tasks:
            helper = tasks.create_task(housekeeper.run(), name=housekeeper.name)
            try:
                await loop
            finally:
                helper.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
