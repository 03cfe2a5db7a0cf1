"""An HTTP proxy on loopback in front of a real S3 server (moto) that changes what the store
seems to be: ``date_offset_s`` shifts the ``Date`` header of every answer (a store whose
clock is wrong); ``refuse_writes`` answers PUT/POST/DELETE with S3's 403 AccessDenied,
as R2 does for a read-only API token. (aiohttp's server handles ``Expect: 100-continue``,
which botocore sends with uploads.)"""

from __future__ import annotations

import email.utils
import time

import aiohttp
from aiohttp import web

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date"}


_ACCESS_DENIED = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
    b"<Message>Access Denied</Message></Error>"
)


class S3RewriteProxy:
    """``async with S3RewriteProxy(upstream, date_offset_s=3600) as proxy:``, use ``proxy.url``."""

    def __init__(
        self, upstream_url: str, *, date_offset_s: float = 0.0, refuse_writes: bool = False
    ) -> None:
        self.upstream = upstream_url.rstrip("/")
        self.offset_s = date_offset_s
        self.refuse_writes = refuse_writes
        self.refused = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> S3RewriteProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None and self._session is not None
        await self._runner.cleanup()
        await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        date = email.utils.formatdate(time.time() + self.offset_s, usegmt=True)
        if self.refuse_writes and request.method in ("PUT", "POST", "DELETE"):
            await request.read()
            self.refused += 1
            headers = {"Content-Type": "application/xml", "Date": date}
            return web.Response(status=403, headers=headers, body=_ACCESS_DENIED)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as upstream:
            body = await upstream.read()
            kept = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
        kept["Date"] = date
        return web.Response(status=upstream.status, headers=kept, body=body)
