"""Ranking metrics: hand-computed values, pessimistic ties, incremental == batch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.metrics import (
    Coverage,
    RankingMetrics,
    RollingMean,
    RunningMean,
    average_recommendation_popularity,
    catalogue_coverage,
    hit_rate,
    mean_popularity_percentile,
    mrr,
    ndcg,
    popularity_percentiles,
    rank_of_target,
    ranking_metrics,
)


def test_rank_of_target_counts_strictly_better_items_plus_one() -> None:
    scores = np.array([[0.1, 0.9, 0.3, 0.5],
                       [0.1, 0.9, 0.3, 0.5]])
    assert rank_of_target(scores, np.array([1, 2])).tolist() == [1, 3]


def test_rank_of_target_ties_go_against_the_target() -> None:
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    # target 0 ties with columns 2 and 3 and trails column 1: ranked 4th, not 2nd
    assert rank_of_target(scores, np.array([0])).tolist() == [4]


def test_rank_of_target_constant_scores_rank_every_target_last() -> None:
    scores = np.zeros((3, 7))
    assert rank_of_target(scores, np.array([0, 3, 6])).tolist() == [7, 7, 7]


def test_rank_of_target_ignores_masked_items_and_punishes_nan() -> None:
    scores = np.array([[0.2, -np.inf, 0.9, np.nan],
                       [np.nan, 0.5, 0.1, 0.2]])
    ranks = rank_of_target(scores, np.array([0, 0]))
    assert ranks.tolist() == [2, 4]  # row 0: only 0.9 beats it; row 1: NaN target is last
    assert ranks.dtype == np.int64


def test_hit_rate_ndcg_mrr_by_hand() -> None:
    ranks = np.array([1, 3, 11, 0])  # 0: target could not be ranked, a miss
    assert hit_rate(ranks, 10) == pytest.approx(2 / 4)
    assert ndcg(ranks, 10) == pytest.approx((1.0 + 1.0 / math.log2(4)) / 4)  # 0.375
    assert mrr(ranks, 10) == pytest.approx((1.0 + 1.0 / 3) / 4)
    assert hit_rate(ranks, 2) == pytest.approx(1 / 4)
    assert ndcg(ranks, 2) == pytest.approx(1 / 4)
    assert mrr(ranks, 11) == pytest.approx((1.0 + 1 / 3 + 1 / 11) / 4)


def test_metrics_with_ties_from_scores_by_hand() -> None:
    scores = np.array([[0.3, 0.3, 0.1],  # target 0 ties with 1: rank 2
                       [0.2, 0.9, 0.9],  # target 0 after two: rank 3
                       [0.7, 0.1, 0.2]])  # rank 1
    ranks = rank_of_target(scores, np.array([0, 0, 0]))
    assert ranks.tolist() == [2, 3, 1]
    assert ranking_metrics(ranks, (2,)) == pytest.approx({
        "hr@2": 2 / 3,
        "ndcg@2": (1 / math.log2(3) + 1.0) / 3,
        "mrr@2": (1 / 2 + 1.0) / 3,
    })


def test_metrics_of_no_examples_are_zero() -> None:
    empty = np.zeros(0, dtype=np.int64)
    assert (hit_rate(empty, 10), ndcg(empty, 10), mrr(empty, 10)) == (0.0, 0.0, 0.0)


def test_running_mean_equals_mean_after_every_update_and_revert() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=200)
    mean = RunningMean()
    for n, x in enumerate(values, 1):
        mean.update(x)
        assert mean.get() == pytest.approx(values[:n].mean())
    mean.revert(values[-1])
    assert mean.get() == pytest.approx(values[:-1].mean())


def test_rolling_mean_equals_window_mean_after_every_update() -> None:
    rng = np.random.default_rng(1)
    values = rng.exponential(size=500) * 1e6  # large values: drift would show
    rolling = RollingMean(window=37)
    for n, x in enumerate(values, 1):
        rolling.update(x)
        assert rolling.get() == pytest.approx(values[max(0, n - 37):n].mean(), rel=1e-12)
    assert rolling.n == 37


@pytest.mark.parametrize("window", [None, 100])
def test_ranking_metrics_incremental_equals_batch_after_every_update(
        window: int | None) -> None:
    rng = np.random.default_rng(2)
    acc = RankingMetrics(ks=(1, 5, 10), window=window)
    seen: list[np.ndarray] = []
    for _ in range(40):
        batch = rng.integers(0, 30, size=int(rng.integers(1, 20)))  # 0s: unknown targets
        acc.update(batch)
        seen.append(batch)
        everything = np.concatenate(seen)
        reference = everything if window is None else everything[-window:]
        assert acc.get() == pytest.approx(ranking_metrics(reference, (1, 5, 10)), rel=1e-12)
        assert acc.n == reference.size


def test_ranking_metrics_reset_starts_a_new_window() -> None:
    acc = RankingMetrics(ks=(10,))
    acc.update(np.array([1, 1]))
    acc.reset()
    acc.update(np.array([20, 0]))
    assert acc.get()["hr@10"] == 0.0
    assert acc.n == 2


def test_catalogue_coverage_counts_distinct_recommended_items() -> None:
    assert catalogue_coverage([["a", "b"], ["b", "c"], []], 10) == pytest.approx(0.3)
    coverage = Coverage().update(["a", "b"]).update(["b", "c"])
    assert coverage.get(4) == pytest.approx(0.75)


def test_popularity_percentiles_use_mid_ranks() -> None:
    popularity = {"a": 10.0, "b": 5.0, "c": 5.0, "d": 1.0}
    got = popularity_percentiles(["a", "b", "d", "zz"], popularity)
    # a: 3 below -> (3 + 0.5)/4; b: 1 below, 2 equal -> 2/4; d: 0.5/4; unknown zz: count 0
    assert got.tolist() == pytest.approx([3.5 / 4, 2 / 4, 0.5 / 4, 0.0])


def test_popularity_bias_is_higher_for_popular_lists() -> None:
    popularity = {item: float(count) for item, count in zip("abcdef", [50, 20, 5, 3, 2, 1],
                                                              strict=True)}
    popular = [["a", "b"], ["a", "c"]]
    niche = [["e", "f"], ["d", "f"]]
    assert mean_popularity_percentile(popular, popularity) > 0.7
    assert mean_popularity_percentile(niche, popularity) < 0.3
    assert average_recommendation_popularity(popular, popularity) == pytest.approx(
        ((50 + 20) / 2 + (50 + 5) / 2) / 2)
    assert average_recommendation_popularity(niche, popularity) == pytest.approx(1.75)
