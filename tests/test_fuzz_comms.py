"""Property-based fuzzing of the comms trust boundary (hypothesis, the profile loaded in
conftest: 60 derandomized examples in CI). Every parser of outside data is thrown random
and adversarial input and must raise only the project's typed errors, stay within bounded
memory, and write nothing outside its destination:

- resume journals (lines, whole files, the sidecar a resumed download opens beside them,
  with symlinks pointing out of the folder);
- the hand-written HTTP/1.1 response parser of the raw range reader, from a real socket
  server on loopback that answers random bytes;
- S3 answer fields, through the fault proxy in front of moto (HEAD headers, LIST XML);
- store URLs (``s3://``, ``https://``, ``hf://``, ``file://``, paths).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import tracemalloc
import zlib
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import moto_bucket_config
from fault_proxy import Fault, FaultProxy, Response
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tplr.comms.download.blocking import content_length, parse_response_head
from tplr.comms.download.http import PresignedRangeReader
from tplr.comms.download.journal import (
    JournalHeader,
    PartRecord,
    header_line,
    parse_record,
    read_journal_state,
)
from tplr.comms.download.sidecar import Sidecar, sidecar_paths
from tplr.comms.errors import MalformedResponse, StoreError
from tplr.comms.stores.s3 import S3Store
from tplr.comms.stores.url import parse_store_url
from tplr.errors import TplrError
from tplr.untrusted import MalformedInput

HEADER = JournalHeader("data/shard.bin", 10 * 65536 + 7, "0123456789abcdef0123456789abcdef", 65536)
FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def crc_line(body: str) -> str:
    return f"{body} {zlib.crc32(body.encode('utf-8', 'surrogatepass')):08x}\n"


# -- journals ----------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(min_value=-5, max_value=11 * 65536).map(str),
    st.sampled_from(["\u00b2", "\u0663", "1e3", "", "00", "99999999999999999999999"]),
)
digests = st.one_of(st.text("0123456789abcdef", min_size=30, max_size=34), st.text(max_size=40))
bodies = st.one_of(
    st.tuples(st.sampled_from("DPSX"), numbers, st.one_of(numbers, digests), digests).map(" ".join),
    st.text(max_size=120),
)


@FUZZ
@given(bodies, st.booleans())
def test_journal_lines_parse_to_records_in_range_or_malformed_input(body, valid_crc):
    line = crc_line(body) if valid_crc else body + "\n"
    try:
        record = parse_record(line, HEADER)
    except MalformedInput:
        return
    assert 0 <= record.index < HEADER.part_count
    if not isinstance(record, PartRecord):
        start = record.index * HEADER.part_size
        end = start + HEADER.part_length(record.index)
        offset = getattr(record, "offset", start)
        assert start <= offset < offset + record.length <= end


@FUZZ
@given(
    st.one_of(st.just(header_line(HEADER)), st.text(max_size=200)),
    st.lists(
        st.one_of(bodies.map(crc_line), st.binary(max_size=80).map(lambda b: b.decode("latin-1"))),
        max_size=30,
    ),
)
def test_journal_files_never_raise(header, lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.partial.journal"
        path.write_bytes((header + "\n" + "".join(lines)).encode("utf-8", "surrogatepass"))
        state = read_journal_state(path, HEADER)
    assert all(0 <= index < HEADER.part_count for index in state.done)


@FUZZ
@given(
    lines=st.lists(bodies.map(crc_line), max_size=20),
    data=st.binary(min_size=0, max_size=4096),
    links=st.sets(st.sampled_from(["partial", "journal", "tmp"])),
)
def test_a_resumed_sidecar_reverifies_and_writes_nothing_outside(lines, data, links):
    """Whatever journal and partial file a local user left, opening the sidecar either
    resumes what re-hashes correctly or starts afresh, and never writes through a link."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        dest = root / "dest" / "shard.bin"
        dest.parent.mkdir()
        partial, journal = sidecar_paths(dest)
        outside = root / "outside"
        outside.write_bytes(b"precious")
        journal.write_text(header_line(HEADER) + "\n" + "".join(lines))
        partial.write_bytes(data.ljust(64, b"\0") * (HEADER.size // 64 + 1))
        os.truncate(partial, HEADER.size)
        tmp = journal.with_name(journal.name + ".tmp")
        for name, path in (("partial", partial), ("journal", journal), ("tmp", tmp)):
            if name in links:
                path.unlink(missing_ok=True)
                path.symlink_to(outside)
        sidecar = Sidecar(dest, HEADER)
        try:
            resumed = sidecar.open(lambda _path: 1 << 40, md5=False)
            assert set(resumed.done) <= set(range(HEADER.part_count))
            assert not partial.is_symlink() and not journal.is_symlink()
        except StoreError:
            pass
        finally:
            sidecar.close()
        assert outside.read_bytes() == b"precious"


def test_an_oversized_journal_is_ignored_without_reading_it_whole(tmp_path):
    path = tmp_path / "x.partial.journal"
    with open(path, "wb") as fh:
        fh.write((header_line(HEADER) + "\n").encode())
        fh.truncate(80 * 1024 * 1024)  # sparse: 80 MiB of NULs after the header
    tracemalloc.start()
    try:
        state = read_journal_state(path, HEADER)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert state.done == {} and peak < 70 * 1024 * 1024


# -- the raw reader's HTTP/1.1 parser ------------------------------------------------------

heads = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda status, headers: status + b"\r\n" + b"\r\n".join(headers),
        st.sampled_from(
            [
                b"HTTP/1.1 206 Partial",
                b"HTTP/1.1 2\xc2\xb206 X",
                b"HTTP/1.0 200",
                b"HTTP/2 206",
                b"HTTP/1.1",
            ]
        ),
        st.lists(
            st.one_of(
                st.builds(
                    lambda k, v: k + b": " + v,
                    st.sampled_from(
                        [b"Content-Length", b"Content-Range", b"ETag", b"Transfer-Encoding", b"X"]
                    ),
                    st.binary(max_size=40),
                ),
                st.binary(max_size=40),
            ),
            max_size=8,
        ),
    ),
)


@FUZZ
@given(heads)
def test_response_heads_parse_or_raise_malformed_response(head):
    try:
        status, headers = parse_response_head(head, "GET x")
        content_length(headers, "GET x")
    except MalformedResponse:
        return
    assert 100 <= status <= 599 and len(headers) <= 100


class Loop:
    """An event loop in a thread, so sync hypothesis tests can drive async servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    running = Loop()
    yield running
    running.close()


class RawServer:
    """Answers every request on loopback with ``self.answer`` (whatever bytes), then closes."""

    def __init__(self) -> None:
        self.answer = b""
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/b/k"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.answer)
            await writer.drain()
        writer.close()


@pytest.fixture(scope="module")
def raw_server(loop) -> RawServer:
    server = RawServer()
    loop.run(server.start())
    return server


def reader_for(url: str) -> PresignedRangeReader:
    async def fixed() -> str:
        return url

    def map_error(status: int, code: str, message: str) -> StoreError:
        return StoreError(f"HTTP {status} {code}")

    return PresignedRangeReader(
        fixed, location="s3://b/k", connect_timeout_s=2, read_timeout_s=0.3, map_error=map_error
    )


@FUZZ
@given(head=heads, body=st.binary(max_size=200), how=st.sampled_from(["stream", "into", "whole"]))
def test_the_raw_reader_raises_only_store_errors(loop, raw_server, head, body, how):
    raw_server.answer = head + b"\r\n\r\n" + body

    async def fetch() -> None:
        reader = reader_for(raw_server.url)
        async with reader:
            if how == "into":  # a store's get_range
                await reader.read_into(0, memoryview(bytearray(100)), if_match="abc")
            elif how == "whole":  # a peer's payload
                await reader.fetch_whole("k", lambda info: None)
            else:  # a download's part
                await reader.stream(0, 100, if_match="abc", sink=lambda batch: None)

    try:
        loop.run(fetch())
    except StoreError:
        pass


# -- S3 answer fields through the hostile proxy --------------------------------------------


@pytest.fixture(scope="module")
def hostile_s3(loop, s3_server):
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id="testing-access-key",
        aws_secret_access_key="testing-secret-key",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="fuzz")
    client.put_object(Bucket="fuzz", Key="k", Body=b"x" * 100)
    stack = contextlib.AsyncExitStack()

    async def start() -> tuple[FaultProxy, S3Store]:
        proxy = await stack.enter_async_context(FaultProxy(s3_server))
        store = await stack.enter_async_context(S3Store(moto_bucket_config(proxy.url, "fuzz")))
        return proxy, store

    yield loop.run(start())
    loop.run(stack.aclose())


header_values = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    st.sampled_from(["-1", "1e3", "99999999999999999999999999", "yesterday", '""', "Tue, 99 Foo"]),
)


@FUZZ
@given(
    name=st.sampled_from(["ETag", "Content-Length", "Last-Modified", "Content-Range"]),
    value=st.one_of(header_values, st.none()),
)
@example(name="Last-Modified", value="001000000000000")  # found: botocore's RuntimeError
def test_lying_head_fields_raise_only_store_errors(loop, hostile_s3, name, value):
    proxy, store = hostile_s3

    def rewrite(answer: Response) -> Response:
        kept = [(k, v) for k, v in answer.headers if k.lower() != name.lower()]
        if value is not None:
            kept.append((name, value))
        return Response(answer.status_line, kept, answer.body)

    proxy.faults[:] = [Fault("rewrite", method="HEAD", rewrite=rewrite, times=None)]
    try:
        info = loop.run(store.head("k"))
    except StoreError:
        return
    assert info.size >= 0 and info.etag and '"' not in info.etag


xml_items = st.lists(
    st.builds(
        "<Contents><Key>{}</Key><Size>{}</Size><LastModified>{}</LastModified></Contents>".format,
        st.text(
            st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="<&"), max_size=12
        ),
        st.one_of(st.integers(-3, 10**6).map(str), header_values),
        st.sampled_from(["2026-01-01T00:00:00.000Z", "yesterday", "", "9999-99-99"]),
    ),
    max_size=5,
)


@FUZZ
@given(
    items=xml_items,
    truncated=st.sampled_from(["true", "false", "maybe", ""]),
    token=st.sampled_from(["", "t", "u"]),
    junk=st.binary(max_size=30),
)
def test_lying_listings_raise_only_store_errors(loop, hostile_s3, items, truncated, token, junk):
    proxy, store = hostile_s3
    xml = (
        f"<?xml version='1.0'?><ListBucketResult><IsTruncated>{truncated}</IsTruncated>"
        f"<NextContinuationToken>{token}</NextContinuationToken>{''.join(items)}"
        "</ListBucketResult>"
    ).encode() + junk

    def rewrite(answer: Response) -> Response:
        return Response(answer.status_line, answer.headers, xml)

    proxy.faults[:] = [Fault("rewrite", rewrite=rewrite, times=None, path_contains="list-type")]

    async def listed() -> list[str]:
        async with asyncio.timeout(10):  # a listing that went round in circles fails here
            return [info.key async for info in store.list("")]

    try:
        keys = loop.run(listed())
    except StoreError:
        return
    assert keys == sorted(set(keys))


# -- store URLs --------------------------------------------------------------------------

urls = st.one_of(
    st.text(max_size=80),
    st.builds(
        "{}{}".format,
        st.sampled_from(
            ["s3://", "https://", "http://", "hf://", "hf://datasets/", "file://", "ftp://"]
        ),
        st.text(max_size=60),
    ),
)


@FUZZ
@given(urls)
@example("http://[")  # found by fuzzing: urlsplit raised ValueError
@example("https://host:99999999/x")
def test_store_urls_parse_or_raise_a_config_error(url):
    try:
        location = parse_store_url(url, hf_endpoint="https://hub.example")
    except TplrError:
        return
    if location.scheme == "http":
        assert location.base_url is not None and location.base_url.endswith("/")
        assert ".." not in location.key.split("/") or not location.hub
