"""``advrec evaluate``: prequential (test-then-train) replay of a dataset, or offline leave-one-out.

Prequential protocol (``../shared/data/README.md``): events in replay order become training
examples the way the stream app builds them (history = the user's last L items before the
click); each mini-batch is first ranked by every method, then trained on by the same
``OnlineLearner`` code the sidecar runs. A user's first event is learned from but not scored;
the ranking is full, over every item seen in earlier batches; a never-seen target is a miss.
Variant A removes the user's whole past (not only the last L items) from the list, so a
re-clicked target is a miss; variant B removes nothing. Ties go to the item that appeared
first in the stream (lower column), after the method's own tie-break (kNN: popularity).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from advrec.attacks import (
    AttackLabels,
    add_attack_arguments,
    attack_config,
    inject,
)
from advrec.contract import TrainingExample
from advrec.datasets import (
    SOURCES,
    DatasetError,
    EventLog,
    load_events,
    read_catalogue_csv,
    read_movielens_movies,
)
from advrec.suspicion import FEATURES
from advrec.types import ItemId
from trainer.adversarial import LOSSES, MODES, AdversarialConfig
from trainer.baselines import ContentKNN, ItemKNN, RecencyPopularity, StreamingBaseline
from trainer.content import ContentConfig, TextEncoder, encode_cached
from trainer.detector import DetectorConfig, TrainingFilter
from trainer.learner import OnlineLearner, TrainConfig
from trainer.metrics import rank_targets, ranking_metrics
from trainer.model import ModelConfig
from trainer.prior import PriorConfig

__all__ = [
    "BASELINES",
    "DEFAULT_METHODS",
    "BaselineAdapter",
    "EvalCatalogue",
    "LearnerAdapter",
    "MethodRun",
    "PastItems",
    "build_examples",
    "build_parser",
    "main",
    "run_prequential",
    "summarize",
]

KS = (10, 20)
TOP_K = 10  # list length for coverage and popularity bias
# tfidf: content only (TF-IDF of the catalogue's texts); enc-knn: the same with the text
# encoder's vectors (--content on); both need --catalogue
BASELINES = ("pop", "knn", "tfidf", "enc-knn")
DEFAULT_METHODS = ("pop", "knn", "none", "irgan", "apr", "irgan+apr")
D_SNAPSHOTS = (0.1, 0.4, 0.7, 1.0)  # stream fractions at which D's scores are recorded
ERROR = "advrec evaluate: error: {}"
# the cold-start curves: HR@10 by the user's past events (0: the first click, which the
# service answers with the trending list) and by the target's past clicks
USER_BUCKETS = ((0, 0), (1, 1), (2, 4), (5, 19), (20, None))
ITEM_BUCKETS = ((0, 0), (1, 4), (5, 19), (20, None))
# the worker's trending list counts the last hour of event time (stream_app/settings.py:
# 6 buckets of 600 s)
TRENDING_WINDOW_MS = 6 * 600 * 1000


def bucket_name(bucket: tuple[int, int | None]) -> str:
    lo, hi = bucket
    return f"{lo}+" if hi is None else (f"{lo}" if lo == hi else f"{lo}-{hi}")


@dataclass(frozen=True)
class EvalCatalogue:
    """The item catalogue, known before the stream starts: ids, the text an encoder reads,
    and (for the content runs) the encoder's vectors [N, C]."""

    items: tuple[ItemId, ...]
    texts: tuple[str, ...]
    vectors: np.ndarray | None = None


class Trending:
    """The trending list the service shows a user with no history: clicks per item over
    the last ``window_ms`` of event time, most clicked first."""

    def __init__(self, window_ms: int = TRENDING_WINDOW_MS) -> None:
        self.window_ms = window_ms
        self.clicks: deque[tuple[int, int]] = deque()  # (ts, gid), oldest first
        self.counts = np.zeros(1024, dtype=np.int64)  # (capacity,) per global item id

    def add(self, gid: int, ts: int) -> None:
        if gid >= self.counts.size:
            grown = np.zeros(max(gid + 1, 2 * self.counts.size), dtype=np.int64)
            grown[: self.counts.size] = self.counts
            self.counts = grown
        self.clicks.append((ts, gid))
        self.counts[gid] += 1

    def rank(self, gid: int, ts: int) -> int:
        """The rank of ``gid`` in the list at ``ts`` (ties against it); 0 if not listed."""
        while self.clicks and self.clicks[0][0] < ts - self.window_ms:
            _, old = self.clicks.popleft()
            self.counts[old] -= 1
        c = self.counts[gid] if gid < self.counts.size else 0
        return int(np.count_nonzero(self.counts >= c)) if c > 0 else 0


def cold_metrics(ranks: np.ndarray, user_events: np.ndarray, target_clicks: np.ndarray,
                 first_ranks: np.ndarray) -> dict[str, float]:
    """HR@10 and counts by the user's past events and by the target's past clicks
    (``first_ranks``: the trending list's ranks of users' first clicks, bucket 0)."""
    out: dict[str, float] = {}
    for kind, buckets, values in (("user", USER_BUCKETS, user_events),
                                  ("item", ITEM_BUCKETS, target_clicks)):
        for lo, hi in buckets:
            top = np.iinfo(np.int64).max if hi is None else hi
            part = (first_ranks if kind == "user" and lo == 0  # never scored by the method
                    else ranks[(values >= lo) & (values <= top)])
            name = bucket_name((lo, hi))
            out[f"cold_{kind}_hr@10:{name}"] = ranking_metrics(part, (10,))["hr@10"]
            out[f"cold_{kind}_n:{name}"] = float(part.size)
    return out


# ---------------------------------------------------------------------------- examples


def build_examples(events: EventLog | Sequence[Any], max_len: int) -> Iterator[TrainingExample]:
    """Turn events into examples as the stream app does: history = the user's last L items."""
    history: dict[str, list[ItemId]] = {}
    for e in events:
        h = history.setdefault(e.user, [])
        yield TrainingExample(user=e.user, history=tuple(h), item=e.item, ts=e.ts)
        h.append(e.item)
        if len(h) > max_len:
            del h[: len(h) - max_len]


class PastItems:
    """Every item each user clicked so far, as global item ids (growable int arrays)."""

    def __init__(self) -> None:
        self.gid: dict[ItemId, int] = {}
        self.ids: list[ItemId] = []
        self._past: dict[str, np.ndarray] = {}
        self._n: dict[str, int] = {}

    def item_gid(self, item: ItemId) -> int:
        """Return the global id of ``item`` (ids follow first appearance)."""
        g = self.gid.get(item)
        if g is None:
            g = self.gid[item] = len(self.ids)
            self.ids.append(item)
        return g

    def push(self, user: str, gid: int) -> int:
        """Append a click of ``user`` and return how many clicks preceded it."""
        arr = self._past.get(user)
        n = self._n.get(user, 0)
        if arr is None or n == arr.size:
            grown = np.empty(max(8, 2 * n), dtype=np.int64)
            if arr is not None:
                grown[:n] = arr
            arr = self._past[user] = grown
        arr[n] = gid
        self._n[user] = n + 1
        return n

    def before(self, user: str, n: int) -> np.ndarray:
        """Return the user's first ``n`` clicks (global ids)."""
        return self._past[user][:n] if n else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------- methods


class Adapter(Protocol):
    """What the evaluator needs of a method: scores over columns, a column per item, training."""

    def scores(self, histories: Sequence[Sequence[ItemId]]) -> np.ndarray: ...
    def tiebreak(self) -> np.ndarray | None: ...
    def column(self, item: ItemId) -> int: ...
    def train(self, batch: Sequence[TrainingExample]) -> dict[str, float]: ...


class LearnerAdapter:
    """The neural ``OnlineLearner``: columns are vocabulary rows (0 = padding, never ranked)."""

    def __init__(self, learner: OnlineLearner) -> None:
        self.learner = learner

    def scores(self, histories: Sequence[Sequence[ItemId]]) -> np.ndarray:
        out = self.learner.scores(histories).astype(np.float64)  # (B, V+1)
        out[:, 0] = -np.inf
        return out

    def tiebreak(self) -> np.ndarray | None:
        return None

    def column(self, item: ItemId) -> int:
        row = self.learner.vocab.index(item)
        return -1 if row is None else row

    def train(self, batch: Sequence[TrainingExample]) -> dict[str, float]:
        return self.learner.train_batch(batch)


class BaselineAdapter:
    """A ``StreamingBaseline`` (its own masking is bypassed: the evaluator masks)."""

    def __init__(self, model: StreamingBaseline) -> None:
        self.model = model

    def scores(self, histories: Sequence[Sequence[ItemId]]) -> np.ndarray:
        return np.array(self.model.scores(histories), dtype=np.float64)  # (B, N), a copy

    def tiebreak(self) -> np.ndarray | None:
        tb = self.model.tiebreak()
        return None if tb is None else np.array(tb, dtype=np.float64)

    def column(self, item: ItemId) -> int:
        return self.model.index.get(item, -1)

    def train(self, batch: Sequence[TrainingExample]) -> dict[str, float]:
        return self.model.train_batch(batch)


def top_k(scores: np.ndarray, k: int, tiebreak: np.ndarray | None) -> np.ndarray:
    """Return (B, k) columns of the best finite scores (tie-break as a tiny additive term)."""
    key = scores
    if tiebreak is not None and tiebreak.size:
        span = float(np.max(tiebreak)) or 1.0
        key = scores + 1e-6 * tiebreak / span
    k = min(k, key.shape[1])
    part = np.argpartition(-key, k - 1, axis=1)[:, :k]  # (B, k)
    ok = np.isfinite(np.take_along_axis(key, part, axis=1))
    return np.where(ok, part, -1)


# ---------------------------------------------------------------------------- one run


@dataclass
class MethodRun:
    """Everything one method-seed replay measured."""

    method: str
    seed: int
    ranks: np.ndarray  # (n_scored,) in replay order, 0 = miss
    metrics: dict[str, float]
    curves: list[dict[str, float]]  # one row per batch
    windows: list[dict[str, float]]
    d_snapshots: list[dict[str, Any]] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    embedding_counts: np.ndarray | None = None
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)  # every setting this run used
    # with the defence: each scored user's highest P(fake) and whether the user was fake
    suspicion: list[tuple[str, bool, float]] = field(default_factory=list)


def method_settings(adapter: Adapter) -> dict[str, Any]:
    """Every setting of the method as built for one run (mode and seed included)."""
    if isinstance(adapter, LearnerAdapter):
        learner = adapter.learner
        return {"model": dataclasses.asdict(learner.model_cfg),
                "train": dataclasses.asdict(learner.train_cfg),
                "adversarial": dataclasses.asdict(learner.adv_cfg),
                "prior": dataclasses.asdict(learner.prior_cfg),
                "content": (dataclasses.asdict(learner.content_cfg)
                            if learner.content is not None else None)}
    model = adapter.model  # type: ignore[attr-defined]
    params = {k: v for k, v in vars(model).items()
              if isinstance(v, (int, float, str, bool, type(None))) and k != "examples_seen"}
    return {"baseline": type(model).__name__, **params}


PRIOR_SUFFIX = "+cooc"  # a neural mode with the co-occurrence prior added: "apr+cooc"


def split_method(name: str) -> tuple[str, bool]:
    """Return (base method, hybrid?) for a method name such as ``apr`` or ``apr+cooc``."""
    if name.endswith(PRIOR_SUFFIX):
        return name[: -len(PRIOR_SUFFIX)], True
    return name, False


def make_method(name: str, seed: int, model_cfg: Any, train_cfg: TrainConfig,
                adv_cfg: AdversarialConfig, prior_cfg: PriorConfig | None = None,
                catalogue: EvalCatalogue | None = None,
                content: ContentConfig | None = None) -> Adapter:
    """Build the method called ``name`` (pop, knn, tfidf, an adversarial mode, or a mode +
    cooc).

    A plain mode ranks with G alone (prior weight 0); ``mode+cooc`` ranks with G plus the
    prior at ``prior_cfg``'s weight. With ``content``, a neural method starts with the
    ``catalogue``'s vectors (trainer/content.py)."""
    if name == "pop":
        return BaselineAdapter(RecencyPopularity(history_mask="none"))
    if name == "knn":
        return BaselineAdapter(ItemKNN(history_mask="none"))
    if name == "tfidf":
        if catalogue is None:
            raise ValueError("the tfidf baseline needs a catalogue (--catalogue)")
        return BaselineAdapter(ContentKNN(list(zip(catalogue.items, catalogue.texts,
                                                   strict=True)), history_mask="none"))
    if name == "enc-knn":
        if catalogue is None or catalogue.vectors is None:
            raise ValueError("the enc-knn baseline needs the catalogue's text embeddings")
        return BaselineAdapter(ContentKNN(list(zip(catalogue.items, catalogue.texts,
                                                   strict=True)), history_mask="none",
                                          dense=catalogue.vectors))
    mode, hybrid = split_method(name)
    prior_cfg = prior_cfg or PriorConfig()
    if not hybrid:
        prior_cfg = dataclasses.replace(prior_cfg, weight=0.0)
    cfg = dataclasses.replace(train_cfg, mode=mode, seed=seed)
    learner = OnlineLearner(model_cfg, cfg, adv_cfg, prior_cfg, content)
    if content is not None:
        if catalogue is None or catalogue.vectors is None:
            raise ValueError("content runs need the catalogue's vectors")
        learner.add_catalogue(list(catalogue.items), catalogue.vectors)
    return LearnerAdapter(learner)


@torch.no_grad()
def discriminator_scores(learner: OnlineLearner, batch: Sequence[TrainingExample],
                         rng: np.random.Generator, temperature: float = 0.2,
                         max_rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Return D's logits on real next items and on items sampled from G (as D trains on)."""
    ex = [e for e in batch if e.history and learner.vocab.index(e.item) is not None][:max_rows]
    if not ex:
        return np.zeros(0), np.zeros(0)
    L = learner.model_cfg.max_len
    hist = np.array([learner.vocab.encode_history(e.history, L) for e in ex], dtype=np.int64)
    target = np.array([learner.vocab.index(e.item) for e in ex], dtype=np.int64)  # (B,)
    logits = learner.scores([e.history for e in ex]).astype(np.float64) / temperature
    logits[:, 0] = -np.inf
    logits[np.arange(len(ex)), target] = -np.inf  # never the real item, as in training
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    fake = (p.cumsum(axis=1) < rng.random((len(ex), 1))).sum(axis=1)  # (B,) inverse CDF
    fake = np.minimum(fake, p.shape[1] - 1)
    h = torch.from_numpy(hist).to(learner.device)
    disc = learner.discriminator
    real_logit = disc(h, torch.from_numpy(target[:, None]).to(learner.device))[:, 0]
    fake_logit = disc(h, torch.from_numpy(fake[:, None]).to(learner.device))[:, 0]
    return real_logit.float().cpu().numpy(), fake_logit.float().cpu().numpy()


def window_metrics(ranks: np.ndarray, n_windows: int) -> list[dict[str, float]]:
    """Split the scored events into ``n_windows`` consecutive chunks; metrics of each."""
    out = []
    start = 0
    for i, chunk in enumerate(np.array_split(ranks, max(1, min(n_windows, len(ranks) or 1)))):
        row = {"window": float(i), "first": float(start), "n_scored": float(chunk.size)}
        row.update(ranking_metrics(chunk, KS))
        out.append(row)
        start += chunk.size
    return out


@dataclass
class _Tally:
    """What one way of ranking (a method, or a hybrid at one prior weight) accumulates."""

    name: str
    weight: float | None  # the prior's weight (None: the method's own scores)
    ranks: list[np.ndarray] = field(default_factory=list)
    recommended: set[int] = field(default_factory=set)
    pop_pct: list[float] = field(default_factory=list)
    curves: list[dict[str, float]] = field(default_factory=list)
    target_hits: int = 0  # real users' lists (after the attack began) holding a target
    target_lists: int = 0


def _tallies(method: str, prior_weights: Sequence[float] | None) -> list[_Tally]:
    hybrid = split_method(method)[1]
    if not hybrid or not prior_weights:
        return [_Tally(method, None)]
    if len(prior_weights) == 1:
        return [_Tally(method, float(prior_weights[0]))]
    return [_Tally(f"{method}@{w:g}", float(w)) for w in prior_weights]


def run_prequential(examples: Sequence[TrainingExample], method: str,
                    **options: Any) -> MethodRun:
    """Replay ``examples`` test-then-train through one method; return what it measured
    (``run_prequential_all``'s options; with several prior weights, the first one's run)."""
    return run_prequential_all(examples, method, **options)[0]


def run_prequential_all(examples: Sequence[TrainingExample], method: str, *, seed: int = 0,
                        variant: str = "A", batch_size: int = 256, model_cfg: Any = None,
                        train_cfg: TrainConfig | None = None,
                        adv_cfg: AdversarialConfig | None = None,
                        prior_cfg: PriorConfig | None = None,
                        prior_weights: Sequence[float] | None = None,
                        report_from: int = 0, n_windows: int = 10,
                        record_d: bool = False, progress: Callable[[int], None] | None = None,
                        attack: AttackLabels | None = None,
                        defence: DetectorConfig | None = None,
                        catalogue: EvalCatalogue | None = None,
                        content: ContentConfig | None = None) -> list[MethodRun]:
    """Replay ``examples`` test-then-train through one method; one ``MethodRun`` per way of
    ranking (one, or one per prior weight of a hybrid given several ``prior_weights``).

    ``report_from``: the first example of the reported part of the stream (the part after a
    validation prefix); its metrics are added with the prefix ``test:``. For a hybrid method
    (``mode+cooc``) given several ``prior_weights``, one training run is ranked at every
    weight.

    ``attack``: the labels of a shilling attack (advrec/attacks.py) whose fake users are in
    ``examples`` (or, for the clean reference, are not): fake users are trained on but never
    scored, and ``target_hr@10`` counts the real users' lists, from the attack's start on,
    that hold one of its targets.

    ``defence``: a neural method runs with the fake-user detector (trainer/detector.py)
    beside it, as the service does: after each batch's clicks are counted, the batch's users
    are scored and the examples of users at or above the threshold are not trained on.
    With ``attack``, the detector's precision, recall and F1 are measured against the
    labels, every user with enough clicks re-scored on their final state by the final
    detector.

    ``catalogue``: items known before the stream starts. A method that knows an item before
    its first click (``content``: a neural method given the catalogue's vectors; the tfidf
    baseline) can rank it; for the others a never-clicked target stays a miss. Every run
    reports the cold-start curves (``cold_metrics``).
    """
    assert variant in ("A", "B"), f"variant must be A or B, not {variant!r}"
    t0 = time.perf_counter()
    train_cfg = train_cfg or TrainConfig()
    prior_cfg = prior_cfg or PriorConfig()
    tallies = _tallies(method, prior_weights)
    if tallies[0].weight is not None:
        prior_cfg = dataclasses.replace(prior_cfg, weight=tallies[0].weight)
    adapter = make_method(method, seed, model_cfg, train_cfg, adv_cfg or AdversarialConfig(),
                          prior_cfg, catalogue, content)
    by_parts = len(tallies) > 1  # several weights: score G and the prior apart, once
    past = PastItems()
    colmap = np.full(1024, -1, dtype=np.int64)  # global item id -> method column
    pending: set[int] = set()
    counts = np.zeros(1024, dtype=np.int64)  # clicks per global id so far (targets)
    target_pct: list[float] = []
    positions: list[np.ndarray] = []  # index in ``examples`` of each scored example
    snaps: list[dict[str, Any]] = []
    n_batches = math.ceil(len(examples) / batch_size)
    snap_at = {max(0, round(f * n_batches) - 1) for f in D_SNAPSHOTS}
    d_rng = np.random.default_rng(10_000 + seed)
    n_unknown = n_masked = 0
    trending = Trending()
    first_ranks: list[int] = []  # the trending list's rank of each user's first click...
    first_at: list[int] = []  # ...and its index in ``examples``
    user_events: list[np.ndarray] = []  # per scored example: the user's past events...
    target_clicks: list[np.ndarray] = []  # ...and the target's past clicks
    guard = (TrainingFilter(adapter.learner, defence)
             if defence is not None and isinstance(adapter, LearnerAdapter) else None)
    for bi in range(n_batches):
        batch = examples[bi * batch_size : (bi + 1) * batch_size]
        n_catalogue = len(past.ids)  # items seen before this batch
        gids = np.empty(len(batch), dtype=np.int64)
        n_before = np.empty(len(batch), dtype=np.int64)
        for j, ex in enumerate(batch):
            g = past.item_gid(ex.item)
            gids[j] = g
            n_before[j] = past.push(ex.user, g)
        if len(past.ids) > colmap.size:
            grow = max(len(past.ids), 2 * colmap.size)
            colmap = np.concatenate([colmap, np.full(grow - colmap.size, -1, np.int64)])
            counts = np.concatenate([counts, np.zeros(grow - counts.size, np.int64)])
        if catalogue is not None:  # items the method knows before their first click
            for g in gids[gids >= n_catalogue].tolist():
                if colmap[g] < 0:
                    colmap[g] = adapter.column(past.ids[g])
        # a user's first click is not scored by the method (the service shows the trending
        # list: counted apart), nor is any click of a fake user
        real = [attack is None or not attack.is_fake(ex.user) for ex in batch]
        scored = [j for j, ex in enumerate(batch) if ex.history and real[j]]
        for j, ex in enumerate(batch):
            if not ex.history and real[j]:
                first_ranks.append(trending.rank(int(gids[j]), ex.ts))
                first_at.append(bi * batch_size + j)
        user_events.append(n_before[scored])
        target_clicks.append(counts[gids[scored]])
        positions.append(bi * batch_size + np.array(scored, dtype=np.int64))
        batch_ranks = {t.name: np.zeros(len(scored), dtype=np.int64) for t in tallies}
        if scored and n_catalogue:
            histories = [batch[j].history for j in scored]
            if by_parts:
                # float32 as the hybrid's torch and ONNX graphs compute it
                logits, prior = adapter.learner.score_parts(histories)  # type: ignore[attr-defined]
            else:
                own = adapter.scores(histories)  # (R, C)
            target = colmap[gids[scored]]  # (R,)
            n_unknown += int(np.count_nonzero(target < 0))
            if variant == "A":
                exclude = [colmap[past.before(batch[j].user, int(n_before[j]))] for j in scored]
                n_masked += sum(int(target[r] >= 0 and np.any(exclude[r] == target[r]))
                                for r in range(len(scored)))
            else:
                exclude = [np.zeros(0, dtype=np.int64)] * len(scored)
            tiebreak = adapter.tiebreak()
            pct = _percentiles(counts[:n_catalogue])
            if attack is not None:
                attacked = np.array([batch[j].ts >= attack.start_ms for j in scored])
                target_cols = [int(colmap[past.gid[i]]) for i in attack.targets
                               if i in past.gid and colmap[past.gid[i]] >= 0]
            for t in tallies:
                if by_parts:
                    scores = (logits + np.float32(t.weight) * prior).astype(np.float64)
                    scores[:, 0] = -np.inf  # padding  # (R, C)
                else:
                    scores = own  # (R, C)
                # one ranking rule with the sidecar and the baselines (trainer.metrics)
                ranks = rank_targets(scores, target, exclude, variant=variant,
                                     tiebreak=tiebreak)
                batch_ranks[t.name] = ranks
                top = top_k(scores, TOP_K, tiebreak)  # (R, k) after masking
                col_to_gid = _inverse(colmap, scores.shape[1])
                rec = col_to_gid[top[top >= 0]]
                rec = rec[rec >= 0]
                t.recommended.update(rec.tolist())
                if attack is not None:  # the list as served: the user's past left out
                    served = scores.copy()
                    for r, ex in enumerate(exclude):
                        served[r, ex[ex >= 0]] = -np.inf
                    listed = top_k(served, TOP_K, tiebreak)  # (R, k)
                    shown = np.isin(listed, target_cols).any(axis=1) & attacked  # (R,)
                    t.target_hits += int(shown.sum())
                    t.target_lists += int(attacked.sum())
                # a catalogue item listed before its first click: percentile 0
                rec_pct = np.where(rec < pct.size, pct[np.minimum(rec, pct.size - 1)], 0.0)
                t.pop_pct.append(float(rec_pct.mean()) if rec.size else 0.5)
            tg = gids[scored]
            tg = tg[tg < n_catalogue]
            target_pct.append(float(pct[tg].mean()) if tg.size else 0.5)
        elif scored:
            n_unknown += len(scored)
        if record_d and bi in snap_at and isinstance(adapter, LearnerAdapter):
            real, fake = discriminator_scores(adapter.learner, batch, d_rng)
            snaps.append({"batch": bi, "fraction": (bi + 1) / n_batches,
                          "real": real.tolist(), "fake": fake.tolist()})
        stats = adapter.train(batch if guard is None else guard.admit(batch, bi))
        if isinstance(adapter, LearnerAdapter):  # a bounded vocabulary freed these rows:
            for _, item in adapter.learner.expired:  # the items have no column until back
                g = past.gid.get(item)
                if g is not None:
                    colmap[g] = -1
            if guard is not None and adapter.learner.expired:  # as the sidecar's detector
                guard.detector.stats.forget(np.array([r for r, _ in adapter.learner.expired]))
        for g in gids.tolist():
            if colmap[g] < 0:
                pending.add(g)
        for g in list(pending):
            c = adapter.column(past.ids[g])
            if c >= 0:
                colmap[g] = c
                pending.discard(g)
        np.add.at(counts, gids, 1)
        for g, ex in zip(gids.tolist(), batch, strict=True):
            trending.add(g, ex.ts)
        for t in tallies:
            ranks = batch_ranks[t.name]
            t.ranks.append(ranks)
            row = {"batch": float(bi),
                   "events": float(min((bi + 1) * batch_size, len(examples))),
                   "n_scored": float(len(scored))}
            row.update({f"batch_{k}": v for k, v in ranking_metrics(ranks, (10,)).items()})
            if attack is not None:
                row["target_hits"], row["target_lists"] = t.target_hits, t.target_lists
            for key in ("loss_ml", "loss_g", "loss_d", "d_acc", "d_acc_real", "d_acc_fake",
                        "g_reward", "apr_loss", "vocab_size", "live_items", "expired_items"):
                if key in stats:
                    row[key] = float(stats[key])
            t.curves.append(row)
        if progress is not None:
            progress(len(batch))
    where = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    u_events = np.concatenate(user_events) if user_events else np.zeros(0, np.int64)
    t_clicks = np.concatenate(target_clicks) if target_clicks else np.zeros(0, np.int64)
    firsts = np.array(first_ranks, dtype=np.int64)
    firsts_at = np.array(first_at, dtype=np.int64)
    settings = method_settings(adapter)
    guarded = guard.metrics(attack) if guard is not None else {}  # one detector, every tally
    suspicion = guard.suspicion(attack) if guard is not None else []
    runs = []
    for t in tallies:
        ranks_all = np.concatenate(t.ranks) if t.ranks else np.zeros(0, np.int64)
        metrics = ranking_metrics(ranks_all, KS)
        if report_from > 0:
            test = ranks_all[where >= report_from]
            metrics.update({f"test:{k}": v for k, v in ranking_metrics(test, KS).items()})
            metrics["test:n_scored"] = float(test.size)
        metrics.update({
            "n_events": float(len(examples)), "n_scored": float(ranks_all.size),
            "n_unknown_target": float(n_unknown), "n_target_in_past": float(n_masked),
            f"coverage@{TOP_K}": len(t.recommended) / max(1, len(past.ids)),
            f"pop_pct@{TOP_K}": float(np.mean(t.pop_pct)) if t.pop_pct else 0.5,
            "target_pop_pct": float(np.mean(target_pct)) if target_pct else 0.5,
        })
        if attack is not None:
            metrics["target_hr@10"] = t.target_hits / max(1, t.target_lists)
            metrics["target_lists"] = float(t.target_lists)
        metrics.update(guarded)
        metrics.update(cold_metrics(ranks_all, u_events, t_clicks, firsts))
        if report_from > 0:
            part = where >= report_from
            metrics.update({f"test:{k}": v for k, v in cold_metrics(
                ranks_all[part], u_events[part], t_clicks[part],
                firsts[firsts_at >= report_from]).items()})
        mine = settings
        if t.weight is not None and "prior" in settings:
            mine = {**settings, "prior": {**settings["prior"], "weight": t.weight}}
        runs.append(MethodRun(t.name, seed, ranks_all, metrics, t.curves,
                              window_metrics(ranks_all, n_windows), snaps, settings=mine,
                              suspicion=suspicion))
    embeddings = counts_v = None
    if isinstance(adapter, LearnerAdapter):
        gen = adapter.learner.generator
        with torch.no_grad():
            embeddings = gen.item_table()[1:].float().cpu().numpy()  # (V, D)
        counts_v = adapter.learner.item_counts[1 : gen.n_items + 1].copy()
    seconds = time.perf_counter() - t0
    for run in runs:
        run.embeddings, run.embedding_counts = embeddings, counts_v
        run.seconds = seconds
        run.metrics["seconds"] = seconds
    return runs


def _inverse(colmap: np.ndarray, n_cols: int) -> np.ndarray:
    """Return column -> global id (-1 where no item) for ``n_cols`` columns."""
    inv = np.full(n_cols, -1, dtype=np.int64)
    known = np.flatnonzero((colmap >= 0) & (colmap < n_cols))
    inv[colmap[known]] = known
    return inv


def _percentiles(counts: np.ndarray) -> np.ndarray:
    """Return each item's popularity percentile (mid-rank; 1 = most clicked)."""
    if counts.size == 0:
        return np.zeros(0)
    order = np.sort(counts)
    below = np.searchsorted(order, counts, side="left")
    equal = np.searchsorted(order, counts, side="right") - below
    return (below + 0.5 * equal) / counts.size


# ---------------------------------------------------------------------------- summary


def summarize(runs: Sequence[MethodRun]) -> dict[str, dict[str, dict[str, float]]]:
    """Return per method the mean and (sample) std over seeds of every metric."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        keys = mine[0].metrics.keys()
        vals = {k: np.array([r.metrics[k] for r in mine]) for k in keys}
        out[method] = {
            "mean": {k: float(v.mean()) for k, v in vals.items()},
            "std": {k: float(v.std(ddof=1)) if v.size > 1 else 0.0 for k, v in vals.items()},
            "n_seeds": {"n": float(len(mine))},
        }
    return out


def format_table(summary: dict[str, dict[str, dict[str, float]]],
                 columns: Sequence[str] = ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20",
                                           "coverage@10", "pop_pct@10")) -> str:
    """Return a plain-text table: one row per method, mean ± std per column."""
    width = max([10, *(len(m) + 1 for m in summary)])
    head = f"{'method':<{width}}" + "".join(f"{c:>18}" for c in columns) + f"{'s/seed':>9}"
    lines = [head, "-" * len(head)]
    for method, s in summary.items():
        cells = "".join(f"{s['mean'][c]:>10.4f} ±{s['std'][c]:.4f}" for c in columns)
        lines.append(f"{method:<{width}}{cells}{s['mean'].get('seconds', 0.0):>9.0f}")
    return "\n".join(lines)


def format_cold_table(summary: dict[str, dict[str, dict[str, float]]],
                      prefix: str = "") -> str:
    """Return the cold-start curves as a table: HR@10 (mean over seeds) per bucket of the
    user's past events and of the target's past clicks, with each bucket's size
    (``prefix`` "test:": over the reported part only)."""
    cols = [("user", b) for b in USER_BUCKETS] + [("item", b) for b in ITEM_BUCKETS]
    width = max([10, *(len(m) + 1 for m in summary)])
    head = f"{'method':<{width}}" + "".join(f"{kind + ' ' + bucket_name(b):>12}"
                                            for kind, b in cols)
    first = next(iter(summary.values()))["mean"] if summary else {}
    sizes = f"{'(events)':<{width}}" + "".join(
        f"{first.get(f'{prefix}cold_{kind}_n:{bucket_name(b)}', 0):>12.0f}"
        for kind, b in cols)
    lines = [head, sizes, "-" * len(head)]
    for method, s in summary.items():
        lines.append(f"{method:<{width}}" + "".join(
            f"{s['mean'][f'{prefix}cold_{kind}_hr@10:{bucket_name(b)}']:>12.4f}"
            for kind, b in cols))
    return "\n".join(lines)


def write_outputs(out: Path, runs: Sequence[MethodRun], summary: dict[str, Any],
                  header: dict[str, Any]) -> None:
    """Write results.json, summary.csv, windows.csv and curves.csv into ``out`` (and, with
    the defence, suspicion.csv: each scored user's highest P(fake))."""
    out.mkdir(parents=True, exist_ok=True)
    doc = dict(header)
    doc["summary"] = summary
    doc["runs"] = [{"method": r.method, "seed": r.seed, "settings": r.settings,
                    "metrics": r.metrics, "windows": r.windows} for r in runs]
    (out / "results.json").write_text(json.dumps(doc, indent=1, sort_keys=False))
    metric_keys = list(next(iter(summary.values()))["mean"]) if summary else []
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "n_seeds", *[f"{k}_{s}" for k in metric_keys
                                           for s in ("mean", "std")]])
        for method, s in summary.items():
            w.writerow([method, int(s["n_seeds"]["n"]),
                        *[f"{s[x][k]:.6g}" for k in metric_keys for x in ("mean", "std")]])
    _write_rows(out / "windows.csv", [{"method": r.method, "seed": r.seed, **row}
                                      for r in runs for row in r.windows])
    _write_rows(out / "curves.csv", [{"method": r.method, "seed": r.seed, **row}
                                     for r in runs for row in r.curves])
    seen: set[int] = set()  # the tallies of one replay share their detector and its list
    rows = []
    for r in runs:
        if r.suspicion and id(r.suspicion) not in seen:
            seen.add(id(r.suspicion))
            rows.extend({"method": r.method, "seed": r.seed, "user": u, "fake": int(f),
                         "p_fake": f"{p:.6g}"} for u, f, p in r.suspicion)
    if rows:
        _write_rows(out / "suspicion.csv", rows)


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="advrec evaluate",
        description="Prequential (test-then-train) or offline leave-one-out evaluation of the "
                    "baselines and the generator in every adversarial mode, without Kafka.")
    p.add_argument("--dataset", nargs=2, metavar=("SOURCE", "PATH"), required=True,
                   help=f"SOURCE is one of {', '.join(SOURCES)}")
    p.add_argument("--protocol", choices=("prequential", "loo"), default="prequential")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated: pop, knn, tfidf and enc-knn (content only: need "
                        "--catalogue; enc-knn also --content) and adversarial modes "
                        f"({', '.join(MODES)}); a mode followed by {PRIOR_SUFFIX} (apr+cooc) "
                        "ranks with G plus the item co-occurrence prior (the hybrid)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per neural method (mean ± std)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds run are first-seed .. first-seed + seeds - 1")
    p.add_argument("--jobs", type=int, default=1,
                   help="replays run at once, each in a process of its own with --threads "
                        "torch threads (prequential; seeds, methods, defence and streams "
                        "are independent replays)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="replay only the first N events")
    p.add_argument("--until", type=_fraction, default=1.0,
                   help="replay only this first share of the stream (0.3: the validation "
                        "prefix, where settings are chosen)")
    p.add_argument("--report-from", type=_fraction, default=0.0,
                   help="also report test:* metrics over the events after this share of the "
                        "stream (0.3: everything after the validation prefix)")
    p.add_argument("--variant", choices=("A", "B"), default="A",
                   help="A: the user's past items leave the list; B: they stay")
    p.add_argument("--out", type=Path, default=Path("var/evaluate"))
    p.add_argument("--plots", action="store_true", help="write PNG plots into --out")
    p.add_argument("--windows", type=int, default=10, help="reporting windows over the stream")
    p.add_argument("--columns", default=None, help="csv source: user=col,item=col[,ts=col]")
    p.add_argument("--order", choices=("file", "interleave"), default=None,
                   help="sequences source: event order")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    # defaults come from the dataclasses the sidecar uses, so they are set in one place
    mc, tc = ModelConfig(), TrainConfig()
    m = p.add_argument_group("model and training (TrainConfig / ModelConfig defaults)")
    m.add_argument("--dim", type=int, default=mc.d_model)
    m.add_argument("--layers", type=int, default=mc.n_layers)
    m.add_argument("--heads", type=int, default=mc.n_heads)
    m.add_argument("--max-len", type=int, default=mc.max_len)
    m.add_argument("--dropout", type=float, default=mc.dropout)
    m.add_argument("--lr", type=float, default=tc.lr)
    m.add_argument("--steps-per-batch", type=int, default=tc.steps_per_batch,
                   help="G updates per arriving batch, each with a fresh replay sample")
    m.add_argument("--replay-ratio", type=float, default=None,
                   help=f"replayed per new example (default {tc.replay_ratio} prequential, "
                        "0 for loo)")
    m.add_argument("--warmup-batches", type=int, default=tc.warmup_batches,
                   help="the first N batches get --warmup-steps-per-batch updates")
    m.add_argument("--warmup-steps-per-batch", type=int, default=tc.warmup_steps_per_batch)
    m.add_argument("--replay-size", type=int, default=tc.replay_size,
                   help="examples the replay buffer keeps")
    m.add_argument("--replay-policy", choices=("reservoir", "fifo"), default=tc.replay_policy,
                   help="reservoir: uniform over the whole past; fifo: the most recent")
    m.add_argument("--item-ttl-days", type=float, default=tc.item_ttl_s / 86400,
                   help="a bounded vocabulary: items with no click for this many days of "
                        "event time leave the model and their rows are reused (0: never; "
                        "the trainer's ADVREC_TRAINER_ITEM_TTL_S)")
    m.add_argument("--mask-history", action=argparse.BooleanOptionalAction, default=None,
                   help="leave the history's items (but the target) out of the training "
                        "softmax; default: as the variant's list does (on for A, off for B), "
                        "as the trainer does for ADVREC_EXCLUDE")
    m.add_argument("--item-bias", action=argparse.BooleanOptionalAction, default=mc.item_bias,
                   help="add a learned per-item offset to G's scores")
    m.add_argument("--tied-output", action=argparse.BooleanOptionalAction,
                   default=mc.tied_output,
                   help="score candidates with the input item table (--no-tied-output: own table)")
    m.add_argument("--item-lr-mult", type=float, default=tc.item_lr_mult,
                   help="learning-rate multiplier of G's item tables")
    ac = AdversarialConfig()
    m.add_argument("--apr-eps", type=float, default=ac.apr_eps,
                   help="APR: L2 radius of the input perturbation per example")
    m.add_argument("--apr-lambda", type=float, default=ac.apr_lambda,
                   help="APR: weight of the adversarial loss")
    m.add_argument("--loss", choices=LOSSES, default=ac.loss,
                   help="training loss: the full softmax, the sampled softmax (popularity "
                        "negatives with the log Q correction), or auto: sampled above "
                        "--sampled-above items (ranking for the metrics is always full)")
    m.add_argument("--sampled-above", type=int, default=ac.sampled_above,
                   help="auto: items from which the sampled softmax trains")
    m.add_argument("--negatives", type=int, default=ac.n_negatives,
                   help="sampled softmax: negatives a batch shares")
    pc = PriorConfig()
    m.add_argument("--prior-weights", type=_weights, default=[pc.weight],
                   help="mode+cooc methods: weight(s) w of the co-occurrence prior in "
                        "G + w * log(1 + prior); several (comma-separated) rank one training "
                        f"run at each (default {pc.weight:g}, the shipped one)")
    m.add_argument("--prior-top-k", type=int, default=pc.top_k,
                   help="links per item in the prior's table")
    m.add_argument("--prior-recent", type=int, default=pc.n_recent,
                   help="latest history items that link to the next click in the prior")
    m.add_argument("--prior-decay", type=float, default=pc.decay,
                   help="the prior's weight factor per step back in the history")
    m.add_argument("--prior-backward", type=float, default=pc.backward,
                   help="the prior's weight of the reverse link (next item -> history item)")
    m.add_argument("--threads", type=int, default=1, help="torch threads")
    cc = ContentConfig()
    c = p.add_argument_group("catalogue and content (cold start)")
    c.add_argument("--catalogue", type=Path, default=None,
                   help="item catalogue known from the start of the stream: a MovieLens "
                        "movies.csv, or a CSV with --catalogue-columns; lets the tfidf "
                        "baseline and the content runs rank items before their first click")
    c.add_argument("--catalogue-columns", default=None,
                   help="CSV catalogue: id=COL,title=COL[,text=COL][,categories=COL] "
                        "(categories |-separated)")
    c.add_argument("--content", choices=("off", "on", "both"), default="off",
                   help="neural methods with the catalogue's text embeddings (on: "
                        "METHOD/content), without (off), or both side by side")
    c.add_argument("--content-blend", type=float, default=cc.blend_clicks,
                   help="0: an item's content score stops at its first click; k > 0: it "
                        "weighs k/(n+k) beside G's score after n clicks")
    c.add_argument("--content-dim", type=int, default=cc.dim,
                   help="main axes of the text embeddings kept (PCA) for the content score")
    c.add_argument("--content-cache", type=Path, default=Path("var/content-cache"),
                   help="where the catalogue's text embeddings are kept between runs")
    add_attack_arguments(p, labels=False)
    dc = DetectorConfig()
    g = p.add_argument_group("defence (the fake-user detector and training filter)")
    g.add_argument("--defence", choices=("off", "on", "both"), default="off",
                   help="run the neural methods with the detector and filter (on), without "
                        "(off), or both side by side (METHOD/filter)")
    g.add_argument("--detector-threshold", type=float, default=dc.threshold,
                   help="flag a user at this P(fake) or above")
    g.add_argument("--detector-min-clicks", type=int, default=dc.min_clicks,
                   help="users with fewer clicks are not scored")
    g.add_argument("--detector-confirm-rounds", type=int, default=dc.confirm_rounds,
                   help="flag a user when this many detector rounds in a row score the user "
                        "at or above the threshold (the user's examples wait meanwhile)")
    g.add_argument("--attacked-only", action="store_true",
                   help="with --attack: replay the attacked stream only (its clean-stream "
                        "rows do not depend on the attack kind: one run per dataset and seed "
                        "gives them to every other)")
    o = p.add_argument_group("loo protocol")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--patience", type=int, default=3, help="stop after N epochs without gain")
    return p


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share of the stream in [0, 1]")
    return value


def _weights(text: str) -> list[float]:
    try:
        values = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(not math.isfinite(w) or w < 0 for w in values):
        raise argparse.ArgumentTypeError(f"{text!r}: weights must be finite and >= 0")
    return values


def _configs(args: argparse.Namespace, replay_default: float
             ) -> tuple[ModelConfig, TrainConfig, AdversarialConfig]:
    model_cfg = ModelConfig(max_len=args.max_len, d_model=args.dim, n_layers=args.layers,
                            n_heads=args.heads, dropout=args.dropout,
                            item_bias=args.item_bias, tied_output=args.tied_output)
    replay = replay_default if args.replay_ratio is None else args.replay_ratio
    train_cfg = TrainConfig(lr=args.lr, item_lr_mult=args.item_lr_mult,
                            steps_per_batch=args.steps_per_batch,
                            warmup_batches=args.warmup_batches,
                            warmup_steps_per_batch=args.warmup_steps_per_batch,
                            replay_size=args.replay_size, replay_ratio=replay,
                            replay_policy=args.replay_policy, num_threads=args.threads,
                            item_ttl_s=args.item_ttl_days * 86400)
    mask = (getattr(args, "variant", "A") == "A") if args.mask_history is None \
        else args.mask_history  # trained for the list's rule, as the trainer is
    adv_cfg = AdversarialConfig(mask_history=mask, apr_eps=args.apr_eps,
                                apr_lambda=args.apr_lambda, loss=args.loss,
                                sampled_above=args.sampled_above, n_negatives=args.negatives)
    return model_cfg, train_cfg, adv_cfg


def _catalogue(args: argparse.Namespace, events: Sequence[Any]) -> EvalCatalogue | None:
    """Read ``--catalogue`` (and, for content runs, encode it); None without one."""
    if args.catalogue is None:
        return None
    if args.catalogue_columns is None:
        items = read_movielens_movies(args.catalogue)
    else:
        cols = dict(part.split("=", 1) for part in args.catalogue_columns.split(",") if part)
        if not {"id", "title"} <= cols.keys():
            raise ValueError("--catalogue-columns needs id=COL and title=COL")
        items = read_catalogue_csv(args.catalogue, id_col=cols["id"], title_col=cols["title"],
                                   text_col=cols.get("text"),
                                   categories_col=cols.get("categories"))
    clicked = {e.item for e in events}
    known = sum(1 for i in items if i.item in clicked)
    print(f"catalogue: {len(items)} items, {known} of them clicked in the stream, "
          f"{len(clicked) - known} clicked items not in it", file=sys.stderr)
    texts = tuple(i.content_text() for i in items)
    vectors = None
    if args.content != "off":
        t0 = time.perf_counter()
        vectors = encode_cached(texts, args.content_cache, progress=not args.no_progress)
        print(f"catalogue text embeddings: {vectors.shape} in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
    return EvalCatalogue(tuple(i.item for i in items), texts, vectors)


def _load(args: argparse.Namespace) -> EventLog:
    source, path = args.dataset
    opts: dict[str, Any] = {}
    if args.columns is not None:
        opts["columns"] = args.columns
    if args.order is not None:
        opts["order"] = args.order
    return load_events(source, path, **opts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command = "advrec evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in BASELINES and split_method(m)[0] not in MODES]
    if unknown or not methods:
        print(ERROR.format(f"unknown method(s) {unknown}; choose from "
                           f"{', '.join(BASELINES + MODES)}, or a mode followed by "
                           f"{PRIOR_SUFFIX}"), file=sys.stderr)
        return 2
    if args.dataset[0] not in SOURCES:
        print(ERROR.format(f"unknown dataset source {args.dataset[0]!r}; choose from "
                           f"{', '.join(SOURCES)}"), file=sys.stderr)
        return 2
    if args.seeds < 1 or args.batch_size < 1 or args.first_seed < 0:
        print(ERROR.format("--seeds and --batch-size must be >= 1, --first-seed >= 0"),
              file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, args.threads))
    try:
        events = _load(args)
    except DatasetError as exc:
        print(ERROR.format(exc), file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(ERROR.format(f"{args.dataset[1]}: {exc}"), file=sys.stderr)
        return 1
    if args.catalogue is None and (args.content != "off" or "tfidf" in methods):
        print(ERROR.format("--content and the tfidf baseline need --catalogue"),
              file=sys.stderr)
        return 2
    if args.protocol == "loo":
        from trainer.offline import run_loo_cli

        return run_loo_cli(args, events, methods)
    return _run_prequential_cli(args, events, methods, argv)


def _replay(kwargs: dict[str, Any], threads: int) -> list[MethodRun]:
    """One replay in a process of its own (``--jobs``)."""
    torch.set_num_threads(threads)
    return run_prequential_all(**kwargs)


def _replay_all(replays: Sequence[tuple[str, str, dict[str, Any]]], jobs: int,
                bar: Any) -> list[list[MethodRun]]:
    """Run every replay, ``jobs`` at once (spawned processes: the parent may have used
    torch's thread pools, which a forked child must not inherit); results in order."""
    if jobs <= 1 or len(replays) <= 1:
        out = []
        for method, suffix, kwargs in replays:
            if bar is not None:
                bar.set_postfix_str(f"{method}{suffix} seed {kwargs['seed']}")
            out.append(run_prequential_all(**kwargs, progress=bar.update if bar else None))
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = torch.get_num_threads()
    results: list[list[MethodRun] | None] = [None] * len(replays)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(_replay, kwargs, threads): i
                   for i, (_, _, kwargs) in enumerate(replays)}
        for done in as_completed(pending):
            i = pending[done]
            results[i] = done.result()
            if bar is not None:  # whole replays: a child cannot move the parent's bar
                bar.update(len(replays[i][2]["examples"]))
    return [r for r in results if r is not None]


def _run_prequential_cli(args: argparse.Namespace, events: EventLog, methods: list[str],
                         argv: list[str] | None) -> int:
    evs = events.events[: args.limit] if args.limit else events.events
    if args.attacked_only and args.attack is None:
        print(ERROR.format("--attacked-only needs --attack"), file=sys.stderr)
        return 2
    if args.until < 1.0:  # the validation prefix only: where settings are chosen
        evs = evs[: round(args.until * len(evs))]
    report_from = round(args.report_from * len(evs))
    streams = [("", evs, report_from, None)]
    if args.attack is not None:  # the clean stream (reference exposure) and the attacked one
        try:
            cfg = attack_config(args)
            from trainer.attack_model import attack_sampler

            attacked, labels = inject(evs, cfg, attack_sampler(cfg, evs, not args.no_progress))
        except ValueError as exc:
            print(ERROR.format(exc), file=sys.stderr)
            return 2
        cut_ts = evs[report_from].ts if report_from < len(evs) else evs[-1].ts + 1
        streams = [("", evs, report_from, labels),
                   (f"|{cfg.kind}", attacked,
                    next((n for n, e in enumerate(attacked) if e.ts >= cut_ts), len(attacked)),
                    labels)][1 if args.attacked_only else 0:]
        print(f"attack {cfg.kind}: {len(labels.fake_users)} fake users ({labels.n_events} "
              f"events) pushing {', '.join(labels.targets)}", file=sys.stderr)
    try:
        catalogue = _catalogue(args, evs)
    except (DatasetError, ValueError, OSError) as exc:
        print(ERROR.format(exc), file=sys.stderr)
        return 1
    content_cfg = ContentConfig(blend_clicks=args.content_blend, dim=args.content_dim)
    contents: list[tuple[str, ContentConfig | None]] = {
        "off": [("", None)], "on": [("/content", content_cfg)],
        "both": [("", None), ("/content", content_cfg)]}[args.content]
    model_cfg, train_cfg, adv_cfg = _configs(args, TrainConfig.replay_ratio)
    prior_cfg = PriorConfig(top_k=args.prior_top_k, n_recent=args.prior_recent,
                            decay=args.prior_decay, backward=args.prior_backward)
    weights = args.prior_weights
    neural_seeds = range(args.first_seed, args.first_seed + args.seeds)
    jobs = [(m, s) for m in methods for s in (range(1) if m in BASELINES else neural_seeds)]
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        # with --defence or --content both, a neural method runs twice (or 4 times) and a
        # baseline once
        runs_per_stream = sum((2 if args.defence == "both" else 1)
                              * (2 if args.content == "both" else 1)
                              if m not in BASELINES else 1 for m, _ in jobs)
        bar = tqdm(total=runs_per_stream * sum(len(st[1]) for st in streams), unit="ev",
                   desc="evaluate", file=sys.stderr, dynamic_ncols=True)
    runs: list[MethodRun] = []
    detector_cfg = DetectorConfig(threshold=args.detector_threshold,
                                  min_clicks=args.detector_min_clicks,
                                  confirm_rounds=args.detector_confirm_rounds)
    guards: list[tuple[str, DetectorConfig | None]] = {
        "off": [("", None)], "on": [("/filter", detector_cfg)],
        "both": [("", None), ("/filter", detector_cfg)]}[args.defence]
    replays: list[tuple[str, str, dict[str, Any]]] = []  # method, its name's suffix, kwargs
    for suffix, stream, start, labels in streams:
        examples = list(build_examples(stream, args.max_len))
        for method, seed, (content_name, content), (guard_name, guard) in (
                (m, sd, c, g) for m, sd in jobs for c in contents for g in guards):
            if method in BASELINES and (guard is not None or content is not None):
                if (args.defence == "both" and guard is not None) or (
                        args.content == "both" and content is not None):
                    continue  # no G: it ran without the filter and content already
                guard_name, guard, content_name, content = "", None, "", None
            replays.append((method, f"{content_name}{guard_name}{suffix}", dict(
                examples=examples, method=method, seed=seed, variant=args.variant,
                batch_size=args.batch_size, model_cfg=model_cfg, train_cfg=train_cfg,
                adv_cfg=adv_cfg, prior_cfg=prior_cfg, prior_weights=weights,
                report_from=start, n_windows=args.windows,
                record_d=args.plots and seed == 0 and "irgan" in method and not suffix,
                attack=labels, defence=guard, catalogue=catalogue, content=content)))
    for (method, suffix, _), found in zip(replays, _replay_all(replays, args.jobs, bar),
                                          strict=True):
        guard_name = suffix.split("|")[0]
        for run in found:
            run.method = run.method.replace(method, f"{method}{guard_name}", 1) + \
                suffix[len(guard_name):]
        runs.extend(found)
    if bar is not None:
        bar.close()
    summary = summarize(runs)
    header = {
        "protocol": "prequential", "variant": args.variant,
        "variant_meaning": ("A: the user's past items are removed from the list (a re-clicked "
                            "target is a miss)" if args.variant == "A"
                            else "B: nothing is removed from the list"),
        "command": args.command,
        "dataset": {"source": args.dataset[0], "path": str(args.dataset[1]),
                    "events": len(evs), "events_in_file": len(events),
                    "users": len({e.user for e in evs}), "items": len({e.item for e in evs})},
        "batch_size": args.batch_size, "seeds": args.seeds, "first_seed": args.first_seed,
        "until": args.until, "report_from": args.report_from,
        "report_from_example": report_from,
        "test_meaning": ("test:* metrics cover the scored events from report_from_example on "
                         "(the part after the validation prefix)" if report_from else None),
        "baselines_note": "pop and knn are deterministic: run once, std 0",
        # the configuration the neural runs start from; each run's own settings (its mode,
        # its seed) are under runs[i].settings
        "base_model_config": dataclasses.asdict(model_cfg),
        "base_train_config": dataclasses.asdict(train_cfg),
        "base_adversarial_config": dataclasses.asdict(adv_cfg),
    }
    if catalogue is not None:
        header["catalogue"] = {
            "path": str(args.catalogue), "items": len(catalogue.items),
            "content": dataclasses.asdict(content_cfg) if args.content != "off" else None,
            "encoder": TextEncoder().meta if args.content != "off" else None,
            "meaning": ("METHOD/content: a neural method given the catalogue's text "
                        "embeddings from the start; cold_item_hr@10:0 is HR@10 over targets "
                        "with no click before")}
    if args.defence != "off":
        header["defence"] = {**dataclasses.asdict(detector_cfg), "features": list(FEATURES),
                             "round_every_batches": TrainingFilter.ROUND_EVERY}
    if args.attack is not None:
        labels = streams[-1][3]
        header["attack"] = {
            **dataclasses.asdict(labels.config), "targets": labels.targets,
            "fake_users": len(labels.fake_users), "fake_events": labels.n_events,
            "meaning": ("METHOD runs on the clean stream, METHOD|KIND on the attacked one; "
                        "fake users are trained on, never scored; target_hr@10 = share of "
                        "real users' lists (from the attack's start) holding a target")}
    write_outputs(args.out, runs, summary, header)
    if args.plots:
        from trainer import plots

        plots.prequential_plots(args.out, runs, detector_cfg.threshold)
    print(f"prequential, variant {args.variant}, {len(evs)} events, batch {args.batch_size}, "
          f"{args.seeds} seed(s); results in {args.out}")
    print(format_table(summary))
    if args.attack is not None:
        print(f"\nattack {args.attack}: target items in real users' top-10 lists")
        print(format_table(summary, columns=("target_hr@10", "hr@10", "ndcg@10")))
    if args.defence != "off":
        print("\ndefence: the detector and the training filter")
        cols = ("filtered_share", "flagged_users") + (
            ("det_precision", "det_recall", "det_f1") if args.attack is not None else ())
        print(format_table({m: v for m, v in summary.items() if "/filter" in m}, columns=cols))
    print("\ncold start: HR@10 by the user's past events (0: the trending list) and by the "
          "target's past clicks")
    print(format_cold_table(summary))
    if report_from:
        print(f"\nreported part: events {report_from}..{len(evs)} (after the validation prefix)")
        print(format_table(summary, columns=("test:hr@10", "test:ndcg@10", "test:mrr@10",
                                             "test:hr@20", "test:ndcg@20")))
        print(format_cold_table(summary, prefix="test:"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
