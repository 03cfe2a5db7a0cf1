"""``tplr fetch`` as operators run it: a real subprocess against real servers (moto S3,
moto with auth enforced, a local store), checking the summary line, the one-line errors
without tracebacks, flag/env validation, and SIGTERM leaving a resumable download."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys

import pytest
from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from fault_proxy import FaultProxy
from test_download import PART, payload

from tplr.comms.download.journal import JournalHeader, read_journal
from tplr.comms.download.sidecar import sidecar_paths
from tplr.comms.manifest import build_manifest, write_manifest_atomic
from tplr.comms.stores.local import LocalStore


def env_with(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=TEST_SECRET_KEY)
    env.update(extra)
    return env


def tplr(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tplr", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else env_with(),
        timeout=120,
    )


def assert_one_clear_error(res: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    """``code``: 2 for a usage/configuration error, 1 for a failure at run time."""
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], res.stderr
    assert "hint: " in res.stderr


async def test_fetch_from_a_local_store_into_a_folder(tmp_path):
    data = payload(3 * PART + 7)
    async with LocalStore(tmp_path / "store") as store:
        await store.put("a/b.bin", data)
    out = tmp_path / "out"
    out.mkdir()
    res = tplr("fetch", f"file://{tmp_path}/store/a/b.bin", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert (out / "b.bin").read_bytes() == data
    summary = res.stdout.strip().splitlines()[-1]
    assert f"-> {out / 'b.bin'}" in summary and f"({len(data)} bytes)" in summary
    assert " MB/s, 0 retries, verified: etag" in summary


async def test_a_dest_ending_in_a_slash_is_a_new_folder(tmp_path):
    data = payload(PART + 3)
    async with LocalStore(tmp_path / "store") as store:
        await store.put("a/b.bin", data)
    res = tplr(
        "fetch", f"file://{tmp_path}/store/a/b.bin", f"{tmp_path}/new/shards/", "--no-progress"
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "new" / "shards" / "b.bin").read_bytes() == data


def test_fetch_from_s3_with_a_manifest_file(s3_server, s3_client, bucket, tmp_path):
    data = payload(5 * PART + 1, seed=4)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "shard.bin").write_bytes(data)
    manifest = build_manifest(tmp_path / "src", part_size=PART)
    write_manifest_atomic(manifest, tmp_path / "manifest.json")
    s3_client.put_object(Bucket=bucket, Key="ds/shard.bin", Body=data)
    s3_client.put_object(Bucket=bucket, Key="ds/manifest.json", Body=manifest.to_json())
    for source in (str(tmp_path / "manifest.json"), f"s3://{bucket}/ds/manifest.json"):
        dest = tmp_path / "got.bin"
        res = tplr(
            "fetch", f"s3://{bucket}/ds/shard.bin", str(dest), "--endpoint-url", s3_server,
            "--manifest", source, "--workers", "2", "--no-progress",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert dest.read_bytes() == data and "verified: manifest" in res.stdout
        dest.unlink()


def test_missing_key_is_one_clear_line(s3_server, bucket, tmp_path):
    res = tplr(
        "fetch", f"s3://{bucket}/no/such.bin", str(tmp_path / "x"), "--endpoint-url", s3_server
    )
    assert_one_clear_error(res, "not found", f"s3://{bucket}/no/such.bin", code=1)
    assert not list(tmp_path.iterdir())


def test_missing_credentials_name_the_variables(s3_server, bucket, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "R2_"))}
    res = tplr("fetch", f"s3://{bucket}/k", str(tmp_path / "x"), env=env)
    assert_one_clear_error(res, f"no credentials to read s3://{bucket}")
    assert "AWS_ACCESS_KEY_ID" in res.stderr


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--workers", "0"], {}, "DOWNLOAD_MAX_WORKERS / --workers"),
        ([], {"DOWNLOAD_PART_SIZE": "1KiB"}, "DOWNLOAD_PART_SIZE / --part-size"),
        (["--part-size", "12 parsecs"], {}, "--part-size"),
        (["--checkpoint-interval", "0"], {}, "--checkpoint-interval"),
    ],
)
def test_bad_tuning_is_named(tmp_path, args, env, needle):
    res = tplr("fetch", "file:///nonexistent/x", str(tmp_path / "x"), *args, env=env_with(**env))
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr


async def test_wrong_credentials_are_access_denied(s3_server, tmp_path):
    """What R2 answers to a key it does not know, to every request (moto cannot check
    presigned URLs, which ``tplr fetch`` uses, so the proxy answers for it)."""
    from fault_proxy import Fault, FaultProxy

    url = "s3://some-bucket/k.bin"
    async with FaultProxy(s3_server) as proxy:
        for method in ("HEAD", "GET"):
            proxy.add(
                Fault("status", method=method, status=403, code="InvalidAccessKeyId", times=None)
            )
        res = await asyncio.to_thread(
            tplr, "fetch", url, str(tmp_path / "x"), "--endpoint-url", proxy.url
        )
    assert_one_clear_error(res, "access denied", "s3://some-bucket/k.bin", code=1)
    assert TEST_SECRET_KEY not in res.stderr + res.stdout
    assert "access key id and secret" in res.stderr


async def test_sigterm_stops_cleanly_and_the_next_run_resumes(
    s3_server, s3_client, bucket, tmp_path
):
    size = 20 * PART + 3
    data = payload(size, seed=8)
    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=data)
    dest = tmp_path / "k.bin"
    partial, journal = sidecar_paths(dest)
    header = JournalHeader("k.bin", size, hashlib.md5(data).hexdigest(), PART)
    args = [
        sys.executable, "-m", "tplr", "fetch", f"s3://{bucket}/k.bin", str(dest),
        "--part-size", "64KiB", "--workers", "2", "--checkpoint-interval", "30", "--no-progress",
    ]  # fmt: skip
    async with FaultProxy(s3_server, rate_bytes_per_s=1_000_000) as proxy:
        proc = await asyncio.create_subprocess_exec(
            *args, "--endpoint-url", proxy.url, env=env_with(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(60):
            while proxy.stats.body_bytes_sent < 4 * PART:
                await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = await proc.communicate()
        assert proc.returncode == 143, err.decode()
        assert "run the same command to resume" in err.decode() and b"Traceback" not in err
        assert not dest.exists()
        done = read_journal(journal, header)  # the final checkpoint ran despite the 30 s interval
        assert len(done) >= 3 and partial.stat().st_size == size
        proxy.rate_bytes_per_s = None
        res = await asyncio.to_thread(
            subprocess.run, [*args, "--endpoint-url", proxy.url], env=env_with(),
            capture_output=True, text=True,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert dest.read_bytes() == data and f"{len(done)} parts resumed" in res.stdout


def test_fetch_help_lists_the_flags():
    res = tplr("fetch", "--help")
    for flag in ("--endpoint-url", "--workers", "--part-size", "--verify", "--manifest"):
        assert flag in res.stdout
