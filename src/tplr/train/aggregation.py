"""Aggregation of the peers' decompressed pseudo-gradients: median-norm clipping, then mean.

Each peer's Δ (a dict name → tensor) has a total L2 norm over all its tensors. Every
peer whose norm exceeds the median of the norms is scaled down to the median; then the
clipped deltas are averaged. Peers are processed in ascending ``uid`` order and norms are
accumulated in float64, so every node that aggregates the same payloads gets bit-identical
results regardless of the order in which it gathered them.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from tplr.errors import TplrError

Delta = Mapping[str, torch.Tensor]


class AggregationError(TplrError):
    """The deltas cannot be aggregated (none given, or they disagree in names/shapes)."""


@dataclass(frozen=True, slots=True)
class AggregationStats:
    norms: dict[int, float]  # uid -> total L2 norm before clipping
    median_norm: float
    clipped_uids: tuple[int, ...]  # uids scaled down to the median
    outer_step_norm: float  # L2 norm of the aggregate
    peer_count: int

    @property
    def clipped_count(self) -> int:
        return len(self.clipped_uids)


@dataclass(frozen=True, slots=True)
class AggregationResult:
    aggregate: dict[str, torch.Tensor]
    stats: AggregationStats
    weights: dict[int, float] = field(default_factory=dict)  # uid -> clip scale applied


def total_norm(delta: Delta) -> float:
    """L2 norm over every tensor of ``delta``, accumulated in float64 in name order."""
    if not delta:
        return 0.0
    per_tensor = [delta[name].detach().to(torch.float64).square().sum() for name in sorted(delta)]
    return float(torch.stack(per_tensor).sum().sqrt())  # one device sync


def clip_scales(norms: Mapping[int, float]) -> tuple[float, dict[int, float]]:
    """The median norm and, per uid, ``min(1, median / norm)`` (1 for a zero norm)."""
    median = statistics.median(norms[uid] for uid in sorted(norms))
    scales = {uid: (median / norm if norm > median else 1.0) for uid, norm in sorted(norms.items())}
    return median, scales


def _check_consistent(deltas: Mapping[int, Delta]) -> None:
    if not deltas:
        raise AggregationError(
            "no valid deltas to aggregate",
            hint="skip the outer step for this window (no peer posted a valid payload)",
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
def aggregate_deltas(
    deltas: Mapping[int, Delta], *, dtype: torch.dtype = torch.float32
) -> AggregationResult:
    """Median-norm clip each peer's Δ, then average them (uid order, deterministic)."""
    _check_consistent(deltas)
    uids = sorted(deltas)
    norms = {uid: total_norm(deltas[uid]) for uid in uids}
    median, scales = clip_scales(norms)
    aggregate: dict[str, torch.Tensor] = {}
    for name in sorted(deltas[uids[0]]):
        accumulator = torch.zeros_like(deltas[uids[0]][name], dtype=dtype)
        for uid in uids:
            accumulator.add_(deltas[uid][name].to(dtype), alpha=scales[uid])
        aggregate[name] = accumulator.div_(len(uids))
    stats = AggregationStats(
        norms=norms,
        median_norm=median,
        clipped_uids=tuple(uid for uid in uids if scales[uid] < 1.0),
        outer_step_norm=total_norm(aggregate),
        peer_count=len(uids),
    )
    return AggregationResult(aggregate=aggregate, stats=stats, weights=scales)
