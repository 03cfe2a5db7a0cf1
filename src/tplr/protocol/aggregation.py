"""Aggregation (protocol v2): every approved Δ normalised to one reference norm, then averaged.

Each peer's Δ (a dict name → tensor) has a total L2 norm over all its tensors. The lead
takes the median norm ``r`` of the window's valid payloads as the reference and gives each
approved uid the weight ``r / ‖Δ_i‖ / n`` (:func:`normalisation_weights`); the outer step
is ``θ ← θ − outer_lr · Σ_i weight_i · Δ_i`` (:func:`weighted_sum`). Scaling a Δ therefore
changes nothing, and the validator scores each Δ exactly as it enters this sum. The
weights are published in the approval, so every node applies the very same numbers.
Peers are summed in ascending ``uid`` order and norms are accumulated in float64: every
node that aggregates the same payloads gets bit-identical results.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tplr.errors import TplrError

Delta = Mapping[str, torch.Tensor]


class AggregationError(TplrError):
    """The deltas cannot be aggregated (none given, or they disagree in names/shapes)."""


@dataclass(frozen=True, slots=True)
class AggregationStats:
    weights: dict[int, float]  # uid -> weight applied
    outer_step_norm: float  # L2 norm of the aggregate
    peer_count: int


def total_norm(delta: Delta) -> float:
    """L2 norm over every tensor of ``delta``, accumulated in float64 in name order."""
    if not delta:
        return 0.0
    per_tensor = [delta[name].detach().to(torch.float64).square().sum() for name in sorted(delta)]
    return float(torch.stack(per_tensor).sum().sqrt())  # one device sync


def reference_norm(norms: Mapping[int, float]) -> float:
    """The median of the positive, finite norms (0.0 when there are none)."""
    usable = [norms[uid] for uid in sorted(norms) if math.isfinite(norms[uid]) and norms[uid] > 0]
    return statistics.median(usable) if usable else 0.0


def normalisation_weights(norms: Mapping[int, float], reference: float) -> dict[int, float]:
    """Per uid ``reference / norm / n``: each Δ brought to the reference norm, averaged."""
    if not norms:
        return {}
    if not (math.isfinite(reference) and reference > 0):
        raise AggregationError(f"the reference norm must be positive and finite, got {reference}")
    for uid, norm in norms.items():
        if not (math.isfinite(norm) and norm > 0):
            raise AggregationError(f"uid {uid} has norm {norm}: it cannot be normalised")
    count = len(norms)
    return {uid: reference / norms[uid] / count for uid in sorted(norms)}


def _check_consistent(deltas: Mapping[int, Delta]) -> None:
    if not deltas:
        raise AggregationError(
            "no deltas to aggregate",
            hint="an empty approved set is a null round: skip the outer step",
        )
    reference_uid = min(deltas)
    reference = deltas[reference_uid]
    for uid in sorted(deltas):
        delta = deltas[uid]
        if set(delta) != set(reference):
            missing = sorted(set(reference) - set(delta))[:3]
            extra = sorted(set(delta) - set(reference))[:3]
            raise AggregationError(
                f"delta of uid {uid} has different parameter names than uid {reference_uid} "
                f"(missing {missing}, extra {extra})",
                hint="validate payloads against the model's parameters before aggregating",
            )
        for name, tensor in delta.items():
            if tensor.shape != reference[name].shape:
                raise AggregationError(
                    f"delta of uid {uid}: parameter {name!r} has shape {tuple(tensor.shape)}, "
                    f"uid {reference_uid} has {tuple(reference[name].shape)}",
                    hint="validate payloads against the model's parameters before aggregating",
                )


@torch.no_grad()
def weighted_sum(
    deltas: Mapping[int, Delta],
    weights: Mapping[int, float],
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], AggregationStats]:
    """``Σ_i weights[i] · deltas[i]`` in uid order (deterministic), with its stats."""
    _check_consistent(deltas)
    if set(weights) != set(deltas):
        raise AggregationError(
            f"weights are for uids {sorted(weights)[:8]}, deltas for {sorted(deltas)[:8]}"
        )
    uids = sorted(deltas)
    aggregate: dict[str, torch.Tensor] = {}
    for name in sorted(deltas[uids[0]]):
        accumulator = torch.zeros_like(deltas[uids[0]][name], dtype=dtype)
        for uid in uids:
            accumulator.add_(deltas[uid][name].to(dtype), alpha=weights[uid])
        aggregate[name] = accumulator
    stats = AggregationStats(
        weights={uid: weights[uid] for uid in uids},
        outer_step_norm=total_norm(aggregate),
        peer_count=len(uids),
    )
    return aggregate, stats
