"""The ``ObjectStore`` protocol: the narrow storage interface every layer uses.

Each method makes exactly one attempt and raises a typed error from
:mod:`tplr.comms.errors` on failure. Retries live in one place,
:mod:`tplr.comms.retry`, applied by callers (the transfer engine), never here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """Metadata of one stored object. ``etag`` has no surrounding quotes."""

    key: str
    size: int
    etag: str
    last_modified: datetime


@dataclass(frozen=True, slots=True)
class CompletedPart:
    part_number: int  # 1-based, as S3 numbers them
    etag: str


@runtime_checkable
class ObjectStore(Protocol):
    """A bucket (or a local directory) of objects addressed by ``/``-separated keys."""

    def url(self, key: str = "") -> str:
        """A printable location, e.g. ``s3://bucket/key`` or ``file:///root/key``."""
        ...

    async def head(self, key: str) -> ObjectInfo: ...

    async def get_range(
        self, key: str, offset: int, into: memoryview, *, if_match: str | None = None
    ) -> None:
        """Fill ``into`` completely with the bytes at ``[offset, offset + len(into))``.

        A body shorter than asked raises ``TransientError``; an ETag other than
        ``if_match`` raises ``PreconditionFailed``.
        """
        ...

    async def get(self, key: str) -> bytes: ...

    async def put(self, key: str, data: bytes) -> ObjectInfo: ...

    async def put_if_absent(self, key: str, data: bytes) -> ObjectInfo:
        """Create ``key`` only if it does not exist; ``AlreadyExists`` otherwise (atomic)."""
        ...

    async def create_multipart(self, key: str) -> str:
        """Start a multipart upload and return its upload id."""
        ...

    async def upload_part(self, key: str, upload_id: str, part_number: int, data: bytes) -> str:
        """Upload one part (1-based) and return its ETag."""
        ...

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[CompletedPart]
    ) -> ObjectInfo: ...

    async def abort_multipart(self, key: str, upload_id: str) -> None: ...

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""
        ...

    async def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""
        ...

    async def aclose(self) -> None: ...
