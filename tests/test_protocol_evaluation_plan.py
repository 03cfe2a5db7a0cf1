"""The secret evaluation plan: a seed nobody knows before the commit deadline, and the
evaluated subset weighted towards miners with little evidence."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import numpy as np

from tplr.protocol.commitments import ObservedCommitment, commit_to, commitments_digest
from tplr.protocol.evaluation_plan import choose_evaluated, window_rng, window_seed


def observed(uid: int, data: bytes) -> ObservedCommitment:
    commitment = commit_to(data, run_id="r", window=3, uid=uid)
    return ObservedCommitment(commitment, datetime(2026, 12, 1, tzinfo=UTC), 0.0)


def test_the_seed_needs_the_secret_and_every_commitment():
    commitments = {uid: observed(uid, f"payload {uid}".encode()) for uid in range(5)}
    digest = commitments_digest(commitments)
    seed = window_seed(b"s" * 32, "r", 3, digest)
    assert seed == window_seed(b"s" * 32, "r", 3, digest)  # every validator input fixed
    assert seed != window_seed(b"t" * 32, "r", 3, digest)  # another validator's secret
    assert seed != window_seed(b"s" * 32, "r", 4, digest)
    changed = {**commitments, 2: observed(2, b"another payload")}
    assert seed != window_seed(b"s" * 32, "r", 3, commitments_digest(changed))
    # independent streams per purpose and uid
    a = window_rng(seed, "gate", 1).integers(1 << 62, size=4)
    b = window_rng(seed, "gate", 2).integers(1 << 62, size=4)
    assert not np.array_equal(a, b)


def test_everyone_is_evaluated_when_they_fit():
    assert choose_evaluated([5, 1, 3], {}, 3, np.random.default_rng(0)) == [1, 3, 5]


def test_the_subset_favours_miners_with_little_evidence_and_varies_by_seed():
    uids = list(range(40))
    evidence = {uid: (0 if uid < 10 else 4) for uid in uids}  # 10 newcomers, 30 veterans
    counts: Counter[int] = Counter()
    subsets = set()
    for seed in range(400):
        chosen = choose_evaluated(uids, evidence, 8, np.random.default_rng(seed))
        assert len(chosen) == 8 and len(set(chosen)) == 8
        counts.update(chosen)
        subsets.add(tuple(chosen))
    newcomer = np.mean([counts[uid] for uid in range(10)])
    veteran = np.mean([counts[uid] for uid in range(10, 40)])
    assert newcomer > 2.5 * veteran  # weight 1 vs 1/5
    assert len(subsets) > 350  # nobody can tell in advance whether it is evaluated
