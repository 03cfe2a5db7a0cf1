"""upload_file / upload_bytes and ``tplr put`` against the real moto S3 server (directly and
through a small fault-injecting HTTP proxy on loopback) and real LocalStore folders."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from pydantic import SecretStr

from tplr.comms.config import BucketConfig
from tplr.comms.errors import AccessDenied, IntegrityError, InvalidRequest, NotFound, TransientError
from tplr.comms.retry import RetryPolicy
from tplr.comms.stores.base import ObjectStore
from tplr.comms.stores.local import LocalStore, multipart_etag
from tplr.comms.stores.s3 import S3Store
from tplr.comms.transfer_config import TransferConfig
from tplr.comms.upload import MAX_PARTS, plan_part_size, upload_bytes, upload_file

MiB = 1024 * 1024
SMALL_PARTS = TransferConfig(
    upload_part_size=5 * MiB, upload_multipart_threshold=5 * MiB, upload_max_workers=3
)
FAST_RETRY = RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.05, total_timeout_s=30)


def write_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def s3_store(endpoint: str, bucket: str, transfer: TransferConfig = SMALL_PARTS) -> S3Store:
    config = BucketConfig(
        bucket_name=bucket,
        access_key_id=SecretStr(TEST_ACCESS_KEY),
        secret_access_key=SecretStr(TEST_SECRET_KEY),
        endpoint_url=endpoint,
        region="us-east-1",
    )
    return S3Store(config, transfer)


@pytest.fixture(params=["local", "s3"])
async def store(request, tmp_path) -> AsyncIterator[ObjectStore]:
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
        return
    async with s3_store(
        request.getfixturevalue("s3_server"), request.getfixturevalue("bucket")
    ) as s3:
        yield s3


def in_progress_uploads(store: ObjectStore, request) -> list:
    if isinstance(store, S3Store):
        client = request.getfixturevalue("s3_client")
        return client.list_multipart_uploads(Bucket=store.bucket_name).get("Uploads", [])
    assert isinstance(store, LocalStore)
    uploads = store.root / ".tplr-store" / "uploads"
    return list(uploads.iterdir()) if uploads.exists() else []


# -- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "parts"),
    [
        (0, 1),
        (1, 1),
        (5 * MiB - 1, 1),  # just under the threshold: one PUT
        (5 * MiB, 1),  # at the threshold: multipart with a single part
        (10 * MiB, 2),  # an exact multiple of the part size
        (10 * MiB + 1, 3),  # a 1-byte last part
        (12 * MiB + 12_345, 3),
    ],
)
async def test_round_trip(store: ObjectStore, tmp_path: Path, size: int, parts: int):
    data = write_file(tmp_path / "src.bin", size)
    seen: list[int] = []
    result = await upload_file(
        store, tmp_path / "src.bin", "up/obj.bin", config=SMALL_PARTS, progress=seen.append
    )
    assert (result.size, result.parts, result.retries, sum(seen)) == (size, parts, 0, size)
    if size < SMALL_PARTS.upload_multipart_threshold:
        assert result.etag == hashlib.md5(data).hexdigest()
    else:
        digests = [hashlib.md5(data[i : i + 5 * MiB]).hexdigest() for i in range(0, size, 5 * MiB)]
        assert result.etag == multipart_etag(digests) and result.etag.endswith(f"-{parts}")
    assert await store.get("up/obj.bin") == data
    assert (await store.head("up/obj.bin")).etag == result.etag


def test_part_size_grows_to_stay_within_10000_equal_parts():
    assert plan_part_size(10 * MiB, 64 * MiB) == 64 * MiB
    assert plan_part_size(MAX_PARTS * 5 * MiB, 5 * MiB) == 5 * MiB
    grown = plan_part_size(MAX_PARTS * 5 * MiB + 1, 5 * MiB)
    assert grown == 6 * MiB and -(-(MAX_PARTS * 5 * MiB + 1) // grown) <= MAX_PARTS
    huge = 3 * 1024**4
    assert grown % MiB == 0 and -(-huge // plan_part_size(huge, 64 * MiB)) <= MAX_PARTS
    with pytest.raises(InvalidRequest, match="too large"):
        plan_part_size(MAX_PARTS * 5 * 1024**3 + 1, 64 * MiB)


async def test_upload_bytes_small_payload(store: ObjectStore):
    result = await upload_bytes(store, b"gradient payload", "g/1.safetensors")
    assert result.etag == hashlib.md5(b"gradient payload").hexdigest()
    assert await store.get("g/1.safetensors") == b"gradient payload"


async def test_bad_sources(store: ObjectStore, tmp_path: Path):
    with pytest.raises(NotFound, match="does not exist"):
        await upload_file(store, tmp_path / "missing.bin", "k")
    with pytest.raises(InvalidRequest, match="not a regular file"):
        await upload_file(store, tmp_path, "k")


# -- failures leave no multipart upload behind --------------------------------------------


async def test_cancellation_aborts_the_upload(store: ObjectStore, tmp_path: Path, request):
    write_file(tmp_path / "src.bin", 20 * MiB)
    config = TransferConfig(
        upload_part_size=5 * MiB, upload_multipart_threshold=5 * MiB, upload_max_workers=1
    )
    first_part_done = asyncio.Event()
    task = asyncio.create_task(
        upload_file(
            store,
            tmp_path / "src.bin",
            "k",
            config=config,
            progress=lambda n: first_part_done.set(),
        )
    )
    await first_part_done.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert in_progress_uploads(store, request) == []
    with pytest.raises(NotFound):
        await store.head("k")


async def test_source_changing_mid_upload_aborts(store: ObjectStore, tmp_path: Path, request):
    src = tmp_path / "src.bin"
    write_file(src, 11 * MiB)

    def append_once(n_bytes: int) -> None:
        if src.stat().st_size == 11 * MiB:
            with open(src, "ab") as fh:
                fh.write(b"late writer")

    with pytest.raises(IntegrityError, match="changed while it was being uploaded"):
        await upload_file(store, src, "k", config=SMALL_PARTS, progress=append_once)
    assert in_progress_uploads(store, request) == []
    with pytest.raises(NotFound):
        await store.head("k")


async def test_memory_stays_bounded_by_the_parts_in_flight(tmp_path: Path):
    """60 MiB through 5 MiB parts with 2 workers: 4 parts in memory (and for a moment one
    or two more, until a worker thread drops its arguments), never the whole file."""
    src = tmp_path / "src.bin"
    with open(src, "wb") as fh:
        for _ in range(12):
            fh.write(os.urandom(5 * MiB))
        fh.write(b"!")
    config = TransferConfig(
        upload_part_size=5 * MiB, upload_multipart_threshold=5 * MiB, upload_max_workers=2
    )
    tracemalloc.start()
    try:
        result = await upload_file(LocalStore(tmp_path / "store"), src, "k", config=config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.parts == 13
    assert peak < 36 * MiB, f"peak {peak / MiB:.1f} MiB for a 60 MiB file"


# -- a fault-injecting proxy in front of moto ---------------------------------------------


@dataclass
class Fault:
    """Answer ``status``/``code`` (or corrupt the body when code is 'corrupt') to requests
    that ``matches`` accepts, ``times`` times (-1: always)."""

    matches: Callable[[web.Request], bool]
    status: int = 500
    code: str = "InternalError"
    times: int = 1


@dataclass
class FaultProxy:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    seen: Counter[str] = field(default_factory=Counter)
    session: aiohttp.ClientSession | None = None
    opaque_etags: bool = False  # behave like a server whose ETags are not MD5s (SSE-KMS)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen[describe(request)] += 1
        if self.opaque_etags and describe(request) == "Complete":
            if body.count(b"<ETag>") != body.count(b'<ETag>"opaque-'):
                return web.Response(status=400, body=b"<Error><Code>InvalidPart</Code></Error>")
            body = body.replace(b'"opaque-', b'"')
        for fault in self.faults:
            if fault.times != 0 and fault.matches(request):
                fault.times -= 1
                if fault.code != "corrupt":
                    xml = f"<Error><Code>{fault.code}</Code><Message>injected</Message></Error>"
                    return web.Response(status=fault.status, body=xml.encode())
                body = bytes([body[0] ^ 0xFF]) + body[1:]
        assert self.session is not None
        skip = {"content-length", "transfer-encoding", "host"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        async with self.session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in skip}
            if self.opaque_etags and "etag" in upstream.headers:
                out = {k: v for k, v in out.items() if k.lower() != "etag"}
                out["ETag"] = '"opaque-' + upstream.headers["etag"].strip('"') + '"'
            response = web.Response(status=upstream.status, body=payload, headers=out)
            if request.method == "HEAD":
                response.headers["Content-Length"] = upstream.headers.get("Content-Length", "0")
            return response


def describe(request: web.Request) -> str:
    """``UploadPart 2``, ``Complete``, ``Abort``, ``Create``, ``PUT``, ``GET``, ``HEAD``."""
    query = request.query
    if "partNumber" in query:
        return f"UploadPart {query['partNumber']}"
    if "uploads" in query:
        return "Create"
    if "uploadId" in query:
        return {"POST": "Complete", "DELETE": "Abort"}.get(request.method, "ListParts")
    return request.method


def part(number: int) -> Callable[[web.Request], bool]:
    return lambda request: describe(request) == f"UploadPart {number}"


@pytest.fixture
async def proxy(s3_server) -> AsyncIterator[tuple[FaultProxy, str]]:
    fault_proxy = FaultProxy(upstream=s3_server)
    app = web.Application(client_max_size=64 * MiB)
    app.router.add_route("*", "/{tail:.*}", fault_proxy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        fault_proxy.session = session
        try:
            yield fault_proxy, f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


@dataclass
class RecordingMetrics:
    """Implements the UploadMetrics protocol by recording what it is told."""

    parts: list[int] = field(default_factory=list)
    retries: Counter[str] = field(default_factory=Counter)
    integrity_failures: int = 0
    other_requests: int = 0
    active: int = 0
    most_active: int = 0

    def observe_part(self, direction: str, size_bytes: int, seconds: float) -> None:
        assert direction == "upload" and seconds >= 0
        self.parts.append(size_bytes)

    def observe_request(self, direction: str) -> None:
        self.other_requests += 1

    @contextlib.contextmanager
    def track_active(self, direction: str) -> Iterator[None]:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            yield
        finally:
            self.active -= 1

    def observe_retry(self, direction: str, reason: str) -> None:
        self.retries[reason] += 1

    def observe_integrity_failure(self, direction: str) -> None:
        self.integrity_failures += 1


async def test_transient_faults_are_retried_part_by_part(proxy, bucket, tmp_path, s3_client):
    fault_proxy, endpoint = proxy
    fault_proxy.faults = [
        Fault(part(1), 500, "InternalError"),
        Fault(part(2), 503, "SlowDown"),
        Fault(part(3), code="corrupt"),
    ]
    data = write_file(tmp_path / "src.bin", 12 * MiB)
    metrics = RecordingMetrics()
    async with s3_store(endpoint, bucket) as s3:
        result = await upload_file(
            s3, tmp_path / "src.bin", "k", config=SMALL_PARTS, policy=FAST_RETRY, metrics=metrics
        )
        assert s3.throttle.rate is not None  # the SlowDown slowed the store down
    assert result.retries == 3 and result.parts == 3
    assert metrics.retries == Counter({"transient": 1, "throttled": 1, "integrity": 1})
    assert metrics.integrity_failures == 1 and sorted(metrics.parts) == [2 * MiB, 5 * MiB, 5 * MiB]
    assert metrics.other_requests == 3 + 2  # the 3 failed tries, create and complete
    assert (metrics.most_active, metrics.active) == (1, 0)
    assert [fault_proxy.seen[f"UploadPart {n}"] for n in (1, 2, 3)] == [2, 2, 2]
    assert s3_client.get_object(Bucket=bucket, Key="k")["Body"].read() == data


@pytest.mark.parametrize(
    ("fault", "error", "attempts"),
    [
        (Fault(part(2), 500, "InternalError", times=-1), TransientError, FAST_RETRY.max_attempts),
        (Fault(part(2), 403, "AccessDenied", times=-1), AccessDenied, 1),
        (Fault(part(2), code="corrupt", times=-1), IntegrityError, FAST_RETRY.max_attempts),
    ],
)
async def test_a_part_failing_for_good_aborts_the_upload(
    proxy, bucket, tmp_path, s3_client, fault, error, attempts
):
    fault_proxy, endpoint = proxy
    fault_proxy.faults = [fault]
    write_file(tmp_path / "src.bin", 12 * MiB)
    async with s3_store(endpoint, bucket) as s3:
        with pytest.raises(error, match=f"s3://{bucket}/k"):
            await upload_file(s3, tmp_path / "src.bin", "k", config=SMALL_PARTS, policy=FAST_RETRY)
    assert fault_proxy.seen["UploadPart 2"] == attempts  # bounded; non-retryable: once
    assert fault_proxy.seen["Abort"] == 1 and fault_proxy.seen["Complete"] == 0
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert "Contents" not in s3_client.list_objects_v2(Bucket=bucket)


async def test_corrupted_single_put_is_sent_again(proxy, bucket, tmp_path, s3_client):
    fault_proxy, endpoint = proxy
    fault_proxy.faults = [Fault(lambda r: describe(r) == "PUT", code="corrupt")]
    data = write_file(tmp_path / "src.bin", 1000)
    async with s3_store(endpoint, bucket) as s3:
        result = await upload_file(s3, tmp_path / "src.bin", "k", policy=FAST_RETRY)
    assert result.retries == 1 and fault_proxy.seen["PUT"] == 2
    assert s3_client.get_object(Bucket=bucket, Key="k")["Body"].read() == data


@pytest.mark.parametrize("size", [1000, 11 * MiB])
async def test_servers_whose_etags_are_not_md5s(proxy, bucket, tmp_path, s3_client, size):
    """Verification off: parts are completed with the ETags the server gave, not MD5s.
    Verification on: such a server is reported as an integrity problem, and aborted."""
    fault_proxy, endpoint = proxy
    fault_proxy.opaque_etags = True
    data = write_file(tmp_path / "src.bin", size)
    async with s3_store(endpoint, bucket) as s3:
        result = await upload_file(
            s3, tmp_path / "src.bin", "k", config=SMALL_PARTS, policy=FAST_RETRY, verify_etag=False
        )
        assert result.etag.startswith("opaque-") and result.retries == 0
        assert s3_client.get_object(Bucket=bucket, Key="k")["Body"].read() == data
        with pytest.raises(IntegrityError, match="ETag opaque-"):
            await upload_file(s3, tmp_path / "src.bin", "k2", config=SMALL_PARTS, policy=FAST_RETRY)
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# -- tplr put ------------------------------------------------------------------------------


def run_put(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tplr", "put", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def aws_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_ENDPOINT_URL": endpoint,
    }


def test_put_cli_multipart_with_aws_env(s3_server, bucket, s3_client, tmp_path):
    data = write_file(tmp_path / "shard.bin", 11 * MiB + 7)
    done = run_put(
        str(tmp_path / "shard.bin"),
        f"s3://{bucket}/data/",
        "--workers",
        "2",
        "--part-size",
        "5MiB",
        "--multipart-threshold",
        "5MiB",
        env=aws_env(s3_server),
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert f"s3://{bucket}/data/shard.bin" in line
    for fragment in (f"{11 * MiB + 7} bytes", " s,", "MB/s", "0 retries", "3 part(s)"):
        assert fragment in line
    assert s3_client.get_object(Bucket=bucket, Key="data/shard.bin")["Body"].read() == data


def test_put_cli_with_r2_gradient_names(s3_server, bucket, s3_client, tmp_path):
    write_file(tmp_path / "g.bin", 100)
    env = {
        "R2_GRADIENTS_BUCKET_NAME": bucket,
        "R2_GRADIENTS_WRITE_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "R2_GRADIENTS_WRITE_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "R2_GRADIENTS_ENDPOINT_URL": s3_server,
    }
    done = run_put(str(tmp_path / "g.bin"), f"s3://{bucket}/g/1.bin", env=env)
    assert done.returncode == 0, done.stderr
    assert s3_client.head_object(Bucket=bucket, Key="g/1.bin")["ContentLength"] == 100


def test_put_cli_to_a_local_folder(tmp_path):
    data = write_file(tmp_path / "a.bin", 4321)
    (tmp_path / "out").mkdir()
    done = run_put(str(tmp_path / "a.bin"), f"file://{tmp_path}/out/", env={})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "a.bin").read_bytes() == data


@pytest.mark.parametrize(
    ("dest", "env_kind", "expected"),
    [
        ("s3://no-such-bucket-cli/k", "aws", "error: bucket 'no-such-bucket-cli' does not exist"),
        ("s3://some-bucket/k", "none", "error: no credentials to write s3://some-bucket"),
        ("gs://b/k", "aws", "error: unsupported URL scheme"),
    ],
)
def test_put_cli_errors_are_one_line_with_a_hint(s3_server, tmp_path, dest, env_kind, expected):
    write_file(tmp_path / "a.bin", 10)
    env = aws_env(s3_server) if env_kind == "aws" else {}
    done = run_put(str(tmp_path / "a.bin"), dest, env=env)
    runtime_failure = "does not exist" in expected  # exit 1; configuration errors exit 2
    assert done.returncode == (1 if runtime_failure else 2), done.stderr
    lines = [ln for ln in done.stderr.splitlines() if not ln.startswith("127.0.0.1")]
    assert lines[0].startswith(expected), done.stderr
    assert lines[1].startswith("hint: ") and len(lines) == 2, done.stderr
    assert "Traceback" not in done.stderr and TEST_SECRET_KEY not in done.stderr
    if env_kind == "none":
        assert "AWS_ACCESS_KEY_ID" in lines[1] and "R2_GRADIENTS_WRITE_ACCESS_KEY_ID" in lines[1]


def test_put_cli_sigterm_aborts_the_multipart_upload(s3_server, bucket, s3_client, tmp_path):
    with open(tmp_path / "big.bin", "wb") as fh:
        for _ in range(20):
            fh.write(os.urandom(5 * MiB))
    command = [sys.executable, "-m", "tplr", "put", str(tmp_path / "big.bin"), f"s3://{bucket}/big"]
    flags = ["--workers", "1", "--part-size", "5MiB", "--multipart-threshold", "5MiB"]
    proc = subprocess.Popen(
        command + flags,
        env={**os.environ, **aws_env(s3_server)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "upload was aborted" in stderr and "Traceback" not in stderr
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert "Contents" not in s3_client.list_objects_v2(Bucket=bucket)


async def test_upload_feeds_the_shared_transfer_metrics(tmp_path):
    from prometheus_client import CollectorRegistry

    from tplr.comms.transfer_metrics import TransferMetrics

    registry = CollectorRegistry()
    metrics = TransferMetrics(registry=registry)
    write_file(tmp_path / "src.bin", 11 * MiB)
    store = LocalStore(tmp_path / "store")
    await upload_file(store, tmp_path / "src.bin", "k", config=SMALL_PARTS, metrics=metrics)
    labels = {"direction": "upload"}
    assert registry.get_sample_value("tplr_transfer_bytes_total", labels) == 11 * MiB
    assert registry.get_sample_value("tplr_transfer_part_seconds_count", labels) == 3
    assert registry.get_sample_value("tplr_transfer_requests_total", labels) == 3 + 2
    assert registry.get_sample_value("tplr_transfer_active", labels) == 0
