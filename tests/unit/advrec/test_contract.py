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
