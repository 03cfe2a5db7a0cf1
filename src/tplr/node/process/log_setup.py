"""Process-wide logging: text or JSON lines, node context on every line, wire logs kept quiet.

``configure_logging(level, log_format=..., debug_wire=..., context=...)`` is called once by
an entry point (never at import). ``--log-format json`` writes one JSON object per line with
``ts``, ``level``, ``logger``, ``message`` and the node's ``role``, ``uid``, ``run_id``,
``window`` and ``rank`` (null until known), plus ``exc`` for a traceback.

The HTTP and S3 client libraries (botocore, aiobotocore, boto3, s3transfer, urllib3,
aiohttp) log every request at DEBUG, including the access key id and a replayable SigV4
``Signature=`` in the ``Authorization`` header. They stay at INFO (or the node's level, if
higher) even with ``--log-level DEBUG``; only ``--debug-wire`` (``TPLR_DEBUG_WIRE``) lets
them through, for a short debugging session on a host you control.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

LogFormat = Literal["text", "json"]
WIRE_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3transfer", "urllib3", "aiohttp")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass
class LogContext:
    """What every JSON line says about the node; fields fill in as the node learns them."""

    role: str | None = None
    uid: int | None = None
    run_id: str | None = None
    rank: int | None = None
    window_source: Callable[[], int] | None = field(default=None, repr=False)

    def window(self) -> int | None:
        if self.window_source is None:
            return None
        try:
            return self.window_source()
        except Exception:  # a log line never fails because of its context
            return None


CONTEXT = LogContext()
"""The process's context (set by the node as it starts; read by the JSON formatter)."""
_ACTIVE_FORMAT: list[LogFormat] = ["text"]


def json_logging() -> bool:
    """Whether :func:`configure_logging` chose JSON lines (errors are then logged, too)."""
    return _ACTIVE_FORMAT[0] == "json"


class JsonFormatter(logging.Formatter):
    def __init__(self, context: LogContext) -> None:
        super().__init__()
        self.context = context

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "role": self.context.role,
            "uid": self.context.uid,
            "run_id": self.context.run_id,
            "window": self.context.window(),
            "rank": self.context.rank,
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def parse_level(level: str) -> str:
    """``debug`` -> ``DEBUG``; anything else than a standard level is a ValueError."""
    upper = level.strip().upper()
    if upper not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(_LEVELS)}")
    return upper


def configure_logging(
    level: str,
    *,
    log_format: LogFormat = "text",
    debug_wire: bool = False,
    context: LogContext = CONTEXT,
    stream=None,
) -> None:
    """Install one stderr handler on the root logger (replacing earlier ones)."""
    numeric = logging.getLevelName(parse_level(level))
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(context))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
    _ACTIVE_FORMAT[0] = log_format
    quiet_wire_loggers(numeric, debug_wire=debug_wire)


def quiet_wire_loggers(level: int, *, debug_wire: bool) -> None:
    """Keep the client libraries' request dumps (keys, signatures) out of the log."""
    wire_level = level if debug_wire else max(level, logging.INFO)
    for name in WIRE_LOGGERS:
        logging.getLogger(name).setLevel(wire_level)
    if debug_wire:
        logging.getLogger(__name__).warning(
            "--debug-wire: HTTP/S3 request dumps are logged, with access key ids and request "
            "signatures; do not share this log"
        )
