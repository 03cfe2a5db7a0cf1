"""The training worker on CPU with a tiny model: learning, optimizers, parameter ops, errors."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from prometheus_client import CollectorRegistry

from tplr.train.config import ModelConfig, TrainConfig
from tplr.train.errors import (
    BatchError,
    BatchesExhaustedError,
    TrainConfigError,
    UpdateError,
)
from tplr.train.metrics import TrainMetrics
from tplr.train.synthetic import progression_batches, random_batches
from tplr.train.worker import TrainWorker

VOCAB, SEQ, MICRO = 64, 32, 8


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # robust on a loaded 2-core box (no OpenMP barriers)


def make_worker(**overrides) -> TrainWorker:
    model_config = ModelConfig.preset("tiny", vocab_size=VOCAB, max_seq_len=SEQ)
    values = {
        "lr": 3e-3,
        "micro_batch_size": MICRO,
        "global_batch_size": 2 * MICRO,
        "seq_len": SEQ,
        "total_steps": 100,
        "warmup_steps": 5,
        "device": "cpu",
    }
    metrics = overrides.pop("metrics", None)
    values.update(overrides)
    return TrainWorker(model_config, TrainConfig(**values), metrics=metrics)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_loss_falls_well_below_start(optimizer):
    worker = make_worker(optimizer=optimizer)
    batches = progression_batches(VOCAB, MICRO, SEQ, dtype=torch.uint16)  # host format
    first = worker.train_steps(batches, 1)
    assert first.loss == pytest.approx(torch.log(torch.tensor(128.0)).item(), rel=0.1)
    worker.train_steps(batches, 40)
    held_out = list(itertools.islice(progression_batches(VOCAB, MICRO, SEQ, seed=99), 2))
    assert worker.evaluate(held_out) < 0.3 * first.loss
    assert worker.step == 41


def test_stats_account_tokens_and_metrics():
    registry = CollectorRegistry()
    worker = make_worker(metrics=TrainMetrics(registry), grad_clip_norm=1.0)
    for gauge in ("tplr_train_loss", "tplr_train_tokens_per_second", "tplr_train_eval_loss"):
        assert registry.get_sample_value(gauge) is None  # absent, not a loss of 0
    stats = worker.train_steps(random_batches(VOCAB, MICRO, SEQ), 3)
    assert stats.steps == 3 and stats.step == 3
    assert stats.tokens == 3 * 2 * MICRO * SEQ == stats.global_tokens
    assert stats.tokens_per_s == pytest.approx(stats.tokens / stats.seconds)
    assert stats.mfu is None  # CPU: no peak FLOP/s known
    assert stats.grad_norm is not None and stats.grad_norm > 0
    assert registry.get_sample_value("tplr_train_tokens_total") == stats.tokens
    assert registry.get_sample_value("tplr_train_optimizer_steps_total") == 3
    assert registry.get_sample_value("tplr_train_loss") == pytest.approx(stats.loss)
    assert registry.get_sample_value("tplr_train_tokens_per_second") > 0
    assert registry.get_sample_value("tplr_train_mfu_ratio") is None  # CPU: unknown, absent
    assert registry.get_sample_value("tplr_train_steps_duration_seconds_count") == 1


@pytest.mark.parametrize("prefetch", [0, 2])
def test_consumes_exactly_its_micro_batches(prefetch):
    worker = make_worker(prefetch_batches=prefetch)
    source = random_batches(VOCAB, MICRO, SEQ, count=7)
    worker.train_steps(source, 3)  # 3 steps x 2 micro-batches
    assert len(list(source)) == 1  # the seventh batch is still there for the next caller
    with pytest.raises(BatchesExhaustedError, match="ended after 2 of 4"):
        worker.train_steps(random_batches(VOCAB, MICRO, SEQ, count=2), 2)


def test_bad_batches_get_clear_errors():
    worker = make_worker()
    good = next(random_batches(VOCAB, MICRO, SEQ))
    with pytest.raises(BatchError, match=r"shape \(8, 16\), expected \(8, 32\)"):
        worker.train_steps(iter([(good[0][:, :16], good[1][:, :16])] * 2), 1)
    with pytest.raises(BatchError, match=r"dtype torch\.float32"):
        worker.train_steps(iter([(good[0].float(), good[1])] * 2), 1)
    too_big = good[0].clone()
    too_big[0, 0] = VOCAB  # valid for the padded embedding, but not a token of this vocab
    with pytest.raises(BatchError, match=r"token ids in \[\d+, 64\]") as info:
        worker.train_steps(iter([(too_big, good[1])] * 2), 1)
    assert "--vocab-size" in info.value.hint
    with pytest.raises(BatchError, match=r"expected \(inputs, targets\)"):
        worker.train_steps(iter([good[0]] * 2), 1)


def test_global_batch_must_divide():
    with pytest.raises(TrainConfigError, match="not divisible"):
        make_worker(global_batch_size=MICRO * 3 + 1)
    with pytest.raises(TrainConfigError, match="exceeds the model's max_seq_len"):
        make_worker(seq_len=SEQ * 2)


def test_snapshot_restore_is_bit_exact():
    worker = make_worker()
    before = worker.snapshot()
    worker.train_steps(random_batches(VOCAB, MICRO, SEQ), 2)
    changed = dict(worker.model.named_parameters())
    assert not torch.equal(changed["embed.weight"], before["embed.weight"])
    worker.restore(before)
    for name, param in worker.model.named_parameters():
        assert torch.equal(param, before[name]), name
    # the snapshot is a copy, not a view: training again leaves it untouched
    kept = {k: v.clone() for k, v in before.items()}
    worker.train_steps(random_batches(VOCAB, MICRO, SEQ, seed=1), 1)
    assert all(torch.equal(before[k], kept[k]) for k in kept)


def test_apply_update_matches_hand_computation():
    worker = make_worker()
    start = worker.snapshot()
    generator = torch.Generator().manual_seed(3)
    delta = {k: torch.randn(v.shape, generator=generator) for k, v in start.items()}
    worker.apply_update(delta, lr=0.25)
    for name, param in worker.model.named_parameters():
        torch.testing.assert_close(param.detach(), start[name] - 0.25 * delta[name])


def test_pseudo_gradient_round_trip():
    worker = make_worker()
    start = worker.snapshot()
    worker.train_steps(random_batches(VOCAB, MICRO, SEQ), 2)
    end = worker.snapshot()
    delta = worker.pseudo_gradient(start)  # θ_start − θ_end
    worker.restore(start)
    worker.apply_update(delta, lr=1.0)  # the outer step with lr 1 lands on θ_end
    for name, param in worker.model.named_parameters():
        torch.testing.assert_close(param.detach(), end[name], rtol=0, atol=1e-6)


def test_update_mismatch_and_non_finite_rejected():
    worker = make_worker()
    delta = {k: torch.zeros_like(v) for k, v in worker.snapshot().items()}
    with pytest.raises(UpdateError, match=r"missing \['embed\.weight'\]"):
        worker.apply_update({k: v for k, v in delta.items() if k != "embed.weight"}, 1.0)
    with pytest.raises(UpdateError, match=r"has shape \(3,\)"):
        worker.apply_update({**delta, "final_norm.weight": torch.zeros(3)}, 1.0)
    delta["final_norm.weight"][0] = float("nan")
    before = worker.snapshot()
    with pytest.raises(UpdateError, match=r"NaN or infinite values in \['final_norm\.weight'\]"):
        worker.apply_update(delta, 1.0)
    assert all(torch.equal(p, before[n]) for n, p in worker.model.named_parameters())


def test_schedule_warmup_then_cosine_to_min():
    worker = make_worker(warmup_steps=4, total_steps=10, min_lr_ratio=0.1)
    factors = [
        worker.train_steps(random_batches(VOCAB, MICRO, SEQ), 1).lr_factor for _ in range(12)
    ]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0) and factors[7] < factors[5] < 1.0
    assert factors[10] == pytest.approx(0.1) and factors[11] == pytest.approx(0.1)


def test_bf16_autocast_path_trains_without_warnings():
    """The GPU precision path (bf16 autocast, fp32 master weights), exercised on CPU."""
    worker = make_worker(dtype="bfloat16")
    batches = progression_batches(VOCAB, MICRO, SEQ)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a norm falling off its fused kernel
        first = worker.train_steps(batches, 1)
        later = worker.train_steps(batches, 15)
    assert worker.autocast_dtype == torch.bfloat16
    assert later.loss < 0.8 * first.loss
    assert all(p.dtype == torch.float32 for p in worker.model.parameters())


def test_compiles_under_dynamo():
    """The compile path traces end to end (the 'eager' backend keeps it fast on CPU)."""
    worker = make_worker(compile=True, compile_backend="eager")
    stats = worker.train_steps(random_batches(VOCAB, MICRO, SEQ), 2)
    assert torch.isfinite(torch.tensor(stats.loss))
    assert worker.compile_enabled


# -- warm-up and fixed-shape evaluation --------------------------------------------------------
COMPILED: list[tuple[int, ...]] = []


def counting_backend(graph_module, example_inputs):
    """A real dynamo backend that records the input shapes of every graph it compiles."""
    COMPILED.append(tuple(tuple(t.shape) for t in example_inputs if hasattr(t, "shape")))
    return graph_module.forward


torch._dynamo.register_backend(name="tplr_counting", compiler_fn=counting_backend)


def test_warm_up_compiles_before_work_and_evaluate_never_recompiles():
    """Regression: evaluate recompiled for every new batch shape (a short last batch), and
    the first compile happened inside the first window."""
    torch._dynamo.reset()
    COMPILED.clear()
    worker = make_worker(compile=True, compile_backend="tplr_counting")
    before = worker.snapshot()
    worker.warm_up()
    warmed = len(COMPILED)
    assert warmed >= 2  # the training graph and the evaluation graph
    assert all(torch.equal(p, before[n]) for n, p in worker.model.named_parameters())
    assert worker.step == 0 and not worker.optimizers[0].state  # nothing was trained
    worker.train_steps(random_batches(VOCAB, MICRO, SEQ), 1)
    batches = list(itertools.islice(random_batches(VOCAB, MICRO, SEQ), 3))
    short = (batches[2][0][:3], batches[2][1][:3])  # the last batch of a validation set
    worker.evaluate([batches[0], batches[1], short])
    worker.evaluate([(batches[0][0][:5, :20], batches[0][1][:5, :20])])  # shorter rows, too
    assert len(COMPILED) == warmed, COMPILED[warmed:]


def test_padded_evaluation_is_the_token_weighted_mean():
    worker = make_worker()
    batches = list(itertools.islice(progression_batches(VOCAB, MICRO, SEQ, seed=4), 3))
    short = (batches[2][0][:3], batches[2][1][:3])
    with torch.no_grad():
        sums = [
            worker.model(i, t, reduction="sum").item() for i, t in (batches[0], batches[1], short)
        ]
    tokens = 2 * MICRO * SEQ + 3 * SEQ
    assert worker.evaluate([batches[0], batches[1], short]) == pytest.approx(
        sum(sums) / tokens, rel=1e-6
    )
