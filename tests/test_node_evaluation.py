"""The validator's measurements on a real worker: a scaled Δ earns exactly what Δ earns."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from node_harness import SEQ_LEN, TEST_RUN
from prometheus_client import CollectorRegistry

from tplr.data.dataset import SharedShardedDataset
from tplr.node.evaluation import WindowEvaluator
from tplr.node.miner import train_window
from tplr.node.network.checkpoints import load_init_model
from tplr.node.process.settings import NodeConfig
from tplr.node.worker_setup import build_worker
from tplr.protocol.assignment import assignment_for
from tplr.protocol.payload import GradientPayload, PayloadMeta
from tplr.protocol.run_spec import RunSpec
from tplr.train.compression import ErrorFeedbackCompressor, sparse_norm


def shard(shards, index: int) -> SharedShardedDataset:
    return SharedShardedDataset.open(
        shards / f"train_{index:06d}.npy",
        ids_path=shards / f"sample_ids_{index:06d}.bin",
        seq_len=SEQ_LEN,
        shard_index=index,
    )


def setting(data):
    """The test run, its first shard, a held-out shard and a CPU worker for them."""
    spec = RunSpec.model_validate(
        {**TEST_RUN, "genesis_s": 0.0, "sequence_length": SEQ_LEN, "vocab_size": 257}
    )
    dataset, heldout = shard(data.shards, 0), shard(data.shards, 11)
    config = NodeConfig(uid=0, device="cpu")
    worker = build_worker(spec, config, dataset.context_len, CollectorRegistry(), warm_up=False)
    return spec, dataset, heldout, worker


def test_scaling_a_delta_changes_neither_its_gate_nor_its_reward(node_test_data, one_torch_thread):
    spec, dataset, heldout, worker = setting(node_test_data)
    shapes = {n: tuple(p.shape) for n, p in worker.model.named_parameters()}
    worker.restore(load_init_model(node_test_data.init_model, shapes))
    assignment = assignment_for(spec, dataset, 1, 0)
    _, delta = train_window(worker, spec, dataset, assignment.indices)
    parts = ErrorFeedbackCompressor(spec.compression_settings()).compress(delta)
    honest = GradientPayload(PayloadMeta(spec.run_id, 0, 1, "", "", 0), parts)
    evaluator = WindowEvaluator.for_run(worker, spec, seed=42)
    taken = np.zeros(len(dataset), dtype=bool)
    taken[assignment.indices] = True
    recent = np.zeros(len(dataset), dtype=bool)
    norm = sparse_norm(parts, spec.compression_chunk_size)
    context = evaluator.prepare(
        dataset, heldout, reference_norm=norm, candidates=4, taken=taken, recent=recent
    )
    base = evaluator.measure(dataset, context, assignment, honest, norm, recent)
    assert base.gate is not None and base.gate.passed and base.raw_reward > 0
    for k in (4.0, 0.25, 1024.0):  # powers of two: bf16 scales them exactly
        scaled_parts = {
            name: dataclasses.replace(part, values=part.values * k) for name, part in parts.items()
        }
        scaled = dataclasses.replace(honest, tensors=scaled_parts)
        scaled_norm = sparse_norm(scaled_parts, spec.compression_chunk_size)
        assert scaled_norm == pytest.approx(k * norm)
        again = evaluator.measure(dataset, context, assignment, scaled, scaled_norm, recent)
        assert again.gate.z == pytest.approx(base.gate.z, abs=1e-6)
        assert again.raw_reward == pytest.approx(base.raw_reward, rel=1e-5)


async def test_evaluation_stops_at_its_budget(node_test_data, one_torch_thread):
    """Miners beyond the phase's budget are left unevaluated (``not_evaluated``)."""
    from tplr.node.evaluation import measure_all

    spec, dataset, heldout, worker = setting(node_test_data)
    evaluator = WindowEvaluator.for_run(worker, spec, seed=7)
    generator = torch.Generator().manual_seed(0)
    deltas = {
        n: torch.randn(p.shape, generator=generator) for n, p in worker.model.named_parameters()
    }
    parts = ErrorFeedbackCompressor(spec.compression_settings()).compress(deltas)
    payloads = {
        uid: GradientPayload(PayloadMeta(spec.run_id, 0, uid, "", "", 0), parts) for uid in (1, 2)
    }
    assignments = {uid: assignment_for(spec, dataset, uid, 0) for uid in (1, 2)}
    norms = {uid: sparse_norm(parts, spec.compression_chunk_size) for uid in (1, 2)}
    none = np.zeros(len(dataset), dtype=bool)
    context = evaluator.prepare(
        dataset, heldout, reference_norm=norms[1], candidates=2, taken=none, recent=none
    )
    args = (evaluator, dataset, context, [1, 2], assignments, payloads, norms, none)
    assert await measure_all(*args, budget_s=0.0) == {}
    assert sorted(await measure_all(*args, budget_s=600.0)) == [1, 2]
