"""``PrefixedStore``: an :class:`~tplr.comms.stores.base.ObjectStore` view of one key prefix.

It gives a node "its own bucket" inside a shared one: the embedded store keeps every
node under ``uids/{uid}/``, and a peers-file entry may name a ``prefix`` in a shared
bucket. Keys are relative to the prefix in both directions (``list`` strips it). The view
does not own the inner store: closing it leaves the inner store open.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from tplr.comms.errors import InvalidRequest
from tplr.comms.stores.base import CompletedPart, ObjectInfo, ObjectStore


def normalize_prefix(prefix: str) -> str:
    """``"a/b"`` -> ``"a/b/"``; ``""`` stays empty. Refuses absolute and ``..`` prefixes."""
    stripped = prefix.strip("/")
    if prefix.startswith("/") or ".." in stripped.split("/"):
        raise InvalidRequest(
            f"invalid key prefix {prefix!r}", hint="use a relative prefix such as 'uids/3/'"
        )
    return f"{stripped}/" if stripped else ""


class PrefixedStore:
    """``store`` seen from under ``prefix``."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.inner = store
        self.prefix = normalize_prefix(prefix)

    def __repr__(self) -> str:
        return f"PrefixedStore({self.inner!r}, prefix={self.prefix!r})"

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _strip(self, info: ObjectInfo) -> ObjectInfo:
        return replace(info, key=info.key[len(self.prefix) :])

    def url(self, key: str = "") -> str:
        return self.inner.url(self._key(key))

    async def head(self, key: str) -> ObjectInfo:
        return self._strip(await self.inner.head(self._key(key)))

    async def get_range(
        self, key: str, offset: int, into: memoryview, *, if_match: str | None = None
    ) -> None:
        await self.inner.get_range(self._key(key), offset, into, if_match=if_match)

    async def get(self, key: str) -> bytes:
        return await self.inner.get(self._key(key))

    async def put(self, key: str, data: bytes) -> ObjectInfo:
        return self._strip(await self.inner.put(self._key(key), data))

    async def put_if_absent(self, key: str, data: bytes) -> ObjectInfo:
        return self._strip(await self.inner.put_if_absent(self._key(key), data))

    async def create_multipart(self, key: str) -> str:
        return await self.inner.create_multipart(self._key(key))

    async def upload_part(self, key: str, upload_id: str, part_number: int, data: bytes) -> str:
        return await self.inner.upload_part(self._key(key), upload_id, part_number, data)

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[CompletedPart]
    ) -> ObjectInfo:
        return self._strip(await self.inner.complete_multipart(self._key(key), upload_id, parts))

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self.inner.abort_multipart(self._key(key), upload_id)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        async for info in self.inner.list(self._key(prefix)):
            yield self._strip(info)

    async def delete(self, key: str) -> None:
        await self.inner.delete(self._key(key))

    async def aclose(self) -> None:
        """Nothing to close: the inner store belongs to whoever opened it."""
