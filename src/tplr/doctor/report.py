"""One line per check: ``ok``, ``warn``, ``fail`` or ``skip``, the check's name, what it saw."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from tplr.errors import TplrError

Status = Literal["ok", "warn", "fail", "skip"]
EXIT_OK = 0
EXIT_FAILED = 1
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    status: Status
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.detail}"


def ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, "ok", detail)


def warn(name: str, detail: str) -> CheckResult:
    return CheckResult(name, "warn", detail)


def fail(name: str, detail: str) -> CheckResult:
    return CheckResult(name, "fail", detail)


def skip(name: str, detail: str) -> CheckResult:
    return CheckResult(name, "skip", detail)


def failure_of(name: str, exc: TplrError) -> CheckResult:
    hint = f" ({exc.hint})" if exc.hint else ""
    return fail(name, f"{exc.message}{hint}")


async def guarded(
    name: str, check: Callable[[], Awaitable[list[CheckResult]]]
) -> list[CheckResult]:
    """Run one check; a typed error becomes its ``fail`` line instead of ending the doctor."""
    try:
        return await check()
    except asyncio.CancelledError:
        raise
    except TplrError as exc:
        return [failure_of(name, exc)]
    except Exception as exc:  # an unexpected error is still one line, with the traceback at DEBUG
        log.debug("check %s crashed", name, exc_info=True)
        return [fail(name, f"unexpected {type(exc).__name__}: {exc}")]


def exit_code(results: list[CheckResult]) -> int:
    return EXIT_FAILED if any(result.status == "fail" for result in results) else EXIT_OK
