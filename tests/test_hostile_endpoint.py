"""A hostile S3 endpoint: the real moto server behind the fault proxy, whose answers are
rewritten to lie (fields missing, wrong types, impossible values, broken XML, listings
that loop). Every operation of ``S3Store`` and the raw range reader must fail with a
typed ``StoreError`` (issue 10, item 2), never ``KeyError``/``ValueError``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from fault_proxy import Fault, FaultProxy, Response
from test_download import PART, bucket_config, payload

from tplr.comms.download.engine import download
from tplr.comms.errors import MalformedResponse, StoreError
from tplr.comms.stores.base import CompletedPart
from tplr.comms.stores.s3 import S3Store
from tplr.comms.transfer_config import TransferConfig

Rewrite = Callable[[Response], Response]
FAST = TransferConfig(transfer_max_attempts=2, transfer_read_timeout_s=2)


def without(name: str) -> Rewrite:
    def rewrite(answer: Response) -> Response:
        kept = [(k, v) for k, v in answer.headers if k.lower() != name.lower()]
        return Response(answer.status_line, kept, answer.body)

    return rewrite


def header(name: str, value: str) -> Rewrite:
    """Set ``name: value``, sent exactly so (the proxy does not fix the framing)."""

    def rewrite(answer: Response) -> Response:
        kept = [(k, v) for k, v in answer.headers if k.lower() != name.lower()]
        if name.lower() != "content-length" and not any(
            k.lower() == "content-length" for k, _ in kept
        ):
            kept.append(("Content-Length", str(len(answer.body))))
        return Response(answer.status_line, [*kept, (name, value)], answer.body, raw=True)

    return rewrite


def body(data: bytes) -> Rewrite:
    return lambda answer: Response(answer.status_line, answer.headers, data)


def status_line(line: bytes) -> Rewrite:
    return lambda answer: Response(line, answer.headers, answer.body)


def listing(*contents: str, truncated: bool = False, token: str = "") -> Rewrite:
    extra = f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
    if token:
        extra += f"<NextContinuationToken>{token}</NextContinuationToken>"
    xml = f"<?xml version='1.0'?><ListBucketResult>{extra}{''.join(contents)}</ListBucketResult>"
    # a 200 whatever the real server said (moto refuses the made-up continuation token)
    return lambda answer: Response(b"HTTP/1.1 200 OK", answer.headers, xml.encode())


def item(key: str, size: str = "1", modified: str = "2026-01-01T00:00:00.000Z") -> str:
    fields = f"<Key>{key}</Key><Size>{size}</Size><LastModified>{modified}</LastModified>"
    return f"<Contents>{fields}<ETag>&quot;abc&quot;</ETag></Contents>"


@pytest.fixture
async def hostile(s3_server, s3_client, bucket) -> AsyncIterator[tuple[FaultProxy, S3Store]]:
    s3_client.put_object(Bucket=bucket, Key="k", Body=payload(3 * PART))
    async with (
        FaultProxy(s3_server) as proxy,
        S3Store(bucket_config(proxy.url, bucket), FAST) as store,
    ):
        yield proxy, store


@pytest.mark.parametrize(
    "rewrite",
    [
        without("ETag"),
        without("Content-Length"),
        without("Last-Modified"),
        header("Last-Modified", "yesterday"),
        header("Content-Length", "-5"),
        header("Content-Length", "abc"),
        header("Content-Length", "1" + "0" * 40),
        header("ETag", '"ab"cd"'),
        header("ETag", '""'),
        header("ETag", '"' + "e" * 5000 + '"'),
    ],
    ids=[
        "no-etag",
        "no-length",
        "no-date",
        "yesterday",
        "negative",
        "letters",
        "huge",
        "quote",
        "empty-etag",
        "long-etag",
    ],
)
async def test_a_lying_head_answer_is_a_typed_error(hostile, rewrite):
    proxy, store = hostile
    proxy.add(Fault("rewrite", method="HEAD", rewrite=rewrite, times=None))
    with pytest.raises(StoreError):
        await store.head("k")
    with pytest.raises(StoreError):  # the download engine starts with the same HEAD
        await download(store, "k", "/nonexistent/never-written", config=FAST, progress=False)


@pytest.mark.parametrize(
    "rewrite",
    [
        body(b"<garbage"),
        body(b"\xff\xfe not xml at all"),
        listing("<Contents><Key>a</Key></Contents>"),  # no size, no date
        listing(item("a", size="zz")),
        listing(item("a", size="-1")),
        listing(item("a", modified="nope")),
        listing(item("b"), item("a")),  # goes backwards
        listing(item("a"), item("a")),  # repeats
        listing(item("p/../../etc/passwd")),
        listing(item("a"), truncated=True, token="t"),  # the same token page after page
    ],
    ids=[
        "broken-xml",
        "binary",
        "no-size",
        "letters",
        "negative",
        "bad-date",
        "backwards",
        "repeats",
        "traversal",
        "loop",
    ],
)
async def test_a_lying_listing_is_a_typed_error(hostile, rewrite):
    proxy, store = hostile
    proxy.add(Fault("rewrite", rewrite=rewrite, times=None, path_contains="list-type=2"))
    with pytest.raises(StoreError):
        async for _ in store.list(""):
            pass


async def test_a_listing_outside_the_prefix_is_refused(hostile):
    proxy, store = hostile
    proxy.add(Fault("rewrite", rewrite=listing(item("x/a")), path_contains="list-type=2"))
    with pytest.raises(MalformedResponse, match="not a key under the prefix 'p/'"):
        async for _ in store.list("p/"):
            pass


async def test_lying_upload_answers_are_typed_errors(hostile):
    proxy, store = hostile
    proxy.add(Fault("rewrite", method="PUT", rewrite=without("ETag"), key="p"))
    with pytest.raises(MalformedResponse, match="ETag"):
        await store.put("p", b"abc")
    no_id = body(b"<?xml version='1.0'?><InitiateMultipartUploadResult/>")
    proxy.add(Fault("rewrite", method="POST", rewrite=no_id, key="m"))
    with pytest.raises(MalformedResponse, match="UploadId"):
        await store.create_multipart("m")
    upload_id = await store.create_multipart("m")
    proxy.add(Fault("rewrite", method="PUT", rewrite=without("ETag"), key="m"))
    with pytest.raises(MalformedResponse, match="ETag"):
        await store.upload_part("m", upload_id, 1, b"x" * 10)
    etag = await store.upload_part("m", upload_id, 1, b"x" * 10)
    proxy.add(Fault("rewrite", method="POST", rewrite=body(b"<<<"), key="m"))
    with pytest.raises(StoreError):
        await store.complete_multipart("m", upload_id, [CompletedPart(1, etag)])


@pytest.mark.parametrize(
    "rewrite",
    [
        status_line(b"HTTP/1.1 2\xb26 Partial Content"),  # latin-1 superscript two: isdigit()
        status_line(b"HTTP/9 206 Partial"),
        header("Content-Length", "twelve"),
        header("Content-Range", "bytes 0-1/2"),
        header("Transfer-Encoding", "chunked"),
        header("Bad Header", "x"),
        status_line(b"HTTP/1.1 500 Oops"),
        lambda answer: Response(b"HTTP/1.1 403 No", [("Content-Length", "zz")], b""),
    ],
    ids=["superscript", "version", "length", "range", "chunked", "name", "500", "403-length"],
)
async def test_lying_range_answers_are_typed_errors(hostile, tmp_path, rewrite):
    """The raw reader (presigned ranged GETs) parses the answers itself."""
    proxy, store = hostile
    proxy.add(Fault("rewrite", rewrite=rewrite, times=None, path_contains="X-Amz-Signature"))
    with pytest.raises(StoreError):
        await download(store, "k", tmp_path / "k", config=FAST, progress=False)
    assert not (tmp_path / "k").exists()


async def test_a_wrong_content_range_through_the_store_client_is_refused(hostile):
    proxy, store = hostile
    proxy.add(Fault("rewrite", rewrite=header("Content-Range", f"bytes 0-9/{3 * PART}")))
    with pytest.raises(MalformedResponse, match="Content-Range"):
        await store.get_range("k", 10, memoryview(bytearray(10)))
