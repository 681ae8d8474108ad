"""Streaming baselines: popularity order, masking, pessimistic ranks, kNN beats popularity."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable, Sequence

import numpy as np
import pytest

from advrec.contract import ClickEvent, TrainingExample
from advrec.synthetic import SyntheticConfig, synthetic_events
from trainer.baselines import ItemKNN, RecencyPopularity, StreamingBaseline
from trainer.metrics import OUT_OF_LIST, RankingMetrics

T0 = 1_500_000_000_000


def ex(history: Sequence[str], item: str, ts: int = T0, user: str = "u") -> TrainingExample:
    return TrainingExample(user, tuple(history), item, ts)


def clicks(*items: str) -> list[TrainingExample]:
    """Return one cold-start example per item (no history), in order."""
    return [ex((), item, T0 + n) for n, item in enumerate(items)]


def examples(events: Iterable[ClickEvent], max_len: int = 50) -> list[TrainingExample]:
    """Turn clicks into examples: each user's previous items, then the clicked one."""
    history: dict[str, deque[str]] = defaultdict(lambda: deque(maxlen=max_len))
    out = []
    for event in events:
        out.append(TrainingExample(event.user, tuple(history[event.user]), event.item, event.ts))
        history[event.user].append(event.item)
    return out


def prequential_hr10(model: StreamingBaseline, stream: list[TrainingExample]) -> float:
    acc = RankingMetrics(ks=(10,))
    for start in range(0, len(stream), 256):
        batch = stream[start:start + 256]
        acc.update(model.target_ranks([e for e in batch if e.history]))
        model.train_batch(batch)
    return acc.get()["hr@10"]


def test_recency_popularity_ranks_the_most_frequent_first() -> None:
    model = RecencyPopularity(half_life_events=None)
    model.train_batch(clicks("c", "a", "b", "a", "b", "a"))
    assert model.recommend([], 3) == ["a", "b", "c"]
    assert model.target_ranks(clicks("a", "b", "c")).tolist() == [1, 2, 3]


def test_recency_popularity_recent_clicks_outweigh_older_ones() -> None:
    stream = clicks("a", "a", "a", "b", "b")
    decayed = RecencyPopularity(half_life_events=1.0)
    decayed.train_batch(stream)
    plain = RecencyPopularity(half_life_events=None)
    plain.train_batch(stream)
    assert decayed.recommend([], 1) == ["b"]  # a: 1 + 2 + 4 = 7 vs b: 8 + 16
    assert plain.recommend([], 1) == ["a"]


def test_recency_popularity_half_life_in_event_time() -> None:
    hour = 3_600_000
    model = RecencyPopularity(half_life_events=None, half_life_ms=hour)
    model.train_batch([ex((), "a", T0), ex((), "a", T0 + 1), ex((), "b", T0 + 2 * hour)])
    assert model.recommend([], 2) == ["b", "a"]  # two clicks two half-lives ago: 0.5 < 1


def test_recency_popularity_survives_a_long_stream_without_overflow() -> None:
    model = RecencyPopularity(half_life_events=10.0)
    for _ in range(50):
        model.train_batch(clicks(*(["x", "y"] * 50))[:100])
    assert np.isfinite(model.popularity()).all()
    assert model.recommend([], 2) == ["y", "x"]  # y is always the later click


def test_target_ranks_ties_go_against_the_target() -> None:
    model = RecencyPopularity(half_life_events=None)
    model.train_batch(clicks("a", "b", "c"))  # equal counts
    assert model.target_ranks(clicks("a", "b", "c")).tolist() == [3, 3, 3]


def test_target_ranks_unknown_target_is_zero_and_not_averaged() -> None:
    model = RecencyPopularity()
    model.train_batch(clicks("a"))
    assert model.target_ranks(clicks("new", "a")).tolist() == [0, 1]
    out = model.evaluate_batch(clicks("new", "a"))
    assert out["hr@10"] == 1.0
    assert (out["n_eval"], out["n_unknown_target"]) == (1.0, 1.0)


def test_target_ranks_masks_history_items_except_the_target() -> None:
    model = RecencyPopularity(half_life_events=None)
    model.train_batch(clicks("a", "a", "a", "b", "b", "c"))  # a > b > c
    ranks = model.target_ranks([ex(["a"], "c"), ex(["a", "c"], "c"), ex(["b"], "b")])
    assert ranks.tolist() == [2, 2, 2]  # a is masked; a target from the history stays


def test_target_ranks_variant_masks_all_or_none() -> None:
    batch = [ex(["a"], "c"), ex(["a", "c"], "c")]
    every = RecencyPopularity(half_life_events=None, history_mask="all")
    none = RecencyPopularity(half_life_events=None, history_mask="none")
    for model in (every, none):
        model.train_batch(clicks("a", "a", "a", "b", "b", "c"))
    # the re-click is out of the list: a miss at any k (3 items: rank 4 was a hit at 10)
    assert every.target_ranks(batch).tolist() == [2, OUT_OF_LIST]
    assert every.evaluate_batch(batch, ks=(10,))["hr@10"] == 0.5
    assert none.target_ranks(batch).tolist() == [3, 3]


def test_recommend_excludes_the_history() -> None:
    model = RecencyPopularity(half_life_events=None)
    model.train_batch(clicks("a", "a", "a", "b", "b", "c"))
    assert model.recommend(["a", "unknown"], 5) == ["b", "c"]
    assert model.recommend(["a"], 1, exclude_seen=False) == ["a"]


def test_item_knn_recommends_what_followed_the_last_item() -> None:
    model = ItemKNN(backward=0.0)
    model.train_batch(clicks("z", "z", "z"))  # z is the most popular
    model.train_batch([ex(["a"], "b"), ex(["c"], "d"), ex(["a"], "b", user="v")])
    assert model.recommend(["a"], 1) == ["b"]
    assert model.recommend(["c"], 1) == ["d"]
    assert model.recommend(["d"], 1) == ["z"]  # nothing followed d: popularity decides


def test_item_knn_weights_recent_history_items_more() -> None:
    model = ItemKNN(n_recent=2, decay=0.5, backward=0.0)
    model.train_batch([ex(["x"], "from_x"), ex(["y"], "from_y")])
    assert model.recommend(["x", "y"], 1) == ["from_y"]  # y is the latest
    assert model.recommend(["y", "x"], 1) == ["from_x"]


def test_item_knn_target_rank_uses_co_occurrence() -> None:
    model = ItemKNN(backward=0.0)
    model.train_batch([*clicks("p", "p", "p", "q", "q"), ex(["a"], "b")])
    batch = [ex(["a"], "b"), ex(["c"], "b"), ex(["q"], "b")]
    # a -> b links; unknown c scores nothing (p 3, q 2, b 1 click); q has no links, is masked
    assert model.target_ranks(batch).tolist() == [1, 3, 2]


@pytest.mark.parametrize("make", [RecencyPopularity, ItemKNN])
def test_evaluate_batch_does_not_learn(make: type[StreamingBaseline]) -> None:
    model = make()
    model.train_batch(clicks("a", "b", "a"))
    batch = [ex(["a"], "b"), ex(["b"], "c"), ex([], "a")]
    first = model.evaluate_batch(batch, ks=(1, 10))
    assert model.evaluate_batch(batch, ks=(1, 10)) == first
    assert {"hr@1", "ndcg@10", "mrr@10", "n_eval", "n_unknown_target"} <= set(first)
    assert model.n_items == 2


@pytest.mark.parametrize("make", [RecencyPopularity, ItemKNN])
def test_target_ranks_lie_within_the_known_items(make: type[StreamingBaseline]) -> None:
    stream = examples(synthetic_events(SyntheticConfig(n_users=50, n_items=100, n_clusters=5,
                                                       start_ms=T0), 2000))
    model = make()
    for start in range(0, len(stream), 100):
        batch = stream[start:start + 100]
        ranks = model.target_ranks(batch)
        known = np.array([e.item in model.index for e in batch])
        assert ((ranks >= 1) == known).all()
        assert (ranks <= model.n_items).all()
        model.train_batch(batch)


def test_item_knn_beats_popularity_on_a_synthetic_stream() -> None:
    cfg = SyntheticConfig(n_users=300, n_items=600, n_clusters=12, seed=11, start_ms=T0)
    stream = examples(synthetic_events(cfg, 20_000))
    knn = prequential_hr10(ItemKNN(), stream)
    popular = prequential_hr10(RecencyPopularity(), stream)
    assert knn > 2 * popular, (knn, popular)
    assert knn > 0.3
