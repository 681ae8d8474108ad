"""The synthetic stream: seeding, time order, planted structure, malformed payloads."""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import numpy as np
import pytest

from advrec.contract import REASONS, InvalidEvent, decode_event, encode_event
from advrec.synthetic import (
    MALFORMED_KINDS,
    SyntheticConfig,
    SyntheticStream,
    malformed_payloads,
    synthetic_events,
)

SMALL = SyntheticConfig(n_users=200, n_items=400, n_clusters=8, seed=3)


def test_synthetic_events_same_seed_same_stream() -> None:
    cfg = SyntheticConfig(n_users=50, n_items=100, n_clusters=5, seed=7, start_ms=10**12)
    assert list(synthetic_events(cfg, 2000)) == list(synthetic_events(cfg, 2000))


def test_synthetic_events_other_seed_other_stream() -> None:
    a = SyntheticConfig(n_users=50, n_items=100, n_clusters=5, seed=7, start_ms=10**12)
    b = SyntheticConfig(n_users=50, n_items=100, n_clusters=5, seed=8, start_ms=10**12)
    assert [e.item for e in synthetic_events(a, 500)] != [e.item for e in synthetic_events(b, 500)]


def test_synthetic_events_limit_is_exact_and_ids_unique() -> None:
    events = list(synthetic_events(SMALL, 3000))
    assert len(events) == 3000
    assert len({e.id for e in events}) == 3000


def test_synthetic_events_time_ordered_at_configured_rate() -> None:
    cfg = SyntheticConfig(n_users=20, n_items=50, n_clusters=5, events_per_s=10.0,
                          start_ms=1_500_000_000_000)
    ts = [e.ts for e in synthetic_events(cfg, 101)]
    assert ts == sorted(ts)
    assert ts[0] == 1_500_000_000_000
    assert ts[-1] == 1_500_000_000_000 + 10_000  # 100 steps at 10 events/s


def test_synthetic_events_default_start_ends_now_and_validates() -> None:
    before = int(time.time() * 1000)
    events = list(synthetic_events(SyntheticConfig(events_per_s=100.0), 5000))
    after = int(time.time() * 1000)
    assert events[-1].ts <= after
    assert events[0].ts < before - 40_000  # 5000 events at 100/s span ~50 s of event time
    for event in events[::50]:
        assert decode_event(encode_event(event)) == event


def test_synthetic_events_catalogue_grows() -> None:
    cfg = SyntheticConfig(n_users=100, n_items=400, n_clusters=8, initial_items=0.25,
                          new_item_rate=0.05, seed=1)
    world = SyntheticStream(cfg)
    events = list(world.events(4000))
    order = [world.item_id(i) for i in world.appear_order.tolist()]
    initial, last_released = set(order[:100]), set(order[350:])  # the last need ~7000 events
    assert world.n_initial == 100
    assert len({e.item for e in events[:200]} - initial) <= 30  # ~10 released by then
    assert len({e.item for e in events[2000:]} - initial) > 50  # new items do get clicked
    assert not {e.item for e in events} & last_released


def test_synthetic_events_sessions_follow_item_chain() -> None:
    def chain_share(chain_prob: float) -> float:
        cfg = SyntheticConfig(n_users=100, n_items=300, n_clusters=6, chain_prob=chain_prob,
                              initial_items=1.0, seed=2)  # every successor visible
        world = SyntheticStream(cfg)
        last: dict[str, int] = {}
        follows = pairs = 0
        for event in world.events(6000):
            item = int(event.item[1:])
            prev = last.get(event.session or "")
            if prev is not None:
                pairs += 1
                follows += int(world.next_item[prev]) == item
            last[event.session or ""] = item
        return follows / pairs

    assert 0.55 < chain_share(0.6) < 0.7
    assert chain_share(0.0) < 0.1


def _modal_cluster_share(cfg: SyntheticConfig, n: int) -> float:
    world = SyntheticStream(cfg)
    per_user: dict[str, Counter[int]] = defaultdict(Counter)
    for event in world.events(n):
        per_user[event.user][int(world.cluster_of[int(event.item[1:])])] += 1
    top = sum(c.most_common(1)[0][1] for c in per_user.values())
    return top / n


def test_synthetic_events_users_prefer_one_cluster() -> None:
    cfg = SyntheticConfig(n_users=50, n_items=300, n_clusters=10, drift=0.0, seed=4)
    assert _modal_cluster_share(cfg, 5000) > 0.8  # 10 clusters: 0.1 by chance


def test_synthetic_events_drift_spreads_tastes() -> None:
    stable = SyntheticConfig(n_users=50, n_items=300, n_clusters=10, drift=0.0, seed=4)
    drifting = SyntheticConfig(n_users=50, n_items=300, n_clusters=10, drift=0.05, seed=4)
    assert _modal_cluster_share(drifting, 5000) < _modal_cluster_share(stable, 5000) - 0.2


def test_synthetic_events_popularity_is_skewed_within_cluster() -> None:
    cfg = SyntheticConfig(n_users=100, n_items=200, n_clusters=2, chain_prob=0.0,
                          initial_items=1.0, zipf_a=1.2, seed=5)
    world = SyntheticStream(cfg)
    counts = Counter(int(e.item[1:]) for e in world.events(20000))
    for items in world.members:
        by_weight = sorted(items.tolist(), key=lambda i: -world.weight[i])
        head = sum(counts[i] for i in by_weight[:5])
        tail = sum(counts[i] for i in by_weight[-50:])
        assert head > 2 * tail  # 5 Zipf-top items outweigh the 50 bottom ones


def test_synthetic_config_rejects_probability_above_one() -> None:
    with pytest.raises(AssertionError, match="drift"):
        SyntheticConfig(drift=1.5)


def test_malformed_payloads_cover_every_kind() -> None:
    kinds = {reason for _, reason in malformed_payloads(np.random.default_rng(0), 16)}
    assert kinds == set(MALFORMED_KINDS)
    assert {"not_msgpack", "missing_field", "wrong_type", "oversize", "bad_timestamp"} <= kinds
    assert kinds <= set(REASONS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_malformed_payloads_raise_their_reason(seed: int) -> None:
    for payload, reason in malformed_payloads(np.random.default_rng(seed), 80):
        with pytest.raises(InvalidEvent) as caught:
            decode_event(payload)
        assert caught.value.reason == reason, (payload[:60], caught.value)


def test_synthetic_events_a_million_items_keep_the_planted_structure() -> None:
    cfg = SyntheticConfig(n_users=2000, n_items=1_000_000, drift=0.0, seed=6)
    started = time.perf_counter()
    world = SyntheticStream(cfg)
    events = list(world.events(5000))
    assert time.perf_counter() - started < 20  # ~0.2 s to plant, ~0.1 s per 5k events
    assert len(world.cluster_of) == 1_000_000 and len(world.members) == cfg.n_clusters
    assert world.n_initial == 500_000
    assert all(0 <= int(e.item[1:]) < cfg.n_items for e in events)
    assert _modal_cluster_share(cfg, 5000) > 0.8  # one taste per user, as at 2,000 items
    counts = Counter(int(e.item[1:]) for e in world.events(20000))
    assert max(counts.values()) > 20  # Zipf heads: 20k clicks over 500k visible items
