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
    "OUT_OF_LIST",
    "VARIANTS",
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
    "rank_targets",
    "ranking_metrics",
    "rr_values",
]

METRICS = ("hr", "ndcg", "mrr")


VARIANTS = ("A", "B", "loo")
# the rank of a target the variant removed from the list (a re-click under A): a miss at any
# k, however small the catalogue, yet a target the method knows (rank > 0)
OUT_OF_LIST = int(np.iinfo(np.int64).max)


def rank_targets(scores: np.ndarray, target: np.ndarray, history: Sequence[np.ndarray], *,
                 variant: str = "A", tiebreak: np.ndarray | None = None,
                 never: int | None = None) -> np.ndarray:
    """Rank each row's target column among the items a list may show: the one ranking rule
    of the sidecar's gauges and quality gate, ``advrec evaluate`` and the baselines.

    Parameters
    ----------
    scores
        (B, C) scores, higher is better. Modified in place: columns that leave the list
        become ``-inf`` (pass a copy to rank the same scores under another variant).
    target
        (B,) column of the true next item; negative when the method does not know the item
        (a cold target): rank 0, a miss everywhere.
    history
        Per row, the columns of the items the user clicked before (any order, repeats and
        negative entries allowed; negative ones are ignored).
    variant
        ``"A"``: every history item leaves the list, so a target the user clicked before is a
        miss (rank ``OUT_OF_LIST``), as the served list never shows it. ``"B"``: nothing leaves:
        a re-click can be a hit. ``"loo"``: history items leave except the target (it is
        ranked among items not seen before; the rule of leave-one-out evaluations).
    tiebreak
        (C,) secondary key for equal scores (higher first).
    never
        A column that is never a candidate (the learner's padding row 0).

    Returns
    -------
    (B,) int64 ranks: 1..C, ``OUT_OF_LIST`` for a target variant A removed, 0 for a cold
    target.
    Ties go against the target: it is ranked after every item equal to it on (score,
    tiebreak), so constant scores rank every target last, never first. A NaN target score
    ranks last.
    """
    assert variant in VARIANTS, f"variant must be one of {VARIANTS}, not {variant!r}"
    assert scores.ndim == 2 and target.shape == (scores.shape[0],), "scores (B, C), target (B,)"
    B, C = scores.shape
    ranks = np.zeros(B, dtype=np.int64)
    live = target >= 0
    if never is not None:
        scores[:, never] = -np.inf
    for b in range(B):
        if variant == "B":
            break
        cols = np.asarray(history[b], dtype=np.int64)
        cols = cols[cols >= 0]
        if live[b] and np.any(cols == target[b]):
            if variant == "A":
                live[b] = False
                ranks[b] = OUT_OF_LIST
                continue
            cols = cols[cols != target[b]]
        scores[b, cols] = -np.inf
    rows = np.flatnonzero(live)
    if rows.size == 0:
        return ranks
    s = scores[rows]  # (R, C)
    t = target[rows]  # (R,)
    ts = s[np.arange(rows.size), t][:, None]  # (R, 1)
    if tiebreak is None:
        ahead = s >= ts  # (R, C): the target itself and every item tied with it
    else:
        tb, tbt = tiebreak[None, :], tiebreak[t][:, None]  # (1, C), (R, 1)
        ahead = (s > ts) | ((s == ts) & (tb >= tbt))
    ranks[rows] = np.count_nonzero(ahead, axis=1)
    ranks[rows[np.isnan(ts[:, 0])]] = C  # a NaN target score is the worst case
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
