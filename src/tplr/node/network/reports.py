"""Per-window reports: ``reports/{w}.json`` in each node's own store.

A report says what the node did in window ``w``: the uids it aggregated, the model digest
after its outer step (the model at the start of ``w + 1``), the training or validation
loss, and the bytes it moved. Operators and the demo read them; a node compares its
digest with the lead validator's report to detect that it fell out of sync.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from tplr.comms.stores.base import ObjectStore
from tplr.errors import TplrError
from tplr.untrusted import MalformedInput, load_model

REPORTS_PREFIX = "reports/"
MAX_REPORT_BYTES = 1 << 20
_REPORT_KEY = re.compile(r"^reports/(\d+)\.json$")


class ReportError(TplrError):
    hint = "the node that wrote it runs another version; ignore it or ask its operator"


class WindowReport(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    format: str = "tplr-window-report"
    run_id: str
    role: str
    uid: int = Field(ge=0)
    window: int = Field(ge=0)
    aggregated_uids: tuple[int, ...] = ()
    rejected: dict[str, str] = Field(default_factory=dict)  # uid -> reason
    model_digest: str  # after the outer step of this window
    outer_step_norm: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    uploaded_bytes: int = 0
    downloaded_bytes: int = 0
    finished_at_s: float = 0.0


def report_key(window: int) -> str:
    return f"{REPORTS_PREFIX}{window}.json"


async def publish_report(store: ObjectStore, report: WindowReport) -> None:
    await store.put(report_key(report.window), report.model_dump_json().encode())


def parse_report(data: bytes, *, source: str) -> WindowReport:
    """A node's report (outside data: bounded, strict); ReportError when it is not one."""
    try:
        return load_model(data, WindowReport, what=source, max_bytes=MAX_REPORT_BYTES, max_depth=3)
    except MalformedInput as exc:
        raise ReportError(f"not a window report: {exc.message}") from None


async def read_report(store: ObjectStore, window: int) -> WindowReport:
    """The report for ``window``; ``NotFound`` if the node has not written it (yet)."""
    key = report_key(window)
    info = await store.head(key)
    if info.size > MAX_REPORT_BYTES:
        raise ReportError(f"{store.url(key)} is {info.size} bytes: too large for a report")
    return parse_report(await store.get(key), source=store.url(key))


async def report_windows(store: ObjectStore) -> list[int]:
    """Windows that have a report, ascending."""
    windows = [
        int(match.group(1))
        async for info in store.list(REPORTS_PREFIX)
        if (match := _REPORT_KEY.match(info.key))
    ]
    return sorted(windows)
