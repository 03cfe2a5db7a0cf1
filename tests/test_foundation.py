from __future__ import annotations

import subprocess
import sys

import pytest

from tplr.comms.config import DatasetBucketSettings, GradientsBucketSettings
from tplr.comms.errors import IntegrityError
from tplr.comms.manifest import Manifest, build_manifest, read_manifest, write_manifest_atomic
from tplr.errors import ConfigError
from tplr.units import format_size, parse_size


def test_parse_size_units():
    assert parse_size("64MiB") == 64 * 1024**2
    assert parse_size("8MB") == 8_000_000
    assert parse_size("1048576") == 1048576
    assert parse_size(" 1.5 GiB ") == int(1.5 * 1024**3)
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("12 parsecs")
    assert format_size(1536) == "1.50 KiB"


def test_dataset_bucket_env_names(monkeypatch):
    monkeypatch.setenv("R2_DATASET_ACCOUNT_ID", "acc123")
    monkeypatch.setenv("R2_DATASET_BUCKET_NAME", "dataset")
    monkeypatch.setenv("R2_DATASET_READ_ACCESS_KEY_ID", "AKID")
    monkeypatch.setenv("R2_DATASET_READ_SECRET_ACCESS_KEY", "s3cr3t-value")
    settings = DatasetBucketSettings()
    bucket = settings.read_bucket()
    assert bucket.resolved_endpoint() == "https://acc123.r2.cloudflarestorage.com"
    assert bucket.region == "auto"
    assert "s3cr3t-value" not in repr(bucket) and "s3cr3t-value" not in repr(settings)
    monkeypatch.setenv("R2_DATASET_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert DatasetBucketSettings().read_bucket().resolved_endpoint() == "http://127.0.0.1:9000"


def test_missing_bucket_keys_named(monkeypatch):
    monkeypatch.setenv("R2_GRADIENTS_BUCKET_NAME", "grads")
    with pytest.raises(ConfigError, match="R2_GRADIENTS_WRITE_ACCESS_KEY_ID"):
        GradientsBucketSettings().write_bucket()


def test_manifest_round_trip_and_part_hashes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 2500)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"")
    manifest = build_manifest(tmp_path, part_size=1000, metadata={"a.bin": {"tokens": 1250}})
    assert manifest.files["a.bin"].size == 2500
    assert len(manifest.files["a.bin"].parts) == 3
    assert manifest.files["a.bin"].model_extra == {"tokens": 1250}
    assert manifest.files["sub/b.bin"].parts == []
    assert manifest.part_range("a.bin", 2) == (2000, 500)
    write_manifest_atomic(manifest, tmp_path / "manifest.json")
    again = read_manifest(tmp_path / "manifest.json")
    assert again == manifest
    (tmp_path / "a.bin").write_bytes(b"x" * 2000 + b"y" * 500)
    changed = build_manifest(tmp_path, part_size=1000)
    assert changed.files["a.bin"].parts[:2] == manifest.files["a.bin"].parts[:2]
    assert changed.files["a.bin"].parts[2] != manifest.files["a.bin"].parts[2]


def test_manifest_rejects_inconsistent_part_count():
    bad = Manifest(part_size=10, files={}).model_dump()
    bad["files"] = {"x": {"size": 25, "parts": ["00"]}}
    with pytest.raises(IntegrityError, match="1 part hashes, expected 3"):
        Manifest.from_json(Manifest.model_validate(bad).model_dump_json(), source="m.json")


def test_cli_help_and_clean_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tplr", "--help"], capture_output=True, text=True, check=True
    )
    assert "manifest" in out.stdout
    res = subprocess.run(
        [sys.executable, "-m", "tplr", "manifest", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr
