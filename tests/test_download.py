"""The download engine end to end, through both real stores: the moto S3 server on
loopback and a LocalStore directory. Round trips of awkward sizes, every verification
mode, the disk-space preflight, shared concurrency slots and the metrics."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import moto_bucket_config as bucket_config
from prometheus_client import CollectorRegistry

from tplr.comms.buffers import TransferSlots
from tplr.comms.download.engine import download
from tplr.comms.download.journal import JournalHeader, JournalWriter, PartRecord
from tplr.comms.download.sidecar import sidecar_paths
from tplr.comms.errors import InsufficientSpace, IntegrityError, PreconditionFailed
from tplr.comms.manifest import Manifest, build_manifest
from tplr.comms.stores.base import ObjectInfo, ObjectStore
from tplr.comms.stores.local import LocalStore
from tplr.comms.stores.s3 import S3Store
from tplr.comms.transfer_config import TransferConfig
from tplr.comms.transfer_metrics import TransferMetrics
from tplr.errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
PART = 64 * KiB  # the smallest part size TransferConfig accepts: many parts, small data


def payload(size: int, seed: int = 0) -> bytes:
    """Bytes whose period (251) differs from every part size, so misplaced parts show."""
    pattern = bytes((i * 7 + seed) % 251 for i in range(251))
    return (pattern * (size // 251 + 1))[:size]


def small_parts(**extra) -> TransferConfig:
    return TransferConfig(
        download_part_size=PART, download_max_workers=4, transfer_max_attempts=4, **extra
    )


def fresh_metrics() -> tuple[TransferMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return TransferMetrics(registry), registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(params=["local", "s3"])
async def store(request, tmp_path) -> AsyncIterator[ObjectStore]:
    if request.param == "local":
        async with LocalStore(tmp_path / "store") as local:
            yield local
        return
    endpoint = request.getfixturevalue("s3_server")
    name = request.getfixturevalue("bucket")
    async with S3Store(bucket_config(endpoint, name), max_connections=8) as s3:
        yield s3


@pytest.mark.parametrize(
    "size", [0, 1, PART - 1, PART, PART + 1, 3 * PART, 3 * PART + 17, 5 * PART - 3]
)
async def test_round_trip_sizes(store: ObjectStore, tmp_path: Path, size: int):
    data = payload(size, seed=size % 13)
    await store.put("data/obj.bin", data)
    metrics, registry = fresh_metrics()
    dest = tmp_path / "out" / "obj.bin"
    result = await download(
        store, "data/obj.bin", dest, config=small_parts(), metrics=metrics, progress=False
    )
    assert dest.read_bytes() == data
    assert (result.size, result.fetched_bytes, result.parts_resumed) == (size, size, 0)
    assert result.verified == "etag" and result.etag == hashlib.md5(data).hexdigest()
    partial, journal = sidecar_paths(dest)
    assert not partial.exists() and not journal.exists()
    parts = -(-size // PART)
    assert sample(registry, "tplr_transfer_bytes_total", direction="download") == size
    requests = sample(registry, "tplr_transfer_requests_total", direction="download")
    assert requests == parts + 1  # one GET per part and the HEAD
    assert sample(registry, "tplr_transfer_part_seconds_count", direction="download") == parts
    assert sample(registry, "tplr_transfer_active", direction="download") == 0


async def test_dest_folder_means_basename_and_default_part_layout(store, tmp_path):
    data = payload(3 * MiB + 5)
    await store.put("deep/dir/shard_000.bin", data)
    (tmp_path / "here").mkdir()
    result = await download(
        store, "deep/dir/shard_000.bin", tmp_path / "here", progress=False, fsync_on_publish=True
    )
    assert result.path == tmp_path / "here" / "shard_000.bin"
    assert result.path.read_bytes() == data


async def test_manifest_verification_by_entry_name(store, tmp_path):
    data = payload(4 * PART + 99, seed=3)
    src = tmp_path / "src"
    src.mkdir()
    (src / "shard.bin").write_bytes(data)
    manifest = build_manifest(src, part_size=PART)
    await store.put("prefix/shard.bin", data)
    result = await download(
        store, "prefix/shard.bin", tmp_path / "o.bin", manifest=manifest, progress=False
    )
    assert result.verified == "manifest" and (tmp_path / "o.bin").read_bytes() == data


async def test_stale_manifest_is_refused_before_any_byte(store, tmp_path):
    await store.put("shard.bin", payload(1000))
    manifest = Manifest(part_size=PART, files={"shard.bin": {"size": 999, "parts": ["00"]}})
    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match=r"manifest says shard\.bin has 999 bytes"):
        await download(store, "shard.bin", out / "o.bin", manifest=manifest, progress=False)
    assert not out.exists()
    await store.put("other.bin", b"x")
    with pytest.raises(IntegrityError, match=r"no entry for 'other\.bin'"):
        await download(store, "other.bin", out / "o.bin", manifest=manifest, progress=False)


async def test_multipart_etag_verified_with_inferred_part_size(
    s3_server, bucket, s3_client, tmp_path
):
    parts = [payload(5 * MiB, 1), payload(5 * MiB, 2), payload(70_001, 3)]
    upload = s3_client.create_multipart_upload(Bucket=bucket, Key="mp.bin")
    etags = []
    for number, chunk in enumerate(parts, start=1):
        answer = s3_client.upload_part(
            Bucket=bucket, Key="mp.bin", UploadId=upload["UploadId"], PartNumber=number, Body=chunk
        )
        etags.append({"PartNumber": number, "ETag": answer["ETag"]})
    s3_client.complete_multipart_upload(
        Bucket=bucket, Key="mp.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": etags}
    )
    async with S3Store(bucket_config(s3_server, bucket), max_connections=8) as s3:
        result = await download(s3, "mp.bin", tmp_path / "mp.bin", verify="etag", progress=False)
        assert result.verified == "etag" and result.etag.endswith("-3")
        assert (tmp_path / "mp.bin").read_bytes() == b"".join(parts)
        # a configured part size that is not the upload's: checked by re-reading the file
        again = await download(
            s3, "mp.bin", tmp_path / "mp2.bin", config=small_parts(), verify="etag", progress=False
        )
        assert again.verified == "etag"


class EtagRewritingStore:
    """A real LocalStore seen through a different ETag scheme (as SSE-KMS objects or a
    plain web server present): HEAD reports ``fake_etag`` and If-Match accepts it."""

    def __init__(self, inner: LocalStore, fake_etag: str) -> None:
        self.inner = inner
        self.fake_etag = fake_etag

    def url(self, key: str = "") -> str:
        return self.inner.url(key)

    async def head(self, key: str) -> ObjectInfo:
        info = await self.inner.head(key)
        return ObjectInfo(info.key, info.size, self.fake_etag, info.last_modified)

    async def get_range(self, key, offset, into, *, if_match=None) -> None:
        if if_match is not None and if_match != self.fake_etag:
            raise PreconditionFailed(f"{key} changed", location=self.url(key))
        real = (await self.inner.head(key)).etag
        await self.inner.get_range(key, offset, into, if_match=real)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


async def test_non_md5_etag_is_reported_as_size_only(tmp_path, caplog):
    async with LocalStore(tmp_path / "store") as local:
        await local.put("k.bin", payload(3 * PART))
        store = EtagRewritingStore(local, "5f3c-1a2b3c4d")
        result = await download(store, "k.bin", tmp_path / "o.bin", verify="etag", progress=False)
    assert result.verified == "size" and "not MD5-based" in result.note
    assert "not MD5-based" in caplog.text
    assert (tmp_path / "o.bin").read_bytes() == payload(3 * PART)


@pytest.mark.parametrize("fake", ["0" * 32, "0" * 32 + "-2"])
async def test_etag_mismatch_raises_and_discards(tmp_path, fake):
    metrics, registry = fresh_metrics()
    async with LocalStore(tmp_path / "store") as local:
        await local.put("k.bin", payload(3 * PART))
        store = EtagRewritingStore(local, fake)
        with pytest.raises(IntegrityError, match="does not match") as err:
            await download(
                store,
                "k.bin",
                tmp_path / "o.bin",
                config=small_parts(),
                metrics=metrics,
                progress=False,
            )
    assert "--verify size" in err.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no final file, no sidecar
    assert sample(registry, "tplr_transfer_integrity_failures_total", direction="download") == 1


async def test_too_little_disk_fails_before_writing(store, tmp_path):
    await store.put("big.bin", payload(10 * PART))
    asked: list[Path] = []

    def small_disk(path: Path) -> int:
        asked.append(path)
        return 5 * PART

    with pytest.raises(InsufficientSpace) as err:
        await download(
            store,
            "big.bin",
            tmp_path / "d" / "big.bin",
            free_space_probe=small_disk,
            progress=False,
        )
    assert err.value.needed_bytes == 10 * PART and err.value.free_bytes == 5 * PART
    assert str(tmp_path / "d") in str(err.value) and "free" in err.value.hint
    assert asked == [tmp_path / "d"]
    assert list((tmp_path / "d").iterdir()) == []  # not even the sidecar


async def test_shared_slots_bound_concurrency_across_downloads(tmp_path):
    slots = TransferSlots(2)
    peak = 0

    class CountingStore(LocalStore):
        async def get_range(self, key, offset, into, *, if_match=None):
            nonlocal peak
            peak = max(peak, slots.in_use)
            await asyncio.sleep(0.01)
            await super().get_range(key, offset, into, if_match=if_match)

    async with CountingStore(tmp_path / "store") as store:
        for n in range(3):
            await store.put(f"f{n}", payload(4 * PART, n))
        results = await asyncio.gather(
            *(
                download(
                    store,
                    f"f{n}",
                    tmp_path / f"o{n}",
                    config=small_parts(),
                    slots=slots,
                    progress=False,
                )
                for n in range(3)
            )
        )
    assert peak == 2
    assert [r.path.read_bytes() for r in results] == [payload(4 * PART, n) for n in range(3)]


async def test_bad_arguments_are_config_errors(store, tmp_path):
    with pytest.raises(ConfigError, match="verify='sha1'"):
        await download(store, "k", tmp_path / "o", verify="sha1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs a manifest"):
        await download(store, "k", tmp_path / "o", verify="manifest")
    with pytest.raises(ConfigError, match="names a folder"):
        await download(store, "some/prefix/", tmp_path / "o")


def test_metrics_names_and_labels():
    registry = CollectorRegistry()
    metrics = TransferMetrics(registry)
    metrics.observe_part("upload", 10, 0.5)
    metrics.observe_retry("upload", "throttled")
    metrics.observe_integrity_failure("upload")
    with metrics.track_active("download"):
        assert sample(registry, "tplr_transfer_active", direction="download") == 1
    assert sample(registry, "tplr_transfer_bytes_total", direction="upload") == 10
    assert sample(registry, "tplr_transfer_requests_total", direction="upload") == 1
    assert sample(registry, "tplr_transfer_retries_total", direction="upload", reason="throttled")
    assert sample(registry, "tplr_transfer_part_seconds_bucket", direction="upload", le="0.5")
    assert sample(registry, "tplr_transfer_integrity_failures_total", direction="upload") == 1
    assert sample(registry, "tplr_transfer_active", direction="download") == 0


async def test_a_journal_of_another_version_is_discarded(tmp_path):
    """Left over from a run against the old object: same key, another ETag and size."""
    async with LocalStore(tmp_path / "store") as store:
        old = await store.put("k.bin", payload(6 * PART, seed=1))
        dest = tmp_path / "k.bin"
        partial, journal = sidecar_paths(dest)
        partial.write_bytes(payload(6 * PART, seed=1))
        writer = JournalWriter.create(journal, JournalHeader("k.bin", 6 * PART, old.etag, PART))
        writer.append([PartRecord(i, "00" * 16) for i in range(6)])
        writer.close()
        new = payload(6 * PART + 5, seed=2)
        await store.put("k.bin", new)
        result = await download(store, "k.bin", dest, config=small_parts(), progress=False)
    assert result.parts_resumed == 0 and result.fetched_bytes == len(new)
    assert dest.read_bytes() == new and not journal.exists()


async def test_a_part_waiting_to_retry_frees_its_slot(s3_server, bucket, s3_client, tmp_path):
    """With one slot, part 0 fails, and part 1 runs while part 0 sleeps before its retry."""
    from fault_proxy import Fault, FaultProxy

    s3_client.put_object(Bucket=bucket, Key="k.bin", Body=payload(2 * PART))
    cfg = small_parts()
    async with FaultProxy(s3_server) as proxy:
        proxy.add(Fault("status", range_start=0, status=500))
        async with S3Store(bucket_config(proxy.url, bucket), cfg) as store:
            await download(
                store, "k.bin", tmp_path / "k.bin", config=cfg, slots=TransferSlots(1),
                progress=False,
            )  # fmt: skip
    assert [start for _, _, start in proxy.stats.gets()] == [0, PART, 0]
    assert (tmp_path / "k.bin").read_bytes() == payload(2 * PART)
