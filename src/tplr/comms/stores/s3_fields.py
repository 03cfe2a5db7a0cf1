"""The fields of S3 answers, checked before use: the trust boundary of :class:`S3Store`.

botocore turns an answer into a dict, but what it holds is whatever the endpoint sent,
and a peer's endpoint is hostile by assumption (``docs/security.md``): a field can be
missing, of another type, negative, absurdly large, or a date botocore cannot parse.
Everything here raises only :class:`~tplr.comms.errors.MalformedResponse`, naming the
request (``where``) and the field.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from botocore.parsers import ResponseParserError

from tplr.comms.errors import MalformedResponse
from tplr.comms.stores.base import ObjectInfo
from tplr.untrusted import MAX_KEY_BYTES, MalformedInput, check_key

MAX_OBJECT_BYTES = 1 << 50  # 1 PiB: far beyond S3's 5 TiB, far below any overflow
MAX_ETAG_CHARS = 256
MAX_TEXT_CHARS = 1024

ANSWER_PARSE_FAILURES = (
    ResponseParserError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    ArithmeticError,  # OverflowError: a date or number too large
    RuntimeError,  # botocore: "Unable to calculate correct timezone offset" (found by fuzzing)
)
"""What botocore raises when it cannot parse an answer (a date "yesterday", a number
"abc", broken XML); only ever caught around one client call."""


def _bad(where: str, field: str, value: object, why: str) -> MalformedResponse:
    shown = repr(value)[:80]
    return MalformedResponse(f"{where}: {field} {shown} {why}", location=where)


def answer_size(
    answer: dict[str, Any], field: str, where: str, *, default: int | None = None
) -> int:
    value = answer.get(field, default)
    if value is None:
        raise _bad(where, field, value, "is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(where, field, value, "is not an integer")
    if not 0 <= value <= MAX_OBJECT_BYTES:
        raise _bad(where, field, value, f"is outside [0, {MAX_OBJECT_BYTES}]")
    return value


def answer_text(answer: dict[str, Any], field: str, where: str) -> str:
    value = answer.get(field)
    if not isinstance(value, str) or not value:
        raise _bad(where, field, value, "is missing or not a non-empty string")
    if len(value) > MAX_TEXT_CHARS or not value.isprintable():
        raise _bad(where, field, value, "is too long or has unprintable characters")
    return value


def answer_etag(answer: dict[str, Any], where: str, *, field: str = "ETag") -> str:
    """The ETag without its quotes: printable ASCII without quotes inside, bounded."""
    value = answer.get(field)
    if not isinstance(value, str):
        raise _bad(where, field, value, "is missing")
    etag = value.strip().strip('"')
    if not etag or len(etag) > MAX_ETAG_CHARS or not (etag.isascii() and etag.isprintable()):
        raise _bad(where, field, value, "is empty, too long or not printable ASCII")
    if '"' in etag:
        raise _bad(where, field, value, "has a quote inside")
    return etag


def answer_time(answer: dict[str, Any], field: str, where: str) -> datetime:
    value = answer.get(field)
    if not isinstance(value, datetime):
        raise _bad(where, field, value, "is missing or not a date")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def page_objects(
    page: dict[str, Any], prefix: str, after: str | None, where: str
) -> Iterator[ObjectInfo]:
    """The objects of one LIST page, each checked: a safe key under ``prefix`` and after
    ``after`` (S3 lists in strictly ascending order), a size, an ETag, a date."""
    contents = page.get("Contents", [])
    if not isinstance(contents, list):
        raise _bad(where, "Contents", type(contents).__name__, "is not a list")
    for item in contents:
        if not isinstance(item, dict):
            raise _bad(where, "Contents item", type(item).__name__, "is not an object")
        key = item.get("Key")
        if not isinstance(key, str) or not key.startswith(prefix):
            raise _bad(where, "Key", key, f"is not a key under the prefix {prefix!r}")
        if after is not None and key <= after:
            raise _bad(where, "Key", key, f"does not come after {after[:MAX_KEY_BYTES]!r}")
        after = key
        if key.endswith("/") and item.get("Size") == 0:
            continue  # a "folder" marker some consoles create: not an object to us
        try:
            check_key(key, what="listed key")
        except MalformedInput as exc:
            raise MalformedResponse(f"{where}: {exc.message}", location=where) from None
        etag = answer_etag(item, where) if item.get("ETag") not in (None, "") else ""
        yield ObjectInfo(
            key=key,
            size=answer_size(item, "Size", where),
            etag=etag,
            last_modified=answer_time(item, "LastModified", where),
        )
