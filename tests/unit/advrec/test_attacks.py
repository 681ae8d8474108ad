"""Shilling attacks: budget, fillers per kind, targets, window, labels, merge order."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest

from advrec.attacks import AttackConfig, AttackLabels, inject, merge_by_time, plan_attack
from advrec.contract import ClickEvent
from advrec.synthetic import SyntheticConfig, synthetic_events


@pytest.fixture(scope="module")
def stream() -> list[ClickEvent]:
    return list(synthetic_events(SyntheticConfig(n_users=200, n_items=300, seed=3), 6000))


def _fake_items(fake: list[ClickEvent], labels: AttackLabels) -> list[str]:
    targets = set(labels.targets)
    return [e.item for e in fake if e.item not in targets]


@pytest.mark.parametrize("kind", ["random", "average", "bandwagon", "segment"])
def test_each_kind_makes_the_budgeted_fake_users_with_the_requested_fillers(
        stream: list[ClickEvent], kind: str) -> None:
    cfg = AttackConfig(kind=kind, budget=0.05, filler=12, target_clicks=3, seed=1)
    fake, labels = plan_attack(stream, cfg)
    n_real = len({e.user for e in stream})
    assert len(labels.fake_users) == round(0.05 * n_real)
    per_user = Counter(e.user for e in fake)
    assert set(per_user) == set(labels.fake_users)
    assert all(n == 12 + 3 for n in per_user.values())
    assert labels.n_events == len(fake)
    target_hits = Counter(e.user for e in fake if e.item in labels.targets)
    assert all(target_hits[u] == 3 for u in labels.fake_users)
    assert not set(labels.fake_users) & {e.user for e in stream}


def test_bandwagon_fillers_are_mostly_the_most_clicked_items(stream: list[ClickEvent]) -> None:
    cfg = AttackConfig(kind="bandwagon", budget=0.05, filler=20, bandwagon_top=30, seed=2)
    fake, labels = plan_attack(stream, cfg)
    cut = next(n for n, e in enumerate(stream) if e.ts >= labels.start_ms)
    top = {i for i, _ in Counter(e.item for e in stream[:cut]).most_common(30)}
    fillers = _fake_items(fake, labels)
    share = sum(i in top for i in fillers) / len(fillers)
    assert share >= 0.7  # three quarters by construction, the rest random (may hit the top)


def test_average_fillers_follow_popularity_and_random_ones_do_not(
        stream: list[ClickEvent]) -> None:
    cut = len(stream) // 2
    counts = Counter(e.item for e in stream[:cut])
    median = float(np.median(list(counts.values())))

    def mean_pop(kind: str) -> float:
        fake, labels = plan_attack(stream, AttackConfig(kind=kind, budget=0.2, filler=20))
        return float(np.mean([counts[i] for i in _fake_items(fake, labels)]))

    assert mean_pop("average") > 2 * mean_pop("random")
    assert mean_pop("random") < 3 * median


def test_segment_fillers_come_from_the_targets_audience(stream: list[ClickEvent]) -> None:
    target = stream[10].item
    cfg = AttackConfig(kind="segment", budget=0.05, filler=10, targets=(target,))
    fake, labels = plan_attack(stream, cfg)
    cut = next(n for n, e in enumerate(stream) if e.ts >= labels.start_ms)
    audience = {e.user for e in stream[:cut] if e.item == target}
    seen_by_audience = {e.item for e in stream[:cut] if e.user in audience}
    assert labels.targets == [target]
    assert set(_fake_items(fake, labels)) <= seen_by_audience


def test_default_targets_are_unpopular_items_seen_before_the_attack(
        stream: list[ClickEvent]) -> None:
    _, labels = plan_attack(stream, AttackConfig(kind="random", n_targets=3, seed=4))
    cut = next(n for n, e in enumerate(stream) if e.ts >= labels.start_ms)
    counts = Counter(e.item for e in stream[:cut])
    median = float(np.median(list(counts.values())))
    assert len(set(labels.targets)) == 3
    assert all(counts[t] <= median for t in labels.targets)


def test_fake_clicks_start_inside_the_attack_window(stream: list[ClickEvent]) -> None:
    fake, _ = plan_attack(stream, AttackConfig(kind="random", start=0.4, end=0.5))
    t0, t1 = stream[0].ts, stream[-1].ts
    firsts: dict[str, int] = {}
    for e in fake:
        firsts.setdefault(e.user, e.ts)
    assert all(t0 + 0.4 * (t1 - t0) - 1 <= ts <= t0 + 0.5 * (t1 - t0) for ts in firsts.values())
    assert [e.ts for e in fake] == sorted(e.ts for e in fake)


def test_inject_merges_in_time_order_and_keeps_every_real_event(
        stream: list[ClickEvent]) -> None:
    merged, labels = inject(stream, AttackConfig(kind="average", budget=0.05))
    assert len(merged) == len(stream) + labels.n_events
    assert [e.ts for e in merged] == sorted(e.ts for e in merged)
    assert [e for e in merged if not labels.is_fake(e.user)] == stream


def test_merge_puts_the_real_event_first_on_equal_timestamps() -> None:
    real = [ClickEvent("r", "a", 1000), ClickEvent("r", "b", 2000)]
    fake = [ClickEvent("f", "x", 1000)]
    assert [e.user for e in merge_by_time(real, fake)] == ["r", "f", "r"]


class _Chain:
    """A sampler that walks a fixed chain (what a trained generator would be asked)."""

    def __init__(self, items: Sequence[str]) -> None:
        self.next = dict(itertools.pairwise(items))
        self.calls = 0

    def sample(self, prefix: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
        self.calls += 1
        return [self.next.get(prefix[-1], prefix[0])] * n


def test_generated_attack_asks_the_sampler_and_weaves_in_the_targets(
        stream: list[ClickEvent]) -> None:
    items = list(dict.fromkeys(e.item for e in stream))
    sampler = _Chain(items)
    cfg = AttackConfig(kind="generated", budget=0.02, filler=8, target_clicks=2)
    fake, labels = plan_attack(stream, cfg, sampler)
    per_user = Counter(e.user for e in fake)
    assert all(n == 10 for n in per_user.values())
    assert sampler.calls >= len(labels.fake_users) * 7  # every filler but the first
    assert all(sum(e.item in labels.targets for e in fake if e.user == u) == 2
               for u in labels.fake_users)


def test_generated_attack_without_a_sampler_is_refused(stream: list[ClickEvent]) -> None:
    with pytest.raises(ValueError, match="sampler"):
        plan_attack(stream, AttackConfig(kind="generated"))


@pytest.mark.parametrize("bad", [dict(kind="sybil"), dict(budget=0), dict(budget=1.5),
                                 dict(start=0.6, end=0.5), dict(target_clicks=0)])
def test_bad_attack_settings_are_refused_with_a_reason(bad: dict) -> None:
    with pytest.raises(ValueError):
        AttackConfig(**bad)


def test_labels_round_trip_through_a_file(stream: list[ClickEvent], tmp_path) -> None:
    _, labels = plan_attack(stream, AttackConfig(kind="bandwagon", targets=("i1", "i2")))
    labels.write(tmp_path / "labels.json")
    back = AttackLabels.read(tmp_path / "labels.json")
    assert back.fake_users == labels.fake_users and back.targets == ["i1", "i2"]
    assert back.config == labels.config and back.is_fake(labels.fake_users[0])
