"""Property tests of the event decoder: any input is either a valid event or InvalidEvent."""

from __future__ import annotations

import time
from collections import Counter

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advrec.contract import (
    DECODE_REASONS,
    REASONS,
    ClickEvent,
    InvalidEvent,
    decode_event,
    encode_event,
)
from tests.payloads import KINDS, HostilePayloads

NOW = int(time.time() * 1000)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=200),
    st.binary(max_size=200))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=20)
event_like = st.fixed_dictionaries(
    {}, optional={"user": values | st.text(max_size=200), "item": values | st.text(),
                  "ts": values | st.integers(min_value=NOW - 10**12, max_value=NOW + 10**11),
                  "type": values | st.sampled_from(["click", "view", "cart", "purchase"]),
                  "session": values, "id": values})


def check(payload: bytes, key: bytes | None = None) -> None:
    try:
        event = decode_event(payload, key)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
        return
    assert isinstance(event, ClickEvent)
    assert decode_event(encode_event(event)) == event  # what passes re-encodes losslessly


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=5000))
def test_random_bytes_never_escape_as_another_exception(payload: bytes) -> None:
    check(payload)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_like, st.one_of(st.none(), st.binary(max_size=20)))
def test_event_shaped_maps_are_valid_or_rejected_with_a_reason(obj: dict,
                                                                key: bytes | None) -> None:
    check(msgpack.packb(obj, use_bin_type=True), key)


def test_deep_nesting_is_rejected_not_crashing() -> None:
    nested: object = "x"
    for _ in range(400):  # msgpack itself refuses to pack deeper than 511
        nested = [nested]
    payload = msgpack.packb({"user": "u", "item": "i", "ts": NOW, "extra": nested})
    check(payload)
    check(b"\x91" * 4000)  # 4000 nested one-element arrays, never terminated


def test_a_hundred_thousand_hostile_messages_are_each_valid_or_rejected_with_a_reason() -> None:
    verdicts: Counter = Counter()
    kinds_seen: Counter = Counter()
    for kind, key, value in HostilePayloads(seed=1, now_ms=NOW).take(100_000):
        kinds_seen[kind] += 1
        try:
            event = decode_event(value, key, now_ms=NOW)
        except InvalidEvent as exc:
            assert exc.reason in REASONS, (kind, exc.reason)
            verdicts[exc.reason] += 1
            continue
        assert kind in ("valid", "deep_nesting"), (kind, value[:80])  # nothing broken passes
        assert decode_event(encode_event(event)) == event
        verdicts["valid"] += 1
    assert sum(verdicts.values()) == 100_000
    assert set(kinds_seen) == set(KINDS)
    assert verdicts["valid"] >= kinds_seen["valid"]  # every valid message was accepted
    # every reason the decoder has was triggered (wrong_partition is the worker's: it looks
    # at the partition a message came on, which a payload cannot choose)
    assert set(verdicts) == {"valid", *DECODE_REASONS}, verdicts


def test_decode_message_agrees_with_decode_event_on_everything_but_envelopes() -> None:
    """The worker reads every message with decode_message: on anything that is not an
    envelope it must say what decode_event says, reason for reason."""
    from advrec.contract import decode_message

    for _kind, key, value in HostilePayloads(seed=2, now_ms=NOW).take(20_000):
        try:
            expected: object = decode_event(value, key, now_ms=NOW)
        except InvalidEvent as exc:
            expected = exc.reason
        got = decode_message(value, key, now_ms=NOW)
        if len(got) == 1 and isinstance(got[0], InvalidEvent):
            assert got[0].reason == expected, (value[:60], got[0], expected)
        else:
            assert got == [expected], (value[:60], got, expected)
