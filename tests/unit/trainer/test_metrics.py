"""Ranking metrics: hand-computed values, pessimistic ties, incremental == batch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.metrics import (
    OUT_OF_LIST,
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
    rank_targets,
    ranking_metrics,
)

NO_HISTORY = [np.zeros(0, np.int64)] * 3


def ranks_of(scores: list[list[float]], target: list[int], history: list[list[int]] | None = None,
             **kw: object) -> list[int]:
    rows = len(scores)
    seen = NO_HISTORY[:rows] if history is None else [np.array(h, np.int64) for h in history]
    out = rank_targets(np.array(scores, dtype=np.float64), np.array(target), seen, **kw)
    assert out.dtype == np.int64
    return out.tolist()


def test_rank_counts_better_items_plus_one() -> None:
    assert ranks_of([[0.1, 0.9, 0.3, 0.5]] * 2, [1, 2]) == [1, 3]


def test_ties_go_against_the_target() -> None:
    # target 0 ties with columns 2 and 3 and trails column 1: ranked 4th, not 2nd
    assert ranks_of([[0.5, 0.9, 0.5, 0.5, 0.1]], [0]) == [4]
    # constant scores rank every target last
    assert ranks_of([[0.0] * 7] * 3, [0, 3, 6]) == [7, 7, 7]


def test_a_tiebreak_orders_equal_scores_and_ties_on_both_stay_against_the_target() -> None:
    tb = np.array([0.0, 5.0, 0.0, 1.0])
    assert ranks_of([[0.0] * 4], [3], tiebreak=tb) == [2]  # only column 1 wins the tie-break
    assert ranks_of([[0.0] * 4], [0], tiebreak=tb) == [4]  # ties with column 2 on both keys


def test_a_cold_target_is_rank_zero_and_a_nan_target_last() -> None:
    assert ranks_of([[0.2, 0.9, 0.1]], [-1]) == [0]
    assert ranks_of([[np.nan, 0.5, 0.1, 0.2]], [0]) == [4]
    assert ranks_of([[0.2, -np.inf, 0.9, np.nan]], [0]) == [2]  # -inf and NaN never ahead


def test_variant_a_removes_the_history_and_a_re_click_is_a_miss() -> None:
    scores = [[0.1, 0.9, 0.5, 0.3], [0.1, 0.9, 0.5, 0.3]]
    # row 0: column 1 seen, so target 2 is first; row 1: the target itself was seen
    assert ranks_of(scores, [2, 2], [[1], [2, 1]], variant="A") == [1, OUT_OF_LIST]
    assert ranking_metrics(np.array([OUT_OF_LIST]), (1, 1000))["hr@1000"] == 0.0


def test_variant_b_removes_nothing_and_loo_everything_but_the_target() -> None:
    scores = [[0.1, 0.9, 0.5, 0.3]]
    assert ranks_of(scores, [2], [[1, 2]], variant="B") == [2]  # a re-click can be a hit
    assert ranks_of(scores, [2], [[1, 2]], variant="loo") == [1]


def test_the_padding_column_is_never_a_candidate_and_repeats_and_negatives_are_ignored() -> None:
    scores = [[5.0, 0.9, 0.5, 0.3]]  # column 0 is padding (the learner's row 0)
    assert ranks_of(scores, [2], never=0) == [2]
    assert ranks_of(scores, [3], [[1, 1, -1, 2]], variant="A", never=0) == [1]


def test_variants_rank_the_same_scores_when_given_copies() -> None:
    scores = np.array([[0.1, 0.9, 0.5]])
    history = [np.array([1])]
    a = rank_targets(scores.copy(), np.array([2]), history, variant="A")
    b = rank_targets(scores, np.array([2]), history, variant="B")
    assert a.tolist() == [1] and b.tolist() == [2]
    with pytest.raises(AssertionError, match="variant"):
        rank_targets(scores, np.array([2]), history, variant="C")


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
    ranks = rank_targets(scores, np.array([0, 0, 0]), NO_HISTORY)
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
