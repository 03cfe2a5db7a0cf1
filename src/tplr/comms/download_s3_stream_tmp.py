"""TEMPORARY: a streaming ranged GET for :class:`~tplr.comms.s3_store.S3Store`.

The download engine fetches each part with one ranged GET and consumes the body in the
chunks the socket delivers, so memory stays small however large the part is. The
``ObjectStore`` protocol only offers ``get_range`` into a caller buffer of the whole
range, which would need ``workers x part size`` of memory. Until ``S3Store`` grows its
own ``open_range`` method (same signature as :func:`open_s3_range` minus ``store``), this
module provides it from the outside, through the store's request wrapper (throttle and
typed error mapping) and client. Delete this file once ``S3Store.open_range`` exists:
:func:`tplr.comms.download_source.open_part_stream` prefers a store's own method.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from tplr.comms.errors import InvalidRequest, TransientError
from tplr.comms.s3_store import S3Store


class _BodyChunks:
    """Async iterator over a response body: exactly ``length`` bytes, else a typed error."""

    def __init__(self, content: Any, length: int, where: str, location: str) -> None:
        self._content = content
        self._remaining = length
        self._length = length
        self._where = where
        self._location = location

    def __aiter__(self) -> _BodyChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._remaining == 0:
            raise StopAsyncIteration
        chunk, _ = await self._content.readchunk()  # one socket read, no joining copy
        if not chunk:
            raise TransientError(
                f"short read: {self._where} ended after {self._length - self._remaining}"
                f" of {self._length} bytes",
                location=self._location,
            )
        if len(chunk) > self._remaining:
            raise InvalidRequest(
                f"{self._where} returned more bytes than the range asked for",
                location=self._location,
            )
        self._remaining -= len(chunk)
        return chunk


@contextlib.asynccontextmanager
async def open_s3_range(
    store: S3Store, key: str, offset: int, length: int, *, if_match: str | None = None
) -> AsyncIterator[AsyncIterator[bytes]]:
    """``async with open_s3_range(store, key, off, n) as chunks: async for c in chunks``."""
    location = store.url(key)
    where = f"GET {location} bytes {offset}-{offset + length - 1} (endpoint {store.endpoint})"
    extra = {"IfMatch": f'"{if_match.strip(chr(34))}"'} if if_match is not None else {}
    async with store._request("GET", key):
        response = await store._client.get_object(
            Bucket=store.bucket_name,
            Key=key,
            Range=f"bytes={offset}-{offset + length - 1}",
            **extra,
        )
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        declared = int(response.get("ContentLength", 0))
        if declared > length or (status != 206 and (offset > 0 or declared != length)):
            response["Body"].close()
            raise InvalidRequest(
                f"endpoint {store.endpoint} ignored the Range header: {where}"
                f" (HTTP {status}, {declared} bytes)",
                location=location,
                hint="use an S3-compatible endpoint that supports ranged GETs",
            )
        async with response["Body"] as body:
            yield _BodyChunks(body.content, length, where, location)
