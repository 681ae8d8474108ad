"""The click-event contract: every failure kind has its reason; valid events round-trip."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest

from advrec.contract import (
    MAX_EVENT_BYTES,
    REASONS,
    ClickEvent,
    InvalidEvent,
    TrainingExample,
    decode_batch,
    decode_event,
    encode_batch,
    encode_event,
    encode_key,
)
from advrec.synthetic import malformed_payloads

NOW = int(time.time() * 1000)


def pack(**fields: object) -> bytes:
    return msgpack.packb(fields)


def test_decode_event_round_trips_every_field() -> None:
    event = ClickEvent(user="u1", item="i9", ts=NOW, type="cart", session="s", id="e1")
    assert decode_event(encode_event(event), encode_key("u1")) == event


def test_decode_event_ignores_unknown_keys_and_defaults_type_to_click() -> None:
    event = decode_event(pack(user="u", item="i", ts=NOW, extra={"x": 1}))
    assert event.type == "click" and event.session is None and event.id is None


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\xc1", "not_msgpack"),
    (b"", "not_msgpack"),
    (msgpack.packb([1, 2]), "not_a_map"),
    (b"\x00" * (MAX_EVENT_BYTES + 1), "oversize"),
    (pack(item="i", ts=NOW), "missing_field"),
    (pack(user="u", ts=NOW), "missing_field"),
    (pack(user="u", item="i"), "missing_field"),
    (pack(user="u", item="i", ts="123"), "wrong_type"),
    (pack(user="u", item="i", ts=1.5e12), "wrong_type"),
    (pack(user="u", item="i", ts=True), "wrong_type"),
    (pack(user=5, item="i", ts=NOW), "wrong_type"),
    (pack(user="", item="i", ts=NOW), "bad_id"),
    (pack(user="u", item="x" * 129, ts=NOW), "bad_id"),
    (pack(user="u", item="i", ts=NOW, session=""), "bad_id"),
    (pack(user="u", item="i", ts=-5), "bad_timestamp"),
    (pack(user="u", item="i", ts=NOW + 3 * 24 * 3600 * 1000), "bad_timestamp"),
    (pack(user="u", item="i", ts=float("nan")), "bad_timestamp"),
    (pack(user="u", item="i", ts=NOW, type="like"), "bad_event_type"),
    (pack(user="u", item="i", ts=NOW, type=3), "wrong_type"),
])
def test_decode_event_names_the_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_event(payload)
    assert info.value.reason == reason
    assert reason in REASONS


def test_decode_event_rejects_a_key_that_is_not_the_user() -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_event(pack(user="u1", item="i", ts=NOW), b'"u1"')  # JSON-encoded key
    assert info.value.reason == "key_mismatch"


def test_encode_key_is_raw_utf8_not_json() -> None:
    assert encode_key("ü1") == "ü1".encode()


def test_malformed_payloads_all_fail_with_their_stated_reason() -> None:
    for raw, reason in malformed_payloads(np.random.default_rng(0), 80):
        with pytest.raises(InvalidEvent) as info:
            decode_event(raw)
        assert info.value.reason == reason


def test_fingerprint_prefers_event_id_over_item_and_time() -> None:
    a = ClickEvent("u", "i", NOW, id="x")
    b = ClickEvent("u", "j", NOW + 1, id="x")
    assert a.fingerprint() == b.fingerprint()
    assert ClickEvent("u", "i", NOW).fingerprint() != ClickEvent("u", "i", NOW + 1).fingerprint()


def test_training_batch_round_trips() -> None:
    batch = [TrainingExample("u", ("a", "b"), "c", NOW, ("suspect",)),
             TrainingExample("v", (), "a", NOW + 1)]
    assert decode_batch(encode_batch(batch)) == batch


def test_decode_batch_refuses_a_foreign_format() -> None:
    with pytest.raises(ValueError, match="advrec v1"):
        decode_batch(msgpack.packb({"v": 2}))


def test_an_envelope_carries_many_events_of_one_user_and_each_is_checked_alone() -> None:
    from advrec.contract import decode_message, encode_envelope

    now = 1_700_000_000_000
    events = [ClickEvent("u7", f"i{n}", now + n, id=f"e{n}") for n in range(3)]
    payload = encode_envelope(events)
    assert decode_message(payload, encode_key("u7"), now_ms=now) == events
    # a bad event inside spoils only itself: it comes back with its place and its own bytes
    import msgpack

    obj = msgpack.unpackb(payload, raw=False)
    obj["events"].insert(1, {"item": "i9"})  # no ts
    out = decode_message(msgpack.packb(obj), encode_key("u7"), now_ms=now)
    assert [type(x).__name__ for x in out] == ["ClickEvent", "InvalidEvent", "ClickEvent",
                                               "ClickEvent"]
    bad = out[1]
    assert bad.reason == "missing_field" and bad.index == 1
    assert msgpack.unpackb(bad.original, raw=False) == {"item": "i9", "user": "u7"}
    # an envelope keyed for another user, or of another user's event, is refused
    assert decode_message(payload, encode_key("u8"), now_ms=now)[0].reason == "key_mismatch"
    obj["events"][1] = {"user": "u8", "item": "x", "ts": now}
    assert decode_message(msgpack.packb(obj), encode_key("u7"),
                          now_ms=now)[1].reason == "key_mismatch"


def test_a_single_event_reads_the_same_through_decode_message() -> None:
    from advrec.contract import decode_message

    now = 1_700_000_000_000
    e = ClickEvent("u1", "i1", now, type="view")
    assert decode_message(encode_event(e), encode_key("u1"), now_ms=now) == [e]
    (bad,) = decode_message(b"\xc1", None, now_ms=now)
    assert bad.reason == "not_msgpack" and bad.index is None
    (big,) = decode_message(encode_event(ClickEvent("u1", "x" * 100, now, session="s" * 100))
                            + b"", None, now_ms=now)
    assert isinstance(big, ClickEvent)


def test_envelope_limits() -> None:
    import msgpack

    from advrec.contract import MAX_ENVELOPE_EVENTS, decode_message

    now = 1_700_000_000_000
    too_many = msgpack.packb({"user": "u", "events": [{"item": "i", "ts": now}]
                              * (MAX_ENVELOPE_EVENTS + 1)})
    assert decode_message(too_many, None, now_ms=now)[0].reason == "wrong_type"
    assert decode_message(msgpack.packb({"user": "u", "events": []}), None,
                          now_ms=now)[0].reason == "wrong_type"
    huge = msgpack.packb({"user": "u", "events": [{"item": "i" * 100, "ts": now}] * 900,
                          "pad": "p" * 600_000})
    assert decode_message(huge, None, now_ms=now)[0].reason == "oversize"


def test_replay_groups_each_users_events_into_envelopes_in_order() -> None:
    from advrec.contract import decode_message
    from advrec.replay import as_envelopes

    now = 1_700_000_000_000
    events = [ClickEvent(f"u{n % 3}", f"i{n}", now + n) for n in range(20)]
    out = list(as_envelopes(events, size=4, window=10))
    assert sum(n for _, n in out) == 20
    assert all(n <= 4 for _, n in out)
    got: dict[str, list[ClickEvent]] = {}
    for (key, value), n in out:
        decoded = decode_message(value, key, now_ms=now)
        assert len(decoded) == n
        got.setdefault(key.decode(), []).extend(decoded)
    for user, evs in got.items():  # every event once, each user's in their order
        assert evs == [e for e in events if e.user == user]
