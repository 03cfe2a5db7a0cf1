"""One protocol window end to end with real parts: TrainWorker (tiny GPT on CPU), error
feedback compression, safetensors payloads in a LocalStore, validation, scoring,
aggregation and the outer step that keeps every node's model identical."""

from __future__ import annotations

import pickle

import torch
from prometheus_client import CollectorRegistry

from tplr.comms.local_store import LocalStore
from tplr.node.clock import FakeClock
from tplr.node.node_metrics import NodeMetrics
from tplr.node.payload import (
    PayloadExpectation,
    PayloadMeta,
    PayloadRejected,
    PayloadSchema,
    check_payload_size,
    decode_payload,
    encode_payload,
    payload_key,
    sample_digest,
)
from tplr.node.run_spec import RunSpec
from tplr.node.scoring import ScoreBoard, measure_delta, window_score
from tplr.train.aggregation import aggregate_deltas
from tplr.train.compression import ErrorFeedbackCompressor, decompress_all
from tplr.train.config import ModelConfig, TrainConfig
from tplr.train.worker import TrainWorker

VOCAB, SEQ, BATCH = 128, 16, 4
SPEC = RunSpec(
    run_id="pipeline",
    genesis_s=1_700_000_000.0,
    window_seconds=60,
    upload_deadline_fraction=1.0,
    inner_steps=8,
    inner_lr=1e-2,
    outer_lr=1.0,
    micro_batch_size=BATCH,
    batch_size=BATCH,
    sequence_length=SEQ,
    model="tiny",
    vocab_size=VOCAB,
    compression_chunk_size=256,
    compression_topk=64,
    windows_per_shard=10,
    seed=3,
)


def make_worker() -> TrainWorker:
    model = ModelConfig.preset(
        "tiny", vocab_size=VOCAB, n_layer=1, n_head=2, d_model=32, max_seq_len=SEQ
    )
    train = TrainConfig(
        lr=SPEC.inner_lr,
        micro_batch_size=BATCH,
        global_batch_size=BATCH,
        seq_len=SEQ,
        device="cpu",
        compile=False,
        prefetch_batches=0,
        warmup_steps=0,
        total_steps=1000,
        seed=SPEC.seed,
    )
    return TrainWorker(model, train)


def samples_for(sample_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic token sequences per sample id, grouped into micro-batches."""
    rows = []
    for sample_id in sample_ids:
        generator = torch.Generator().manual_seed(1000 + sample_id)
        rows.append(torch.randint(0, VOCAB, (SEQ + 1,), generator=generator))
    tokens = torch.stack(rows)
    return [
        (tokens[i : i + BATCH, :-1].clone(), tokens[i : i + BATCH, 1:].clone())
        for i in range(0, len(sample_ids), BATCH)
    ]


def assigned_ids(uid: int, window: int) -> list[int]:
    return [uid * 100 + window * 10 + i for i in range(BATCH)]


async def test_one_window_end_to_end(tmp_path):
    store = LocalStore(tmp_path)
    window = 5
    windows = SPEC.window_clock(FakeClock(SPEC.genesis_s))
    settings = SPEC.compression_settings()
    miners = {uid: make_worker() for uid in (1, 2)}
    validator = make_worker()
    schema = PayloadSchema.for_model(
        {name: p.shape for name, p in validator.model.named_parameters()}, settings
    )

    # miners: inner steps on assigned samples, pseudo-gradient, compress, upload
    for uid, worker in miners.items():
        ids = assigned_ids(uid, window)
        start = worker.snapshot()
        worker.train_steps(samples_for(ids) * SPEC.inner_steps, SPEC.inner_steps)
        delta = worker.pseudo_gradient(start)
        worker.restore(start)
        sent = ErrorFeedbackCompressor(settings).compress(delta)
        meta = PayloadMeta(SPEC.run_id, window, uid, sample_digest(ids), len(ids))
        await store.put(payload_key(window, uid), encode_payload(meta, sent))
    await store.put(payload_key(window, 3), pickle.dumps({"evil": True}))

    # validator: gather, validate, score, aggregate
    registry = CollectorRegistry()
    metrics = NodeMetrics(role="validator", uid=0, run_id=SPEC.run_id, registry=registry)
    board = ScoreBoard(SPEC.scoring_config())
    random_batches = samples_for(list(range(9000, 9000 + 2 * BATCH)))
    valid, scores, failures = {}, {}, {}
    async for info in store.list(f"gradients/{window}/"):
        uid = int(info.key.rsplit("/", 1)[1].split(".")[0])
        ids = assigned_ids(uid, window)
        expect = PayloadExpectation(
            SPEC.run_id, window, uid, sample_digest(ids), window_clock=windows
        )
        try:
            check_payload_size(info.size, schema)
            payload = decode_payload(await store.get(info.key), schema, expect)
        except PayloadRejected as exc:
            failures[uid] = exc.reason.value
            metrics.record_rejection(exc.reason)
            continue
        delta = decompress_all(payload.tensors, settings.chunk_size)
        measured = measure_delta(
            validator,
            delta,
            step_lr=1.0,
            assigned_batches=samples_for(ids),
            random_batches=random_batches,
        )
        scores[uid] = window_score(measured)
        valid[uid] = delta
    board.close_window(window, scores=scores, failures=failures, expected_uids=[1, 2, 3, 4])
    metrics.set_scores(board.scores())

    assert failures == {3: "not_safetensors"}
    assert set(valid) == {1, 2}
    assert all(score > 0.05 for score in scores.values()), scores
    assert board.top_peers() == sorted(scores, key=lambda uid: -scores[uid])
    assert (
        registry.get_sample_value("tplr_peers_rejected_total", {"reason": "not_safetensors"}) == 1
    )
    assert registry.get_sample_value("tplr_peer_score", {"uid": "1"}) > 0

    # everyone applies the same aggregate: the models stay identical
    result = aggregate_deltas(valid)
    assert result.stats.peer_count == 2 and result.stats.outer_step_norm > 0
    for worker in [validator, *miners.values()]:
        worker.apply_update(result.aggregate, SPEC.outer_lr)
    reference = validator.snapshot()
    for worker in miners.values():
        for name, tensor in worker.snapshot().items():
            assert torch.equal(tensor, reference[name]), name
