"""Durable miner state: a miner killed with -9 mid-window and restarted produces the same
payloads, bit for bit, and ends on the same model as one that never stopped; saved states
that do not match, or that were torn or tampered with, are ignored without a crash."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from node_harness import build_dataset
from safetensors import safe_open

HERE = Path(__file__).parent
SCRIPT = HERE / "miner_restart.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("restart-data"), rows_per_shard=256, shards=4)


def miner(home: Path, shards: Path, out: Path, start: int, end: int, *extra: str):
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(SCRIPT), str(home), str(shards), str(out), str(start), str(end)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(
        [*command, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return stderr


def test_killed_miner_resumes_bit_for_bit(shards, tmp_path):
    reference = tmp_path / "reference"
    uninterrupted = miner(reference / "home", shards, reference / "out", 0, 6)

    crashed = tmp_path / "crashed"
    first = miner(crashed / "home", shards, crashed / "out", 0, 6, "--pause-after", "2")
    assert first.stdout is not None
    assert first.stdout.readline().strip() == "paused"  # window 3 half trained, in memory only
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    assert not (crashed / "out" / "w3.safetensors").exists()
    fresh = tmp_path / "fresh"  # the same restart without the saved state, for contrast
    shutil.copytree(crashed / "out", fresh / "out")

    log = finish(miner(crashed / "home", shards, crashed / "out", 3, 6))
    assert "resumed the miner state of window 2" in log
    finish(uninterrupted)
    for window in range(6):
        name = f"w{window}.safetensors"
        assert same_file(crashed / "out" / name, reference / "out" / name), name
    assert same_file(crashed / "out" / "final.safetensors", reference / "out" / "final.safetensors")

    finish(miner(fresh / "home", shards, fresh / "out", 3, 6))
    # without its saved state the restarted miner sends another payload: the state mattered
    assert not same_file(fresh / "out" / "w3.safetensors", reference / "out" / "w3.safetensors")


def same_file(a: Path, b: Path) -> bool:
    """Equal metadata and bit-equal tensors (safetensors orders metadata keys arbitrarily)."""
    with safe_open(str(a), "pt") as left, safe_open(str(b), "pt") as right:
        names = left.keys()  # a safe_open handle is not iterable
        if left.metadata() != right.metadata() or sorted(names) != sorted(right.keys()):
            return False
        return all(torch.equal(left.get_tensor(k), right.get_tensor(k)) for k in names)


# -- matching, torn and tampered states (one process, in place) -------------------------------
@pytest.fixture
def trained():
    """A worker with AdamW moments and a compressor with error feedback (one process)."""
    from fsdp_scenarios import make_worker, miner_windows, new_compressor

    from tplr.train.parallel.distributed import DistContext

    torch.set_num_threads(1)
    context = DistContext(0, 1, 0, torch.device("cpu"))
    worker, compressor = make_worker(context, "adamw"), new_compressor(context)
    miner_windows(worker, compressor)
    return worker, compressor


def fresh_pair():
    from fsdp_scenarios import make_worker, new_compressor

    from tplr.train.parallel.distributed import DistContext

    context = DistContext(0, 1, 0, torch.device("cpu"))
    return make_worker(context, "adamw"), new_compressor(context)


def test_a_state_loads_only_when_it_matches(trained, tmp_path, caplog):
    from fsdp_scenarios import run_spec

    from tplr.node.miner_state import MinerState

    worker, compressor = trained
    state = MinerState(tmp_path, run_spec())
    assert state.save(5, worker, compressor, base_digest="xxh3_128:five")
    assert state.find(worker, {5: "xxh3_128:five"}, 6) is not None
    cases = [
        (state, {5: "xxh3_128:other"}, 6, "window 5 started from model xxh3_128:five"),
        (state, {}, 6, "this node's model of that window is unknown here"),
        (state, {5: "xxh3_128:five"}, 4, "after the current window 4"),
        (
            MinerState(tmp_path, run_spec().model_copy(update={"run_id": "another"})),
            {5: "xxh3_128:five"},
            6,
            "another run_id",
        ),
        (
            MinerState(tmp_path, run_spec().model_copy(update={"compression_topk": 4})),
            {5: "xxh3_128:five"},
            6,
            "another compression",
        ),
    ]
    for candidate, digests, now, reason in cases:
        caplog.clear()
        assert candidate.find(worker, digests, now) is None
        assert reason in caplog.text, (reason, caplog.text)


def test_torn_or_tampered_state_is_ignored_and_the_miner_starts_fresh(trained, tmp_path, caplog):
    from fsdp_scenarios import run_spec

    from tplr.node.miner_state import MinerState

    worker, compressor = trained
    state = MinerState(tmp_path, run_spec())
    assert state.save(3, worker, compressor, base_digest="d")
    saved = state.find(worker, {3: "d"}, 4)
    assert saved is not None
    rank_file = saved.folder / "rank0.safetensors"
    good = rank_file.read_bytes()
    for damage in (good[: len(good) // 2], good.replace(b'"tplr_pieces"', b'"tplr_pieceX"')):
        rank_file.write_bytes(damage)
        caplog.clear()
        target, errors = fresh_pair()
        target.step = 17
        assert not state.load(saved, target, errors)
        assert "could not load the saved miner state" in caplog.text
        assert errors.state_dict() == {} and not target.optimizers[0].state and target.step == 17
    rank_file.write_bytes(good)
    (tmp_path / "miner-state" / "latest.json").write_text("[[[[")
    assert state.find(worker, {3: "d"}, 4) is None
    assert "unreadable" in caplog.text


def test_a_failed_save_keeps_the_previous_state_and_leftovers_are_cleaned(trained, tmp_path):
    from fsdp_scenarios import run_spec

    from tplr.node.miner_state import MinerState

    worker, compressor = trained
    state = MinerState(tmp_path, run_spec())
    assert state.save(1, worker, compressor, base_digest="one")
    root = tmp_path / "miner-state"
    (root / "w000000000002.tmp").write_text("in the way")  # the staging folder cannot be made
    assert not state.save(2, worker, compressor, base_digest="two")
    found = state.find(worker, {1: "one"}, 3)
    assert found is not None and found.window == 1
    (root / "w000000000002.tmp").unlink()
    torn = root / "w000000000004.tmp"  # a save killed before its commit
    torn.mkdir()
    (torn / "rank0.safetensors").write_bytes(b"half a file")
    assert state.save(5, worker, compressor, base_digest="five")
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "w000000000005"]
    target, errors = fresh_pair()
    saved = state.find(worker, {5: "five"}, 5)
    assert saved is not None and state.load(saved, target, errors)
    assert state.already_done(5) and not state.already_done(6)
    for name, error in compressor.state_dict().items():
        assert torch.equal(errors.state_dict()[name], error), name
