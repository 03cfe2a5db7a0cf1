"""The ObjectStore contract, run on both backends (S3Store against the real moto S3 server,
LocalStore on a real directory), and the S3-specific behaviour: error mapping from real
server answers (moto in IAM-auth mode for 403s, a scripted aiohttp server for throttling,
5xx, truncated and stalled bodies), no hidden botocore retries, no secrets in output."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY, moto_bucket_config

from tplr.comms.config import BucketConfig
from tplr.comms.errors import (
    AccessDenied,
    InvalidRequest,
    NotFound,
    PreconditionFailed,
    Throttled,
    TransientError,
)
from tplr.comms.stores.base import CompletedPart, ObjectStore
from tplr.comms.stores.local import LocalStore, multipart_etag
from tplr.comms.stores.s3 import S3Store
from tplr.comms.stores.url import bucket_config_for, open_store_for_url, parse_store_url
from tplr.comms.transfer_config import TransferConfig
from tplr.errors import ConfigError

MiB = 1024 * 1024


def bucket_config(
    endpoint: str, name: str, key: str = TEST_ACCESS_KEY, secret: str = TEST_SECRET_KEY
) -> BucketConfig:
    return moto_bucket_config(endpoint, name, key=key, secret=secret)


@pytest.fixture(params=["local", "s3"])
async def store(request, tmp_path) -> AsyncIterator[ObjectStore]:
    if request.param == "local":
        async with LocalStore(tmp_path / "store") as local:
            yield local
        return
    endpoint = request.getfixturevalue("s3_server")
    name = request.getfixturevalue("bucket")
    async with S3Store(bucket_config(endpoint, name), list_page_size=2) as s3:
        yield s3


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes whose period (251) differs from every part size used."""
    pattern = bytes((i * 7 + seed) % 251 for i in range(251))
    return (pattern * (size // 251 + 1))[:size]


async def listed(store: ObjectStore, prefix: str = "") -> list[str]:
    return [info.key async for info in store.list(prefix)]


# -- the contract, both stores ------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 100_003])
async def test_round_trip_sizes(store: ObjectStore, size: int):
    data = payload(size)
    info = await store.put("dir/obj.bin", data)
    assert info.size == size and info.etag == hashlib.md5(data).hexdigest()
    head = await store.head("dir/obj.bin")
    assert (head.size, head.etag) == (size, info.etag)
    assert head.last_modified.tzinfo is not None
    assert await store.get("dir/obj.bin") == data
    ranges = {(0, size), (0, 0), (size, 0)}
    if size:
        ranges |= {(0, 1), (size - 1, 1), (size // 3, size - size // 3 - 1 if size > 2 else 1)}
    for offset, length in ranges:
        buf = bytearray(b"\xee" * length)
        await store.get_range("dir/obj.bin", offset, memoryview(buf), if_match=info.etag)
        assert bytes(buf) == data[offset : offset + length], (offset, length)
    assert await listed(store, "dir/") == ["dir/obj.bin"]


async def test_get_range_pins_the_etag(store: ObjectStore):
    old = await store.put("k", b"version one")
    new = await store.put("k", b"version two!")
    assert old.etag != new.etag
    for length in (4, 0):
        with pytest.raises(PreconditionFailed):
            await store.get_range("k", 0, memoryview(bytearray(length)), if_match=old.etag)
    buf = bytearray(4)
    await store.get_range("k", 8, memoryview(buf), if_match=f'"{new.etag}"')
    assert buf == b"two!"


async def test_get_range_past_the_end(store: ObjectStore):
    await store.put("k", b"0123456789")
    with pytest.raises(TransientError, match="short read"):
        await store.get_range("k", 8, memoryview(bytearray(5)))
    with pytest.raises(InvalidRequest, match="not satisfiable"):
        await store.get_range("k", 10, memoryview(bytearray(5)))


async def test_missing_key(store: ObjectStore):
    await store.put("present", b"x")
    with pytest.raises(NotFound) as err:
        await store.head("absent/key")
    assert "absent/key" in str(err.value) and "bucket" not in err.value.message
    with pytest.raises(NotFound, match="absent/key"):
        await store.get("absent/key")
    with pytest.raises(NotFound, match="absent/key"):
        await store.get_range("absent/key", 0, memoryview(bytearray(3)))
    await store.delete("absent/key")  # deleting a missing key is fine
    await store.delete("present")
    with pytest.raises(NotFound):
        await store.head("present")
    assert await listed(store) == []


async def test_list_prefix_is_a_string_prefix_in_key_order(store: ObjectStore):
    keys = ["b/c", "a/2", "ab", "a/1", "a/sub/3", "c"]
    for key in keys:
        await store.put(key, key.encode())
    assert await listed(store) == sorted(keys)
    assert await listed(store, "a") == ["a/1", "a/2", "a/sub/3", "ab"]
    assert await listed(store, "a/") == ["a/1", "a/2", "a/sub/3"]
    assert await listed(store, "a/s") == ["a/sub/3"]
    assert await listed(store, "zzz/") == []
    sizes = {info.key: info.size async for info in store.list()}
    assert sizes["a/sub/3"] == len("a/sub/3")


async def test_multipart_round_trip_and_etag(store: ObjectStore):
    parts_data = [payload(5 * MiB, 1), payload(5 * MiB, 2), payload(12_345, 3)]
    upload_id = await store.create_multipart("big/obj")
    etags = []
    for number, data in enumerate(parts_data, start=1):
        etags.append(await store.upload_part("big/obj", upload_id, number, data))
    assert etags == [hashlib.md5(d).hexdigest() for d in parts_data]
    parts = [CompletedPart(n, e) for n, e in enumerate(etags, start=1)]
    info = await store.complete_multipart("big/obj", upload_id, parts)
    assert info.etag == multipart_etag(etags) and info.etag.endswith("-3")
    assert info.size == sum(len(d) for d in parts_data)
    assert await store.get("big/obj") == b"".join(parts_data)
    assert (await store.head("big/obj")).etag == info.etag
    if isinstance(store, LocalStore):  # moto answers 500 here where S3 says NoSuchUpload
        with pytest.raises(NotFound):  # a completed upload is gone
            await store.upload_part("big/obj", upload_id, 4, b"late")


async def test_multipart_reuploaded_part_replaces_the_first(store: ObjectStore):
    upload_id = await store.create_multipart("obj")
    await store.upload_part("obj", upload_id, 1, b"first try")
    etag = await store.upload_part("obj", upload_id, 1, b"second")
    info = await store.complete_multipart("obj", upload_id, [CompletedPart(1, etag)])
    assert await store.get("obj") == b"second" and info.etag == multipart_etag([etag])


async def test_multipart_abort_leaves_nothing(store: ObjectStore, request):
    upload_id = await store.create_multipart("obj")
    await store.upload_part("obj", upload_id, 1, b"x" * 1000)
    await store.abort_multipart("obj", upload_id)
    await store.abort_multipart("obj", upload_id)  # idempotent
    if isinstance(store, LocalStore):  # moto answers 500 here where S3 says NoSuchUpload
        with pytest.raises(NotFound):
            await store.complete_multipart("obj", upload_id, [CompletedPart(1, "0" * 32)])
    with pytest.raises(NotFound):
        await store.head("obj")
    if isinstance(store, S3Store):
        client = request.getfixturevalue("s3_client")
        uploads = client.list_multipart_uploads(Bucket=store.bucket_name).get("Uploads", [])
        assert uploads == []
    else:
        assert list((store.root / ".tplr-store" / "uploads").iterdir()) == []
    assert await listed(store) == []


# -- S3-specific ---------------------------------------------------------------------------


async def test_missing_bucket_is_named(s3_server):
    async with S3Store(bucket_config(s3_server, "no-such-bucket-x")) as s3:
        for attempt in (s3.head("k"), s3.get("k"), s3.put("k", b"1"), listed(s3)):
            with pytest.raises(NotFound, match="bucket 'no-such-bucket-x' does not exist"):
                await attempt


async def test_secrets_never_printed(s3_server):
    secret = "very-secret-value-123"
    async with S3Store(bucket_config(s3_server, "no-such-bucket-y", secret=secret)) as s3:
        assert secret not in repr(s3) and s3_server in repr(s3)
        with pytest.raises(NotFound) as err:
            await s3.get("k")
    assert secret not in str(err.value) and s3_server in str(err.value)


async def test_store_outside_async_with_is_a_clear_error(s3_server, bucket):
    s3 = S3Store(bucket_config(s3_server, bucket))
    with pytest.raises(RuntimeError, match="async with"):
        await s3.head("k")


async def test_open_range_streams_chunks_and_leaves_caller_errors_alone(s3_server, bucket):
    data = payload(3 * MiB + 5)
    async with S3Store(bucket_config(s3_server, bucket)) as s3:
        await s3.put("k", data)
        async with s3.open_range("k", 5, 3 * MiB) as chunks:
            received = [chunk async for chunk in chunks]
        assert len(received) > 1 and b"".join(received) == data[5 : 5 + 3 * MiB]
        with pytest.raises(OSError, match="No space left"):  # not turned into TransientError
            async with s3.open_range("k", 0, 3 * MiB) as chunks:
                async for _ in chunks:
                    raise OSError(28, "No space left on device")
        assert await s3.get("k") == data  # an abandoned body did not poison the pool
        async with s3.open_range("k", 7, 0) as chunks:
            assert [chunk async for chunk in chunks] == []


@pytest.mark.parametrize(
    ("bucket_name", "which", "code"),
    [
        ("good", "wrong-secret", "SignatureDoesNotMatch"),
        ("good", "unknown-key", "InvalidAccessKeyId"),
        ("other", "valid", "AccessDenied"),
    ],
)
async def test_refused_credentials_raise_access_denied(s3_auth_server, bucket_name, which, code):
    endpoint, creds = s3_auth_server
    key, secret = {
        "valid": (creds["key"], creds["secret"]),
        "wrong-secret": (creds["key"], "not-the-secret"),
        "unknown-key": ("AKIAUNKNOWNKEY000000", "whatever"),
    }[which]
    async with S3Store(bucket_config(endpoint, "good", creds["key"], creds["secret"])) as ok:
        await ok.put("k", b"data")  # the user itself works
    async with S3Store(bucket_config(endpoint, bucket_name, key, secret)) as s3:
        for attempt in (s3.get("k"), s3.put("k", b"1"), s3.head("k")):
            with pytest.raises(AccessDenied) as err:
                await attempt
            assert f"s3://{bucket_name}/k" in str(err.value) and endpoint in str(err.value)
            assert secret not in str(err.value)
        with pytest.raises(AccessDenied, match=code):
            await s3.get("k")


class ScriptedS3:
    """A real HTTP server on loopback answering like a misbehaving S3 endpoint.

    The key decides the behaviour; every request is counted per key.
    """

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.body = payload(100)
        self.release = asyncio.Event()

    @staticmethod
    def error(status: int, code: str) -> web.Response:
        xml = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>scripted</Message></Error>"
        return web.Response(status=status, body=xml.encode(), content_type="application/xml")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        key = request.path.split("/", 2)[2]
        self.requests[key] += 1
        canned = {
            "slowdown": (503, "SlowDown"),
            "toomany": (429, "TooManyRequests"),
            "internal": (500, "InternalError"),
            "unavailable": (503, "ServiceUnavailable"),
            "badrequest": (400, "InvalidArgument"),
        }
        if key in canned:
            return self.error(*canned[key])
        headers = {"ETag": '"abc"', "Content-Length": "50", "Content-Range": "bytes 10-59/100"}
        if key == "norange":
            return web.Response(status=200, body=self.body, headers={"ETag": '"abc"'})
        response = web.StreamResponse(status=206, headers=headers)
        await response.prepare(request)
        await response.write(self.body[:20])
        if key == "stall":
            await self.release.wait()
        assert request.transport is not None
        request.transport.close()  # "truncated": the connection drops mid-body
        return response


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedS3, str]]:
    server = ScriptedS3()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.release.set()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("key", "error", "throttled"),
    [
        ("slowdown", Throttled, True),
        ("toomany", Throttled, True),
        ("internal", TransientError, False),
        ("unavailable", TransientError, False),
        ("badrequest", InvalidRequest, False),
        ("truncated", TransientError, False),
        ("stall", TransientError, False),
        ("norange", InvalidRequest, False),
    ],
)
async def test_server_failures_map_to_typed_errors_in_one_attempt(scripted, key, error, throttled):
    server, endpoint = scripted
    transfer = TransferConfig(transfer_read_timeout_s=0.5, transfer_connect_timeout_s=1)
    async with S3Store(bucket_config(endpoint, "bkt"), transfer) as s3:
        assert s3.throttle.rate is None
        with pytest.raises(error) as err:
            await s3.get_range(key, 10, memoryview(bytearray(50)))
        assert f"s3://bkt/{key}" in str(err.value) and endpoint in str(err.value)
        assert server.requests[key] == 1  # botocore made no retries of its own
        assert (s3.throttle.rate is not None) == throttled  # SlowDown slowed the store down


# -- store_url: URLs and credentials --------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "bucket", "key"),
    [
        ("s3://my-bucket/a/b.bin", "s3", "my-bucket", "a/b.bin"),
        ("s3://my-bucket/dir with space/x#1?.bin", "s3", "my-bucket", "dir with space/x#1?.bin"),
        ("s3://my-bucket", "s3", "my-bucket", ""),
    ],
)
def test_parse_s3_urls(url, scheme, bucket, key):
    parsed = parse_store_url(url)
    assert (parsed.scheme, parsed.bucket, parsed.key) == (scheme, bucket, key)


def test_parse_local_urls(tmp_path):
    for url in (
        f"file://{tmp_path}/x.bin",
        f"file://localhost{tmp_path}/x.bin",
        f"{tmp_path}/x.bin",
    ):
        parsed = parse_store_url(url)
        assert (parsed.scheme, parsed.root, parsed.key) == ("file", tmp_path, "x.bin")
    folder = parse_store_url(f"file://{tmp_path}/sub%20dir/")
    assert (folder.root, folder.key) == (tmp_path / "sub dir", "")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://AB/k", "invalid bucket name"),
        ("s3:///k", "invalid bucket name"),
        ("gs://bucket/k", "unsupported URL scheme"),
        ("file://otherhost/x", "names host"),
        ("", "empty path"),
    ],
)
def test_bad_urls(url, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_store_url(url)
    assert err.value.hint


def r2_env(prefix: str, bucket: str, kinds: tuple[str, ...], **extra: str) -> dict[str, str]:
    env = {f"{prefix}BUCKET_NAME": bucket, f"{prefix}ACCOUNT_ID": "acc123", **extra}
    for kind in kinds:
        env[f"{prefix}{kind}_ACCESS_KEY_ID"] = f"{kind.lower()}-key"
        env[f"{prefix}{kind}_SECRET_ACCESS_KEY"] = f"{kind.lower()}-secret"
    return env


def test_credentials_from_the_deployment_r2_names():
    env = {
        **r2_env("R2_DATASET_", "dataset", ("READ",), R2_DATASET_REQUESTS_PER_SECOND="50"),
        **r2_env("R2_GRADIENTS_", "grads", ("READ", "WRITE")),
        "AWS_ACCESS_KEY_ID": "aws-key",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    }
    dataset = bucket_config_for("dataset", env=env)
    assert dataset.access_key_id.get_secret_value() == "read-key"
    assert dataset.resolved_endpoint() == "https://acc123.r2.cloudflarestorage.com"
    assert (dataset.region, dataset.requests_per_second) == ("auto", 50.0)
    assert bucket_config_for("grads", env=env).access_key_id.get_secret_value() == "read-key"
    writer = bucket_config_for("grads", access="write", env=env)
    assert writer.access_key_id.get_secret_value() == "write-key"
    other = bucket_config_for("other", access="write", env=env)  # falls back to AWS_*
    assert other.access_key_id.get_secret_value() == "aws-key"
    assert other.resolved_endpoint() == "http://127.0.0.1:9000" and other.region == "us-east-1"
    flag = bucket_config_for("dataset", endpoint_url="http://override:1", env=env)
    assert flag.resolved_endpoint() == "http://override:1"


@pytest.mark.parametrize(
    ("env", "bucket", "access", "names"),
    [
        ({}, "b-1", "read", ["AWS_ACCESS_KEY_ID", "R2_DATASET_READ_ACCESS_KEY_ID"]),
        ({}, "b-1", "write", ["AWS_SECRET_ACCESS_KEY", "R2_GRADIENTS_WRITE_SECRET_ACCESS_KEY"]),
        (r2_env("R2_GRADIENTS_", "g-1", ("READ",)), "g-1", "write", ["R2_GRADIENTS_WRITE_"]),
        (r2_env("R2_DATASET_", "d-1", ("READ",)), "d-1", "write", ["only read", "AWS_"]),
        ({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}, "b-1", "read", ["ENDPOINT"]),
        (r2_env("R2_DATASET_", "d-1", ("READ",), R2_DATASET_REQUESTS_PER_SECOND="-1"), "d-1",
         "read", ["R2_DATASET_REQUESTS_PER_SECOND"]),
    ],
)  # fmt: skip
def test_missing_credentials_name_the_variables(env, bucket, access, names):
    with pytest.raises(ConfigError) as err:
        bucket_config_for(bucket, access=access, env=env)
    text = str(err.value)
    for name in names:
        assert name in text
    assert "secret" not in text.replace("SECRET", "")


async def test_open_store_for_url_gives_the_right_store(s3_server, bucket, tmp_path):
    env = {
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_ENDPOINT_URL": s3_server,
    }
    async with open_store_for_url(f"s3://{bucket}/dir/k", env=env, access="write") as (s3, key):
        assert isinstance(s3, S3Store) and key == "dir/k"
        await s3.put(key, b"via url")
    async with open_store_for_url(f"file://{tmp_path}/out.bin") as (local, key):
        assert isinstance(local, LocalStore) and local.root == tmp_path and key == "out.bin"
    with pytest.raises(ConfigError, match="no credentials"):
        async with open_store_for_url(f"s3://{bucket}/k", env={}):
            pass


def test_reading_env_happens_only_when_called(monkeypatch, s3_server):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "late-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "late-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    config = bucket_config_for("late-bucket")
    assert config.access_key_id.get_secret_value() == "late-key"
