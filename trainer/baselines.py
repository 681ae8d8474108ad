"""Streaming baselines that share the neural learner's prequential protocol.

Each recommender takes mini-batches of ``TrainingExample``: ``evaluate_batch`` first (test),
then ``train_batch`` (train). Ranking is full: every item known before the batch (seen in an
earlier ``train_batch``, as a target or in a history) is a candidate, except the items of the
example's history other than the target (the neural learner masks the same way). A target the
recommender has never seen gets rank 0; like the learner, ``evaluate_batch`` averages over
the known targets and counts the others (``n_unknown_target``), while the reference
evaluator of ``../shared/data/README.md`` counts them as misses: accumulate ``target_ranks``
in a ``trainer.metrics.RankingMetrics`` (rank 0 is a miss there) for its convention.
Ties are broken against the target.

Masking every history item but the target lets a re-clicked target compete only with items
the user never clicked, which flatters re-consumption data (36% of yoochoose clicks). For
comparison with the reference bars, ``history_mask="all"`` gives their variant A (a target
in the history is a miss: rank ``n_items + 1``) and ``"none"`` their variant B.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from advrec.contract import TrainingExample
from advrec.types import ItemId, TimestampMs
from trainer.metrics import rank_targets, ranking_metrics
from trainer.prior import Cooccurrence

__all__ = ["HISTORY_MASKS", "ContentKNN", "ItemKNN", "RecencyPopularity", "StreamingBaseline"]

Batch = Sequence[TrainingExample]
HISTORY_MASKS = ("except_target", "all", "none")  # leave-one-out, variant A, variant B
MASK_VARIANT = {"except_target": "loo", "all": "A", "none": "B"}  # rank_targets' names


class StreamingBaseline(ABC):
    """Item vocabulary, masking, ranking and evaluation shared by the baselines."""

    def __init__(self, history_mask: str = "except_target") -> None:
        assert history_mask in HISTORY_MASKS, f"history_mask must be one of {HISTORY_MASKS}"
        self.history_mask = history_mask
        self.index: dict[ItemId, int] = {}  # external id -> column of the score matrix
        self.ids: list[ItemId] = []
        self.examples_seen = 0

    @property
    def n_items(self) -> int:
        """Return how many items are known (the size of the ranking)."""
        return len(self.ids)

    def _register(self, item: ItemId) -> int:
        col = self.index.get(item)
        if col is None:
            col = self.index[item] = len(self.ids)
            self.ids.append(item)
            self._grow(len(self.ids))
        return col

    def _grow(self, n_items: int) -> None:  # noqa: B027 (optional hook, empty on purpose)
        """Make room for ``n_items`` items in per-item state."""

    @abstractmethod
    def _scores(self, histories: Sequence[Sequence[ItemId]]) -> np.ndarray:
        """Return (B, N) scores of every known item after each history."""

    def _tiebreak(self) -> np.ndarray | None:
        """Return (N,) secondary scores that order items with equal scores, or None."""
        return None

    def scores(self, histories: Sequence[Sequence[ItemId]]) -> np.ndarray:
        """Score every known item for each history: (B, N), column = ``self.index[item]``."""
        return self._scores(histories)

    def tiebreak(self) -> np.ndarray | None:
        """Return (N,) secondary scores that order items scoring the same, or None."""
        return self._tiebreak()

    def target_ranks(self, batch: Batch) -> np.ndarray:
        """Return each example's target rank by ``trainer.metrics.rank_targets`` (pessimistic
        ties, then the tie-break key; 0: unknown target; ``OUT_OF_LIST``: a re-click that
        ``history_mask="all"`` removes, a miss), the history masked as ``history_mask`` says."""
        ranks = np.zeros(len(batch), dtype=np.int64)
        rows = [b for b, ex in enumerate(batch) if ex.item in self.index]
        if not rows:
            return ranks
        scores = np.array(self._scores([batch[b].history for b in rows]),
                          dtype=np.float64)  # (R, N), a copy: ranking masks it
        target = np.array([self.index[batch[b].item] for b in rows], dtype=np.int64)  # (R,)
        seen = [np.array([self.index.get(i, -1) for i in batch[b].history], dtype=np.int64)
                for b in rows]
        tiebreak = self._tiebreak()
        ranks[rows] = rank_targets(scores, target, seen, variant=MASK_VARIANT[self.history_mask],
                                   tiebreak=None if tiebreak is None
                                   else np.asarray(tiebreak, dtype=np.float64))
        return ranks

    def evaluate_batch(self, batch: Batch, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
        """Rank each example's next item before training on it: hr/ndcg/mrr@k over known targets."""
        ranks = self.target_ranks(batch)
        known = ranks[ranks > 0]
        out = ranking_metrics(known, ks)
        out["n_eval"] = float(known.size)
        out["n_unknown_target"] = float(len(ranks) - known.size)
        return out

    def train_batch(self, batch: Batch) -> dict[str, float]:
        """Learn from a batch of examples, in order; return counters."""
        for ex in batch:
            self._learn(ex)
        self.examples_seen += len(batch)
        return {"examples": float(len(batch)), "items": float(self.n_items)}

    @abstractmethod
    def _learn(self, example: TrainingExample) -> None:
        """Update the state with one example."""

    def recommend(self, history: Sequence[ItemId], k: int,
                  exclude_seen: bool = True) -> list[ItemId]:
        """Return the top ``k`` known items after ``history`` (without its items by default)."""
        if not self.ids or k <= 0:
            return []
        scores = self._scores([history])[0]  # (N,)
        if exclude_seen:
            scores[[self.index[item] for item in history if item in self.index]] = -np.inf
        tiebreak = self._tiebreak()
        keys = (scores,) if tiebreak is None else (tiebreak, scores)
        order = np.lexsort(tuple(-key for key in keys))  # last key is the primary one
        order = order[np.isfinite(scores[order])][:k]
        return [self.ids[col] for col in order.tolist()]


class RecencyPopularity(StreamingBaseline):
    """Most clicked items, each click's weight halving over a half-life.

    The half-life counts clicks by default: event time spreads very unevenly (MovieLens
    spans 22 years in bursts), and a clock of clicks adapts to the traffic. On both
    ml-latest-small and yoochoose-100k a half-life of about 3000 clicks ranked best among
    200..10000 clicks, and beat every half-life from 1 hour to 1 year of event time
    (ml-latest-small, variant A, batches of 256: HR@10 0.057 vs 0.053 at 1 year).

    Parameters
    ----------
    half_life_events
        Half-life of a click's weight, in clicks learned since.
    half_life_ms
        Half-life in event time (ms) instead; give at most one of the two. Neither:
        every click counts forever.
    history_mask
        Which history items leave the ranking (one of ``HISTORY_MASKS``).
    """

    def __init__(self, half_life_events: float | None = 3000.0,
                 half_life_ms: float | None = None,
                 history_mask: str = "except_target") -> None:
        super().__init__(history_mask)
        assert half_life_events is None or half_life_ms is None, "give one half-life, not two"
        for value in (half_life_events, half_life_ms):
            assert value is None or value > 0, "a half-life must be positive"
        self.half_life_events = half_life_events
        self.half_life_ms = half_life_ms
        self.counts = np.zeros(1024)  # (capacity,) weights relative to clock self.t_ref
        self.t_ref: float | None = None
        self.clicks_added = 0

    def _grow(self, n_items: int) -> None:
        if n_items > self.counts.size:
            self.counts = np.concatenate([self.counts, np.zeros(self.counts.size)])

    def _weight(self, ts: TimestampMs) -> float:
        if self.half_life_events is not None:
            clock, half_life = float(self.clicks_added), self.half_life_events
        elif self.half_life_ms is not None:
            clock, half_life = float(ts), self.half_life_ms
        else:
            return 1.0
        if self.t_ref is None:
            self.t_ref = clock
        exponent = (clock - self.t_ref) / half_life
        if exponent > 60:  # rescale long before 2**1024 overflows; ranks are unaffected
            self.counts *= 2.0 ** -exponent
            self.t_ref, exponent = clock, 0.0
        return 2.0 ** exponent

    def add(self, col: int, ts: TimestampMs) -> None:
        """Count one click on the item in column ``col`` at time ``ts``."""
        weight = self._weight(ts)  # first: it may rescale every count, this one included
        self.counts[col] += weight
        self.clicks_added += 1

    def _learn(self, example: TrainingExample) -> None:
        for item in example.history:
            self._register(item)
        self.add(self._register(example.item), example.ts)

    def popularity(self) -> np.ndarray:
        """Return (N,) decayed click counts of the known items (a view, do not modify)."""
        return self.counts[: self.n_items]

    def _scores(self, histories: Sequence[Sequence[ItemId]]) -> np.ndarray:
        return np.tile(self.popularity(), (len(histories), 1))  # (B, N)


class ItemKNN(StreamingBaseline):
    """Streaming item-to-item co-occurrence over each user's last few items.

    Learning from a click on ``j`` after history ``h`` adds ``decay**p`` to ``C[h_p, j]``
    (and ``backward * decay**p`` to ``C[j, h_p]``) for the ``n_recent`` most recent history
    items (p = 0 is the latest): ``trainer.prior.Cooccurrence``, the counts the hybrid's
    prior also uses. Scoring after a history sums the rows of its recent items
    with the same weights, divides by ``clicks(j) ** alpha`` (0: raw co-occurrence), and
    breaks ties, including the many items with no co-occurrence at all, by time-decayed
    popularity, so a cold history falls back to recency-popularity.

    Parameters
    ----------
    n_recent
        How many of the latest history items link to the next click.
    decay
        Weight factor per step back in the history.
    backward
        Weight of the reverse link (next item -> history item); 0 keeps it directional.
    alpha
        Exponent of the candidate's popularity that divides its score.
    half_life_events, half_life_ms
        Half-life of the popularity tie-break (see ``RecencyPopularity``).
    history_mask
        Which history items leave the ranking (one of ``HISTORY_MASKS``).
    """

    def __init__(self, n_recent: int = 3, decay: float = 0.7, backward: float = 0.5,
                 alpha: float = 0.0, half_life_events: float | None = 3000.0,
                 half_life_ms: float | None = None, history_mask: str = "except_target") -> None:
        super().__init__(history_mask)
        assert n_recent >= 1, "n_recent must be >= 1"
        assert 0 < decay <= 1 and backward >= 0 and alpha >= 0, "decay in (0, 1], others >= 0"
        self.n_recent, self.decay, self.backward = n_recent, decay, backward
        self.cooc = Cooccurrence(n_recent, decay, backward)  # C over this model's columns
        self.alpha = alpha
        self.popular = RecencyPopularity(half_life_events, half_life_ms)
        self.clicks = np.zeros(1024)  # (capacity,) undecayed clicks, for the alpha term

    def _grow(self, n_items: int) -> None:
        self.popular._register(self.ids[-1])
        if n_items > self.clicks.size:
            self.clicks = np.concatenate([self.clicks, np.zeros(self.clicks.size)])
        self.cooc.grow(n_items)

    def _recent(self, history: Sequence[ItemId]) -> list[int]:
        """Return the columns of the latest ``n_recent`` known history items, latest first."""
        cols = [self.index.get(item) for item in history[-self.n_recent:]]
        return [c for c in reversed(cols) if c is not None]

    def _learn(self, example: TrainingExample) -> None:
        for item in example.history:
            self._register(item)
        j = self._register(example.item)
        self.cooc.learn(self._recent(example.history), j)
        self.clicks[j] += 1
        self.popular.add(j, example.ts)

    def _scores(self, histories: Sequence[Sequence[ItemId]]) -> np.ndarray:
        scores = np.zeros((len(histories), self.n_items))  # (B, N)
        for b, history in enumerate(histories):
            self.cooc.add_scores(scores[b], self._recent(history))
        if self.alpha:
            scores /= np.maximum(self.clicks[: self.n_items], 1.0) ** self.alpha
        return scores

    def _tiebreak(self) -> np.ndarray:
        return self.popular.popularity()

    def n_links(self) -> int:
        """Return the number of non-zero co-occurrence entries."""
        return self.cooc.n_links()


class ContentKNN(StreamingBaseline):
    """Content only: TF-IDF of each catalogue item's text, cosine to the user's latest items.

    The cold-start reference (issue: zero-shot cold start): every catalogue item is a
    candidate from the start, clicked or not, and is scored by how close its text (title and
    categories for MovieLens) is to the text of the history's ``n_recent`` latest items,
    weighted ``decay**p`` (p = 0 is the latest) as item-kNN weighs them. Clicks only break
    ties (time-decayed popularity, as item-kNN's), so that a history with no textual match
    falls back to what is popular. Items clicked but missing from the catalogue have no
    text: they score 0.

    Parameters
    ----------
    catalogue
        (item id, text) of every catalogue item, known before the stream starts.
    n_recent, decay
        The history items that count, latest first, and their weight factor per step back.
    history_mask
        Which history items leave the ranking (one of ``HISTORY_MASKS``).
    """

    def __init__(self, catalogue: Sequence[tuple[ItemId, str]], n_recent: int = 5,
                 decay: float = 0.7, history_mask: str = "except_target",
                 dense: np.ndarray | None = None) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        super().__init__(history_mask)
        assert n_recent >= 1 and 0 < decay <= 1, "n_recent >= 1, decay in (0, 1]"
        self.n_recent, self.decay = n_recent, decay
        self.popular = RecencyPopularity()
        # words of two or more letters or digits: a title's year "(1995)" is a word too
        vectorizer = TfidfVectorizer(sublinear_tf=True, token_pattern=r"(?u)\b\w\w+\b")
        texts = [text for _, text in catalogue]
        self.vectors = vectorizer.fit_transform(texts).tocsr() if texts else None  # (N0, T)
        if dense is not None:  # the text encoder's unit vectors instead of TF-IDF
            import scipy.sparse as sp

            self.vectors = sp.csr_matrix(dense)
        self.n_terms = 0 if self.vectors is None else self.vectors.shape[1]
        for item, _ in catalogue:
            self._register(item)

    def _grow(self, n_items: int) -> None:
        self.popular._register(self.ids[-1])

    def _learn(self, example: TrainingExample) -> None:
        for item in example.history:
            self._register(item)
        self.popular.add(self._register(example.item), example.ts)

    def _scores(self, histories: Sequence[Sequence[ItemId]]) -> np.ndarray:
        import scipy.sparse as sp

        scores = np.zeros((len(histories), self.n_items))  # (B, N)
        if self.vectors is None:
            return scores
        n_text = self.vectors.shape[0]
        rows, cols, vals = [], [], []
        for b, history in enumerate(histories):
            recent = [self.index.get(i) for i in history[-self.n_recent:]][::-1]  # latest first
            for p, c in enumerate(recent):
                if c is not None and c < n_text:
                    rows.append(b)
                    cols.append(c)
                    vals.append(self.decay**p)
        weights = sp.csr_matrix((vals, (rows, cols)), shape=(len(histories), n_text))  # (B, N0)
        profile = weights @ self.vectors  # (B, T): the history's weighted text
        scores[:, :n_text] = (profile @ self.vectors.T).toarray()  # (B, N0) cosines, summed
        return scores

    def _tiebreak(self) -> np.ndarray:
        return self.popular.popularity()
