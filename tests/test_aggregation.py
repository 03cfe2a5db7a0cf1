from __future__ import annotations

import random

import pytest
import torch

from tplr.train.aggregation import (
    AggregationError,
    aggregate_deltas,
    clip_scales,
    total_norm,
)


def test_hand_computed_case():
    deltas = {
        7: {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0])},  # norm 3
        2: {"a": torch.tensor([0.0, 4.0]), "b": torch.tensor([0.0])},  # norm 4
        5: {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([12.0])},  # norm 12 -> 4
    }
    result = aggregate_deltas(deltas)
    assert result.stats.norms == {2: 4.0, 5: 12.0, 7: 3.0}
    assert result.stats.median_norm == 4.0
    assert result.stats.clipped_uids == (5,)
    assert result.stats.clipped_count == 1
    assert result.stats.peer_count == 3
    assert result.weights == {2: 1.0, 5: pytest.approx(1 / 3), 7: 1.0}
    assert torch.allclose(result.aggregate["a"], torch.tensor([1.0, 4.0 / 3]))
    assert torch.allclose(result.aggregate["b"], torch.tensor([4.0 / 3]))
    expected_norm = (1.0 + (4 / 3) ** 2 + (4 / 3) ** 2) ** 0.5
    assert result.stats.outer_step_norm == pytest.approx(expected_norm)


def test_even_count_median_is_the_mean_of_the_middle_two():
    median, scales = clip_scales({1: 1.0, 2: 2.0, 3: 4.0, 4: 10.0})
    assert median == 3.0
    assert scales == {1: 1.0, 2: 1.0, 3: 0.75, 4: 0.3}


def test_a_huge_delta_cannot_dominate():
    generator = torch.Generator().manual_seed(0)
    honest = {uid: {"w": torch.randn(1000, generator=generator)} for uid in range(4)}
    attacker = {99: {"w": torch.full((1000,), 1e6)}}
    result = aggregate_deltas({**honest, **attacker})
    assert 99 in result.stats.clipped_uids
    assert total_norm(result.aggregate) <= result.stats.median_norm + 1e-3
    assert result.stats.norms[99] == pytest.approx(1e6 * 1000**0.5)


def test_zero_deltas_are_not_divided_by_zero():
    result = aggregate_deltas({1: {"w": torch.zeros(3)}, 2: {"w": torch.zeros(3)}})
    assert torch.equal(result.aggregate["w"], torch.zeros(3))
    assert result.stats.clipped_uids == ()


def test_result_is_bit_identical_whatever_the_peer_order():
    generator = torch.Generator().manual_seed(1)
    deltas = {
        uid: {
            "wte": torch.randn(64, 32, generator=generator) * (uid + 1),
            "bias": torch.randn(32, generator=generator),
        }
        for uid in (11, 3, 42, 8, 19)
    }
    reference = aggregate_deltas(deltas)
    items = list(deltas.items())
    for seed in range(5):
        random.Random(seed).shuffle(items)
        shuffled = {uid: dict(reversed(list(delta.items()))) for uid, delta in items}
        again = aggregate_deltas(shuffled)
        for name in reference.aggregate:
            assert torch.equal(again.aggregate[name], reference.aggregate[name])
        assert again.stats == reference.stats


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(AggregationError, match="no valid deltas") as info:
        aggregate_deltas({})
    assert info.value.hint
    with pytest.raises(AggregationError, match=r"uid 2 .*missing \['b'\]"):
        aggregate_deltas({1: {"a": torch.zeros(2), "b": torch.zeros(1)}, 2: {"a": torch.zeros(2)}})
    with pytest.raises(AggregationError, match=r"'a' has shape \(3,\)"):
        aggregate_deltas({1: {"a": torch.zeros(2)}, 2: {"a": torch.zeros(3)}})
