"""Duplicate and replay detection: content digests and sketches of sparse payloads."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import torch

from tplr.protocol.duplicates import (
    Fingerprint,
    aggregate_fingerprint,
    content_digest,
    find_duplicates,
    parameter_offsets,
    sketch,
)
from tplr.protocol.payload import GradientPayload, PayloadMeta
from tplr.train.compression import (
    CompressionSettings,
    ErrorFeedbackCompressor,
    decompress_all,
)

SHAPES = {"w": (64, 96), "b": (96,)}
SETTINGS = CompressionSettings(chunk_size=128, topk=32)
OFFSETS = parameter_offsets(SHAPES, SETTINGS.chunk_size)
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def payload(seed: int, *, uid: int = 1, window: int = 3, scale: float = 1.0) -> GradientPayload:
    generator = torch.Generator().manual_seed(seed)
    deltas = {
        name: torch.randn(shape, generator=generator) * scale for name, shape in SHAPES.items()
    }
    parts = ErrorFeedbackCompressor(SETTINGS).compress(deltas)
    return GradientPayload(PayloadMeta("r", window, uid, "b", "d", 8), parts)


def fingerprint(p: GradientPayload, seconds: float = 0.0) -> Fingerprint:
    stamp = T0 + timedelta(seconds=seconds)
    return Fingerprint(content_digest(p), sketch(p, OFFSETS, SETTINGS.chunk_size), stamp)


def test_a_relabelled_copy_has_the_originals_digest():
    original = payload(0)
    relabelled = dataclasses.replace(original, meta=PayloadMeta("r", 9, 7, "other", "x", 1))
    assert content_digest(relabelled) == content_digest(original)
    assert content_digest(payload(1)) != content_digest(original)


def test_sketch_cosine_tracks_the_true_cosine():
    a, b = payload(0), payload(1)
    dense_a = torch.cat([t.flatten() for t in decompress_all(a.tensors, 128).values()])
    dense_b = torch.cat([t.flatten() for t in decompress_all(b.tensors, 128).values()])
    true = float(torch.nn.functional.cosine_similarity(dense_a, dense_b, dim=0))
    assert fingerprint(a).cosine(fingerprint(b)) == pytest.approx(true, abs=0.05)
    assert fingerprint(a).cosine(fingerprint(a)) == pytest.approx(1.0)
    # sketches are linear: an aggregate's fingerprint is the weighted sum of its parts'
    aggregate = aggregate_fingerprint({1: fingerprint(a), 2: fingerprint(b)}, {1: 0.5, 2: 0.5})
    both = (dense_a + dense_b) / 2
    assert aggregate.cosine(fingerprint(a)) == pytest.approx(
        float(torch.nn.functional.cosine_similarity(both, dense_a, dim=0)), abs=0.05
    )


def noised(p: GradientPayload, seed: int, amount: float) -> GradientPayload:
    generator = torch.Generator().manual_seed(seed)
    parts = {
        name: dataclasses.replace(
            part,
            values=(
                part.values.float() + torch.randn(part.values.shape, generator=generator) * amount
            ).to(part.values.dtype),
        )
        for name, part in p.tensors.items()
    }
    return dataclasses.replace(p, tensors=parts)


def test_within_a_window_only_the_earliest_commitment_stays_eligible():
    honest = payload(0, uid=1)
    current = {
        1: fingerprint(honest, seconds=1),
        2: fingerprint(noised(honest, 5, 1e-3), seconds=3),  # a near-copy, committed later
        3: fingerprint(honest, seconds=2),  # an exact copy, later
        4: fingerprint(payload(4), seconds=0),  # unrelated
    }
    verdicts = find_duplicates(current, {}, threshold=0.9)
    assert sorted(verdicts) == [2, 3]
    # a tie for the earliest commitment leaves none of the group eligible
    tied = {1: fingerprint(honest, 1), 2: fingerprint(honest, 1), 3: fingerprint(payload(3), 0)}
    assert sorted(find_duplicates(tied, {}, threshold=0.9)) == [1, 2]


def test_replays_of_earlier_windows_are_duplicates():
    previous = {"uid 1 of window 2": fingerprint(payload(0))}
    current = {5: fingerprint(payload(0, uid=5), 4), 6: fingerprint(payload(6), 4)}
    verdicts = find_duplicates(current, previous, threshold=0.9)
    assert list(verdicts) == [5] and "window 2" in verdicts[5]


def test_unrelated_updates_are_far_below_the_threshold():
    prints = [fingerprint(payload(seed)) for seed in range(12)]
    cosines = [a.cosine(b) for i, a in enumerate(prints) for b in prints[i + 1 :]]
    assert max(np.abs(cosines)) < 0.3
    assert find_duplicates(dict(enumerate(prints)), {}, threshold=0.9) == {}
