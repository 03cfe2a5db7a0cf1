"""Property-based tests of the training state files a local user could swap: a piece file's
header (``tplr.train.parallel.sharded_state``) and a miner state's ``latest.json`` / ``state.json``
(``tplr.node.miner_state``). Only typed errors, or a state ignored, never a crash."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from tplr.train.parallel.sharded_state import HEADER_KEY, PieceIndex, StateFileError

json_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


@given(header=json_values, start=st.integers(-5, 10), stop=st.integers(-5, 12))
def test_piece_headers_fail_only_as_state_file_errors(header, start, stop):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rank0.safetensors"
        metadata = {HEADER_KEY: json.dumps(header)}
        save_file({"opt/x": torch.zeros(4, 3), "ef/y": torch.zeros(2, 2)}, str(path), metadata)
        try:
            index = PieceIndex.open([path])
        except StateFileError:
            return
        for name in sorted(index.names()):
            try:
                rows = index.read_rows(name, start, stop)
            except StateFileError:
                continue
            assert rows.shape[0] == stop - start


@given(
    rows=st.dictionaries(
        st.sampled_from(["opt/x", "ef/y"]),
        st.lists(st.integers(-3, 9), min_size=2, max_size=2),
        min_size=2,
    )
)
def test_any_row_claims_are_checked_against_the_stored_shapes(rows):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rank0.safetensors"
        tensors = {"opt/x": torch.arange(12.0).view(4, 3), "ef/y": torch.ones(2, 2)}
        save_file(tensors, str(path), {HEADER_KEY: json.dumps(rows)})
        try:
            index = PieceIndex.open([path])
        except StateFileError:
            return
        for name, (start, total) in rows.items():
            assert start >= 0 and start + tensors[name].shape[0] <= total
            whole = index.read_rows(name, start, start + tensors[name].shape[0])
            assert torch.equal(whole, tensors[name])


@given(pointer=json_values, manifest=json_values)
def test_miner_state_pointers_and_manifests_are_ignored_when_wrong(pointer, manifest):
    from fsdp_scenarios import make_worker, run_spec

    from tplr.node.miner_state import MinerState
    from tplr.train.parallel.distributed import DistContext

    worker = _worker(make_worker, DistContext)
    with tempfile.TemporaryDirectory() as folder:
        state = MinerState(Path(folder), run_spec())
        state.root.mkdir(parents=True)
        (state.root / "latest.json").write_text(json.dumps(pointer))
        target = state.root / "w000000000001"
        target.mkdir()
        (target / "state.json").write_text(json.dumps(manifest))
        assert state.find(worker, {1: "d"}, 2) is None  # no real state: never loaded


_WORKERS: list = []


def _worker(make_worker, context_type):
    if not _WORKERS:  # one tiny worker for every example
        torch.set_num_threads(1)
        _WORKERS.append(make_worker(context_type(0, 1, 0, torch.device("cpu")), "adamw"))
    return _WORKERS[0]
