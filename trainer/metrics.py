"""Ranking metrics for prequential evaluation (numpy only), batch and incremental.

A *rank* is the 1-based position of the true next item in a full ranking; rank 0 means the
target could not be ranked at all (an item the recommender has never seen) and counts as a
miss everywhere. Metric names follow ``<metric>@<k>``: ``hr@10``, ``ndcg@10``, ``mrr@10``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "Coverage",
    "RankingMetrics",
    "RollingMean",
    "RunningMean",
    "average_recommendation_popularity",
    "catalogue_coverage",
    "hit_rate",
    "hit_values",
    "mean_popularity_percentile",
    "mrr",
    "ndcg",
    "ndcg_values",
    "popularity_percentiles",
    "rank_of_target",
    "ranking_metrics",
    "rr_values",
]

METRICS = ("hr", "ndcg", "mrr")


def rank_of_target(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Return the 1-based rank of each row's target item, ties broken pessimistically.

    Parameters
    ----------
    scores
        (B, N) scores, higher is better; ``-inf`` removes an item from the ranking.
    target
        (B,) column of the true item in each row.

    Returns
    -------
    (B,) int64 ranks in 1..N.
    """
    assert scores.ndim == 2 and target.shape == (scores.shape[0],), "scores (B, N), target (B,)"
    rows = np.arange(scores.shape[0])
    target_score = scores[rows, target]  # (B,)
    # Ties go against the target: it is ranked after every item scoring the same. A model
    # with constant (or collapsed) scores then ranks every target last instead of first,
    # so it can never look perfect, and any real signal has to show as a strict order.
    ranks = np.count_nonzero(scores >= target_score[:, None], axis=1).astype(np.int64)  # (B,)
    ranks[np.isnan(target_score)] = scores.shape[1]  # a NaN target score is the worst case
    return ranks


def hit_values(ranks: np.ndarray, k: int) -> np.ndarray:
    """Return per-example hits at ``k`` (1.0 if 1 <= rank <= k, else 0.0)."""
    ranks = np.asarray(ranks)
    return ((ranks >= 1) & (ranks <= k)).astype(np.float64)


def ndcg_values(ranks: np.ndarray, k: int) -> np.ndarray:
    """Return per-example NDCG at ``k`` for one relevant item: 1/log2(rank+1) within k."""
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = (ranks >= 1) & (ranks <= k)
    return np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 1.0) + 1.0), 0.0)


def rr_values(ranks: np.ndarray, k: int) -> np.ndarray:
    """Return per-example reciprocal rank cut at ``k``: 1/rank within k, else 0."""
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = (ranks >= 1) & (ranks <= k)
    return np.where(hit, 1.0 / np.where(hit, ranks, 1.0), 0.0)


_VALUES = {"hr": hit_values, "ndcg": ndcg_values, "mrr": rr_values}


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else 0.0


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """Return HR@k, the share of targets ranked in the top ``k`` (0.0 for no examples)."""
    return _mean(hit_values(ranks, k))


def ndcg(ranks: np.ndarray, k: int) -> float:
    """Return NDCG@k for one relevant item per example (0.0 for no examples)."""
    return _mean(ndcg_values(ranks, k))


def mrr(ranks: np.ndarray, k: int) -> float:
    """Return MRR@k, the mean reciprocal rank cut at ``k`` (0.0 for no examples)."""
    return _mean(rr_values(ranks, k))


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = (10,)) -> dict[str, float]:
    """Return ``hr@k``, ``ndcg@k`` and ``mrr@k`` for every ``k`` in ``ks``."""
    return {f"{name}@{k}": _mean(_VALUES[name](ranks, k)) for k in ks for name in METRICS}


class RunningMean:
    """Weighted mean of everything seen so far, updated one value (or batch) at a time."""

    def __init__(self) -> None:
        self.total = 0.0
        self.n = 0.0  # sum of weights

    def update(self, x: float, w: float = 1.0) -> RunningMean:
        """Add ``x`` with weight ``w``."""
        self.total += w * x
        self.n += w
        return self

    def update_many(self, values: np.ndarray) -> RunningMean:
        """Add every value of ``values`` with weight 1."""
        values = np.asarray(values, dtype=np.float64)
        self.total += float(values.sum())
        self.n += values.size
        return self

    def revert(self, x: float, w: float = 1.0) -> RunningMean:
        """Remove a value added earlier with ``update(x, w)``."""
        self.total -= w * x
        self.n -= w
        return self

    def get(self) -> float:
        """Return the mean (0.0 before any update)."""
        return self.total / self.n if self.n > 0 else 0.0


class RollingMean:
    """Mean of the last ``window`` values, for per-window reporting of a stream."""

    def __init__(self, window: int) -> None:
        assert window >= 1, "window must be >= 1"
        self.window = window
        self.values: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self._since_resum = 0

    @property
    def n(self) -> int:
        """Return how many values the window holds."""
        return len(self.values)

    def update(self, x: float) -> RollingMean:
        """Add ``x``, dropping the oldest value once the window is full."""
        if len(self.values) == self.window:
            self.total -= self.values[0]
        self.values.append(float(x))
        self.total += float(x)
        self._since_resum += 1
        if self._since_resum >= self.window:  # bound the drift of the running sum
            self.total = math.fsum(self.values)
            self._since_resum = 0
        return self

    def update_many(self, values: np.ndarray) -> RollingMean:
        """Add every value of ``values`` in order."""
        for x in np.asarray(values, dtype=np.float64).tolist():
            self.update(x)
        return self

    def get(self) -> float:
        """Return the mean of the window (0.0 when empty)."""
        return self.total / len(self.values) if self.values else 0.0


class RankingMetrics:
    """Incremental HR/NDCG/MRR at several cut-offs, over everything or the last ``window``."""

    def __init__(self, ks: Sequence[int] = (10,), window: int | None = None) -> None:
        assert ks and all(k >= 1 for k in ks), "ks must be positive cut-offs"
        self.ks = tuple(ks)
        self.window = window
        self.reset()

    def reset(self) -> None:
        """Forget every update (e.g. at the start of a reporting window)."""
        self.means: dict[str, RunningMean | RollingMean] = {
            f"{name}@{k}": RunningMean() if self.window is None else RollingMean(self.window)
            for k in self.ks for name in METRICS
        }

    @property
    def n(self) -> int:
        """Return the number of examples the current values cover."""
        return int(next(iter(self.means.values())).n)

    def update(self, ranks: np.ndarray) -> RankingMetrics:
        """Add a batch of target ranks (0 = not rankable, a miss)."""
        ranks = np.asarray(ranks)
        for k in self.ks:
            for name in METRICS:
                self.means[f"{name}@{k}"].update_many(_VALUES[name](ranks, k))
        return self

    def get(self) -> dict[str, float]:
        """Return the current value of every metric."""
        return {key: mean.get() for key, mean in self.means.items()}


def catalogue_coverage(recommendations: Iterable[Iterable[Hashable]],
                       catalogue_size: int) -> float:
    """Return the share of the catalogue that appears in at least one recommendation list."""
    assert catalogue_size >= 1, "catalogue_size must be >= 1"
    distinct = {item for items in recommendations for item in items}
    return len(distinct) / catalogue_size


class Coverage:
    """Distinct items recommended so far, for catalogue coverage over a stream."""

    def __init__(self) -> None:
        self.items: set[Hashable] = set()

    def update(self, recommendation: Iterable[Hashable]) -> Coverage:
        """Add one recommendation list."""
        self.items.update(recommendation)
        return self

    def get(self, catalogue_size: int) -> float:
        """Return distinct recommended items / ``catalogue_size``."""
        return len(self.items) / catalogue_size if catalogue_size > 0 else 0.0


def popularity_percentiles(items: Iterable[Hashable],
                           popularity: Mapping[Hashable, float]) -> np.ndarray:
    """Return each item's popularity percentile in [0, 1] among the catalogue.

    The catalogue is ``popularity``'s keys; an item's percentile is the share of catalogue
    items less popular than it, counting ties as half (mid-rank), so the most popular of
    many items is near 1 and an item missing from ``popularity`` counts as popularity 0.
    """
    counts = np.sort(np.fromiter(popularity.values(), dtype=np.float64))
    assert counts.size, "popularity must not be empty"
    query = np.array([popularity.get(item, 0.0) for item in items], dtype=np.float64)
    below = np.searchsorted(counts, query, side="left")
    equal = np.searchsorted(counts, query, side="right") - below
    return (below + 0.5 * equal) / counts.size


def mean_popularity_percentile(recommendations: Iterable[Iterable[Hashable]],
                               popularity: Mapping[Hashable, float]) -> float:
    """Return the mean popularity percentile of all recommended items (0.5 = unbiased)."""
    flat = [item for items in recommendations for item in items]
    return _mean(popularity_percentiles(flat, popularity))


def average_recommendation_popularity(recommendations: Iterable[Sequence[Hashable]],
                                      popularity: Mapping[Hashable, float]) -> float:
    """Return ARP: the mean over lists of the lists' mean item popularity (Yin et al. 2012)."""
    per_list = [float(np.mean([popularity.get(item, 0.0) for item in items]))
                for items in recommendations if len(items)]
    return float(np.mean(per_list)) if per_list else 0.0
