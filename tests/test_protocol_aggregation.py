from __future__ import annotations

import random

import pytest
import torch

from tplr.protocol.aggregation import (
    AggregationError,
    normalisation_weights,
    reference_norm,
    total_norm,
    weighted_sum,
)


def test_hand_computed_case():
    deltas = {
        7: {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0])},  # norm 3
        2: {"a": torch.tensor([0.0, 4.0]), "b": torch.tensor([0.0])},  # norm 4
        5: {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([12.0])},  # norm 12
    }
    norms = {uid: total_norm(delta) for uid, delta in deltas.items()}
    assert norms == {2: 4.0, 5: 12.0, 7: 3.0}
    assert reference_norm(norms) == 4.0
    weights = normalisation_weights(norms, 4.0)
    assert weights == {2: pytest.approx(1 / 3), 5: pytest.approx(1 / 9), 7: pytest.approx(4 / 9)}
    aggregate, stats = weighted_sum(deltas, weights)
    # every delta brought to norm 4, then averaged
    assert torch.allclose(aggregate["a"], torch.tensor([4.0 / 3, 4.0 / 3]))
    assert torch.allclose(aggregate["b"], torch.tensor([4.0 / 3]))
    assert stats.peer_count == 3
    assert stats.outer_step_norm == pytest.approx((3 * (4 / 3) ** 2) ** 0.5)


def test_even_count_reference_is_the_mean_of_the_middle_two():
    assert reference_norm({1: 1.0, 2: 2.0, 3: 4.0, 4: 10.0}) == 3.0
    assert reference_norm({1: 0.0, 2: float("nan")}) == 0.0


def test_scaling_a_delta_changes_nothing():
    """Δ×k enters the outer step exactly as Δ does (scale is no lever)."""
    generator = torch.Generator().manual_seed(0)
    honest = {uid: {"w": torch.randn(1000, generator=generator)} for uid in range(4)}
    for k in (1e-3, 2.0, 1e6):
        scaled = {**honest, 3: {"w": honest[3]["w"] * k}}
        results = []
        for deltas in (honest, scaled):
            norms = {uid: total_norm(delta) for uid, delta in deltas.items()}
            weights = normalisation_weights(norms, reference_norm(norms))
            results.append(weighted_sum(deltas, weights)[0]["w"])
        if k == 1e6:  # the reference (median) moves with an outlier, the direction does not
            cosine = torch.nn.functional.cosine_similarity(results[0], results[1], dim=0)
            assert cosine > 0.999
        else:
            assert torch.allclose(results[0] / results[0].norm(), results[1] / results[1].norm())


def test_result_is_bit_identical_whatever_the_peer_order():
    generator = torch.Generator().manual_seed(1)
    deltas = {
        uid: {
            "wte": torch.randn(64, 32, generator=generator) * (uid + 1),
            "bias": torch.randn(32, generator=generator),
        }
        for uid in (11, 3, 42, 8, 19)
    }
    norms = {uid: total_norm(delta) for uid, delta in deltas.items()}
    weights = normalisation_weights(norms, reference_norm(norms))
    reference, stats = weighted_sum(deltas, weights)
    items = list(deltas.items())
    for seed in range(5):
        random.Random(seed).shuffle(items)
        shuffled = {uid: dict(reversed(list(delta.items()))) for uid, delta in items}
        again, again_stats = weighted_sum(shuffled, dict(reversed(list(weights.items()))))
        for name in reference:
            assert torch.equal(again[name], reference[name])
        assert again_stats == stats


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(AggregationError, match="no deltas") as info:
        weighted_sum({}, {})
    assert "null round" in info.value.hint
    with pytest.raises(AggregationError, match=r"uid 2 .*missing \['b'\]"):
        weighted_sum(
            {1: {"a": torch.zeros(2), "b": torch.zeros(1)}, 2: {"a": torch.zeros(2)}},
            {1: 1.0, 2: 1.0},
        )
    with pytest.raises(AggregationError, match=r"'a' has shape \(3,\)"):
        weighted_sum({1: {"a": torch.zeros(2)}, 2: {"a": torch.zeros(3)}}, {1: 1.0, 2: 1.0})
    with pytest.raises(AggregationError, match="weights are for uids"):
        weighted_sum({1: {"a": torch.zeros(2)}}, {2: 1.0})
    with pytest.raises(AggregationError, match="cannot be normalised"):
        normalisation_weights({1: 0.0}, 1.0)
    with pytest.raises(AggregationError, match="reference norm"):
        normalisation_weights({1: 1.0}, float("inf"))
