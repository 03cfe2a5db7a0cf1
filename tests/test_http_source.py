"""HTTP(S) sources against a local nginx over TLS that redirects like a dataset hub:
``tplr fetch https://…`` and ``hf://…`` (ranges, the redirect followed once, the token kept
to the hub, 401/403/404, an untrusted certificate), an ETag change mid-download, and the
dataset manager running on an HTTPS source (from ``manifest.json`` and from the hub's
tree API)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from http_origin import TOKEN, Origin, nginx_origin
from shard_fixtures import write_llmc_dataset
from test_shard_manager import PREFIX, TOKENS, first_token, make_manager, wait_state

from tplr.comms.config import DatasetBucketSettings, GradientsBucketSettings
from tplr.comms.download.engine import download
from tplr.comms.errors import AccessDenied, InvalidRequest, NotFound
from tplr.comms.stores.http import HttpStore
from tplr.comms.stores.url import http_store_for, parse_store_url
from tplr.comms.transfer_config import TransferConfig
from tplr.data.shard_state import ShardState
from tplr.node.network.stores import open_node_stores
from tplr.node.process.settings import NodeConfig

KiB = 1024
SMALL_PARTS = TransferConfig(download_part_size=256 * KiB, download_max_workers=4)


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> Origin:
    with nginx_origin(tmp_path_factory.mktemp("origin")) as running:
        yield running


def put_file(path: Path, size: int, seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).bytes(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def tplr_fetch(origin: Origin, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TPLR_"))}
    full_env.update(TPLR_CA_BUNDLE=str(origin.ca_bundle), HF_ENDPOINT=origin.hub_url)
    full_env.update(env)
    full_env = {k: v for k, v in full_env.items() if v}
    return subprocess.run(
        [sys.executable, "-m", "tplr", "fetch", *args, "--no-progress"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_error_line(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 1, done.stderr  # a runtime failure, not a usage error
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


def test_fetch_an_https_url_in_ranged_parts(origin, tmp_path):
    data = put_file(origin.www / "files" / "a.bin", 3 * 1024 * KiB + 5, seed=1)
    done = tplr_fetch(
        origin, f"{origin.hub_url}/files/a.bin", str(tmp_path / "a.bin"), "--part-size", "256KiB"
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.bin").read_bytes() == data
    gets = [r for r in origin.requests() if r[1] == "GET" and r[2] == "/files/a.bin"]
    assert len(gets) == 13 and all(r[3] == "206" and r[4].startswith("bytes=") for r in gets)
    assert all(r[6] not in ("", "-") for r in gets)  # every part pinned with If-Match


@pytest.mark.parametrize("revision", ["", "@v1"])
def test_fetch_a_hub_url_follows_the_redirect_once(origin, tmp_path, revision):
    data = put_file(origin.repo_dir("o", "r") / "shards" / "s.bin", 1024 * KiB, seed=2)
    before = len(origin.requests())
    url = f"hf://datasets/o/r{revision}/shards/s.bin"
    done = tplr_fetch(origin, url, f"{tmp_path}/out/", "--part-size", "256KiB")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "s.bin").read_bytes() == data
    rows = origin.requests()[before:]
    hub_port = origin.hub_url.rsplit(":", 1)[1]
    on_hub = [r for r in rows if r[0] == hub_port]
    assert [(r[1], r[3]) for r in on_hub] == [("HEAD", "302")]  # once, then the CDN only
    assert f"/resolve/{revision.lstrip('@') or 'main'}/" in on_hub[0][2]
    assert sum(r[1] == "GET" and r[3] == "206" for r in rows) == 4


def test_a_private_repo_needs_the_token_and_the_token_stays_on_the_hub(origin, tmp_path):
    data = put_file(origin.repo_dir("o", "private") / "s.bin", 300 * KiB, seed=3)
    url = "hf://datasets/o/private/s.bin"
    one_error_line(tplr_fetch(origin, url, str(tmp_path / "x.bin")), "access denied", "HF_TOKEN")
    done = tplr_fetch(origin, url, str(tmp_path / "x.bin"), HF_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr  # the CDN answers 400 to any Authorization
    assert (tmp_path / "x.bin").read_bytes() == data
    assert TOKEN not in done.stdout + done.stderr


def test_not_found_forbidden_and_an_untrusted_certificate_are_clear_errors(origin, tmp_path):
    dest = str(tmp_path / "x.bin")
    one_error_line(tplr_fetch(origin, f"{origin.hub_url}/files/absent.bin", dest), "not found")
    one_error_line(tplr_fetch(origin, "hf://datasets/o/r/absent.bin", dest), "not found")
    forbidden = f"{origin.hub_url}/forbidden/x.bin"
    one_error_line(tplr_fetch(origin, forbidden, dest), "access denied", "HTTP 403")
    put_file(origin.www / "files" / "b.bin", 10, seed=4)
    untrusted = tplr_fetch(origin, f"{origin.hub_url}/files/b.bin", dest, TPLR_CA_BUNDLE="")
    one_error_line(untrusted, "TLS certificate rejected", "TPLR_CA_BUNDLE")
    assert not Path(dest).exists()


def hub_store(origin: Origin, url: str):
    env = {"HF_ENDPOINT": origin.hub_url, "TPLR_CA_BUNDLE": str(origin.ca_bundle)}
    location = parse_store_url(url, hf_endpoint=origin.hub_url)
    return http_store_for(location, env), location.key


async def test_an_etag_change_mid_download_starts_over_and_never_mixes(origin, tmp_path, caplog):
    path = origin.repo_dir("o", "slow") / "x.bin"
    put_file(path, 4096 * KiB, seed=5)
    old = time.time() - 1000
    os.utime(path, (old, old))  # nginx's ETag is mtime-size: make the old one differ
    new = np.random.default_rng(6).bytes(4096 * KiB)
    store, key = hub_store(origin, "hf://datasets/o/slow/x.bin")
    dest = tmp_path / "x.bin"

    async def replace_once_bytes_flow() -> None:
        while not any(r[2].endswith("/x.bin") and r[3] == "206" for r in origin.requests()):
            await asyncio.sleep(0.02)
        tmp = path.with_name("x.tmp")
        await asyncio.to_thread(tmp.write_bytes, new)
        await asyncio.to_thread(tmp.replace, path)

    with caplog.at_level(logging.WARNING, logger="tplr.comms.download.engine"):
        async with asyncio.timeout(60), asyncio.TaskGroup() as group:
            group.create_task(replace_once_bytes_flow())
            await download(store, key, dest, config=SMALL_PARTS, progress=False)
    assert dest.read_bytes() == new
    assert "was replaced during the download" in caplog.text
    assert any(r[3] == "412" for r in origin.requests())


async def test_the_store_is_read_only_and_lists_only_with_a_tree_api(origin):
    store, _ = hub_store(origin, "hf://datasets/o/r/x")
    with pytest.raises(InvalidRequest, match="read-only"):
        await store.put("x", b"1")
    with pytest.raises(NotFound):
        await store.head("shards/absent.bin")
    plain, _ = hub_store(origin, f"{origin.hub_url}/files/b.bin")
    with pytest.raises(InvalidRequest, match=r"manifest\.json"):
        async for _ in plain.list(""):
            pass
    private, _ = hub_store(origin, "hf://datasets/o/private/s.bin")
    with pytest.raises(AccessDenied, match="HF_TOKEN"):
        await private.get("s.bin")


def write_tree_listing(origin: Origin, repo: str, folder: Path, prefix: str) -> None:
    """The hub's tree-API answer for ``prefix``, split over two pages (``Link: rel=next``
    is not served by nginx's static files, so the test serves one page)."""
    items = [
        {"type": "file", "path": prefix + p.name, "size": p.stat().st_size, "oid": "0" * 40}
        for p in sorted(folder.iterdir())
        if p.name != "manifest.json"
    ]
    items.append({"type": "directory", "path": prefix.rstrip("/"), "oid": "1" * 40})
    page = origin.www / "api" / "datasets" / "o" / repo / "tree" / "main" / prefix.rstrip("/")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(json.dumps(items))


@pytest.mark.parametrize("listing", ["manifest", "tree-api"])
async def test_the_dataset_manager_runs_on_an_https_hub_source(origin, tmp_path, listing):
    repo = f"ds-{listing}"
    shards = origin.repo_dir("o", repo) / PREFIX
    write_llmc_dataset(shards, 3, TOKENS, part_size=16 * KiB)
    if listing == "tree-api":
        write_tree_listing(origin, repo, shards, PREFIX)
        (shards / "manifest.json").unlink()
    store, _ = hub_store(origin, f"hf://datasets/o/{repo}")
    async with make_manager(store, tmp_path) as manager:
        assert first_token(await manager.dataset_for(0)) == 0
        await wait_state(manager, 1, ShardState.READY)
        assert first_token(await manager.dataset_for(2)) == 1000


async def test_the_node_opens_dataset_source_url_as_its_dataset_store(
    origin, tmp_path, monkeypatch
):
    repo_files = origin.repo_dir("o", "node") / PREFIX
    write_llmc_dataset(repo_files, 2, TOKENS, part_size=16 * KiB)
    monkeypatch.setenv("DATASET_SOURCE_URL", "hf://datasets/o/node")
    monkeypatch.setenv("HF_ENDPOINT", origin.hub_url)
    monkeypatch.setenv("TPLR_CA_BUNDLE", str(origin.ca_bundle))
    node = NodeConfig(home=tmp_path / "home", uid=1)
    async with open_node_stores(
        node, DatasetBucketSettings(), GradientsBucketSettings(), TransferConfig()
    ) as stores:
        assert isinstance(stores.dataset, HttpStore) and stores.dataset_root is None
        manifest = await stores.dataset.get(PREFIX + "manifest.json")
    assert manifest == (repo_files / "manifest.json").read_bytes()
