"""Two processes under torch.distributed (gloo): only rank 0 touches the store."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from shard_fixtures import publish_folder, write_llmc_dataset

from tplr.comms.stores.local import LocalStore

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(tmp_path: Path, *, corrupt_shard: int | None = None) -> tuple[dict, dict]:
    write_llmc_dataset(tmp_path / "src", 4, 20_000, part_size=16 * 1024)
    if corrupt_shard is not None:
        victim = tmp_path / "src" / f"fineweb_train_{corrupt_shard:06d}.bin"
        data = bytearray(victim.read_bytes())
        data[3000] ^= 0x5A
        victim.write_bytes(bytes(data))  # the manifest still has the good hashes
    bucket = tmp_path / "bucket"
    asyncio.run(publish_folder(LocalStore(bucket), tmp_path / "src", "remote/tokenized/"))
    local = tmp_path / "local"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "dist_manager_worker.py"),
                str(rank),
                "2",
                str(port),
                str(bucket),
                str(local),
                str(tmp_path / f"rank{rank}.json"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    return rank0, rank1


def test_two_ranks_share_one_download_and_read_identical_samples(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path)
    local = tmp_path / "local"
    assert rank0["windows"] == rank1["windows"]
    assert rank0["peers_agree"] == [True] * 5
    assert [rank0["windows"][str(w)]["shard"] for w in range(5)] == [0, 0, 1, 1, 2]
    # Rank 1 had no store: it read rank 0's files through the ready markers. Rank 0
    # deleted the retired shards; only the active one and the prefetched one remain.
    names = sorted(p.name for p in local.glob("*.bin"))
    assert names == ["fineweb_train_000002.bin"] or names == [
        "fineweb_train_000000.bin",
        "fineweb_train_000002.bin",
    ]


def test_rank0_failure_surfaces_on_every_rank(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path, corrupt_shard=1)
    assert "shard 1" in rank0["error"] and "manifest hash" in rank0["error"]
    assert "rank 0 failed to prepare shard 1" in rank1["error"]
