"""The detector's behaviour counters and features (one encoding for trainer and worker)."""

from __future__ import annotations

import math

import pytest

from advrec.suspicion import BEHAVIOUR_FEATURES, FEATURES, Behaviour, behaviour_features


def test_counters_count_clicks_gaps_and_short_gaps() -> None:
    b = Behaviour()
    for ts in (0, 2_000, 4_000, 3_600_000):
        b.update(ts)
    assert (b.first_ts, b.last_ts, b.clicks, b.gaps, b.short_gaps) == (0, 3_600_000, 4, 3, 2)
    assert b.log_gap_sum == pytest.approx(2 * math.log1p(2) + math.log1p(3596))


def test_an_out_of_order_click_counts_but_adds_no_gap() -> None:
    b = Behaviour()
    for ts in (10_000, 20_000, 5_000):
        b.update(ts)
    assert (b.first_ts, b.last_ts, b.clicks, b.gaps) == (5_000, 20_000, 3, 1)


def test_features_follow_the_named_order() -> None:
    b = Behaviour()
    for k in range(61):
        b.update(k * 60_000)  # one click a minute for an hour
    f = dict(zip(BEHAVIOUR_FEATURES, behaviour_features(b), strict=True))
    assert f["log_clicks"] == pytest.approx(math.log1p(61))
    assert f["log_age_h"] == pytest.approx(math.log1p(1.0))
    assert f["log_rate"] == pytest.approx(math.log(61))
    assert f["short_gaps"] == 0.0
    assert f["log_gap_mean"] == pytest.approx(math.log1p(60)) and f["log_gap_std"] < 1e-6
    assert FEATURES[: len(BEHAVIOUR_FEATURES)] == BEHAVIOUR_FEATURES


def test_a_new_user_has_finite_features() -> None:
    assert all(math.isfinite(x) for x in behaviour_features(Behaviour()))
    one = Behaviour()
    one.update(123)
    assert all(math.isfinite(x) for x in behaviour_features(one))


def test_counters_round_trip_as_a_list() -> None:
    b = Behaviour()
    for ts in (1, 5_000, 90_000):
        b.update(ts)
    assert Behaviour.from_list(b.to_list()) == b
    assert Behaviour.from_list(None) == Behaviour()
