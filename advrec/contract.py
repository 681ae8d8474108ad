"""The click-event contract and the training-batch format, in one place.

Producers write click events to the ``clicks`` topic as msgpack maps, keyed by the user id
encoded as raw UTF-8 bytes (``encode_key``). The stream app validates them with
``decode_event``; every failure carries one of the fixed ``REASONS``, which are also the
label values of the invalid-event metric and the ``reason`` field of dead letters.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import msgpack
from aiokafka.partitioner import murmur2

from advrec.types import ItemId, TimestampMs, UserId

__all__ = [
    "DECODE_REASONS",
    "EVENT_TYPES",
    "MAX_EVENT_BYTES",
    "MAX_ID_CHARS",
    "REASONS",
    "ClickEvent",
    "InvalidEvent",
    "TrainingExample",
    "decode_batch",
    "decode_dead_letter",
    "decode_event",
    "decode_message",
    "encode_batch",
    "encode_dead_letter",
    "encode_envelope",
    "encode_event",
    "encode_key",
    "partition_for",
]

MAX_EVENT_BYTES = 4096  # a click is ~100 bytes; anything this big is abuse or a bug
# an envelope (opt-in, for producers that batch): many events of one user in one message
MAX_ENVELOPE_EVENTS = 1000
MAX_ENVELOPE_BYTES = 512 * 1024  # within Kafka's default 1 MiB message limit
MAX_ID_CHARS = 128
MIN_TS_MS = 631_152_000_000  # 1990-01-01: older than any public interaction log we replay
FUTURE_SLACK_MS = 24 * 3600 * 1000  # producers' clocks may run ahead, but not by a day
EVENT_TYPES = ("click", "view", "cart", "purchase")

DECODE_REASONS = (  # what decode_event itself can find wrong
    "not_msgpack",  # bytes that do not decode as one msgpack object
    "not_a_map",  # valid msgpack, but not a map
    "oversize",  # payload larger than MAX_EVENT_BYTES
    "missing_field",  # user, item or ts absent
    "wrong_type",  # a field of the wrong type (e.g. ts as a string or float)
    "bad_id",  # user/item/session/id empty or longer than MAX_ID_CHARS
    "bad_timestamp",  # ts before 1990 or more than a day in the future
    "bad_event_type",  # type not one of EVENT_TYPES
    "key_mismatch",  # message key is not encode_key(user)
)
REASONS = (
    *DECODE_REASONS,
    # the partition is not the one partition_for(key) names: the producer used another
    # partitioner (librdkafka's default), so reads routed by the key would miss the state
    "wrong_partition",
)


class InvalidEvent(ValueError):
    """A click event breaks the contract; ``reason`` is one of ``REASONS``.

    For an event inside an envelope, ``index`` is its place there and ``original`` its map
    as msgpack (the dead letter's original bytes; the envelope may hold good events too).
    """

    def __init__(self, reason: str, detail: str, *, index: int | None = None,
                 original: bytes | None = None) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.index = index
        self.original = original


@dataclass(frozen=True, slots=True)
class ClickEvent:
    """One valid click (or view, cart, purchase) of a user on an item."""

    user: UserId
    item: ItemId
    ts: TimestampMs
    type: str = "click"
    session: str | None = None
    id: str | None = None

    def fingerprint(self) -> str:
        """Return the identity used to drop redelivered copies of this event."""
        return f"i:{self.id}" if self.id is not None else f"t:{self.item}\x1f{self.ts}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"user": self.user, "item": self.item, "ts": self.ts}
        if self.type != "click":
            out["type"] = self.type
        if self.session is not None:
            out["session"] = self.session
        if self.id is not None:
            out["id"] = self.id
        return out


def encode_key(user: UserId) -> bytes:
    """Return the Kafka message key for ``user``: its raw UTF-8 bytes (never JSON)."""
    return user.encode("utf-8")


@lru_cache(maxsize=65536)  # murmur2 is pure Python (~5 us a short key); users come back
def partition_for(key: bytes, partitions: int) -> int:
    """Return the partition of ``key`` under the Java client's default partitioner (murmur2,
    as aiokafka and librdkafka's ``murmur2_random``): where a user's events must land, and
    where the worker routes the user's reads."""
    assert partitions >= 1, partitions
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def encode_event(event: ClickEvent) -> bytes:
    """Serialize a click event for the ``clicks`` topic."""
    return msgpack.packb(event.to_dict(), use_bin_type=True)


def _check_id(name: str, value: Any, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise InvalidEvent("missing_field", f"field {name!r} is required")
        return None
    if not isinstance(value, str):
        raise InvalidEvent("wrong_type", f"{name} must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_ID_CHARS:
        raise InvalidEvent("bad_id", f"{name} must have 1..{MAX_ID_CHARS} chars, got {len(value)}")
    return value


def encode_envelope(events: list[ClickEvent] | tuple[ClickEvent, ...]) -> bytes:
    """Serialize several events of one user as one ``clicks`` message (an envelope).

    A map ``{"user": <id>, "events": [<event map without "user">, ...]}``, keyed like a single
    event (``encode_key(user)``). Opt-in, for producers that batch: Faust's cost is per
    message, so an envelope of 20 events costs it a twentieth per event.
    """
    assert 1 <= len(events) <= MAX_ENVELOPE_EVENTS, f"{len(events)} events in an envelope"
    user = events[0].user
    assert all(e.user == user for e in events), "an envelope holds the events of one user"
    inner = []
    for e in events:
        d = e.to_dict()
        del d["user"]
        inner.append(d)
    return msgpack.packb({"user": user, "events": inner}, use_bin_type=True)


def _unpack(payload: Any, limit: int) -> Any:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise InvalidEvent("not_msgpack", f"payload is {type(payload).__name__}, not bytes")
    if len(payload) > limit:
        raise InvalidEvent("oversize", f"{len(payload)} bytes > {limit}")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise InvalidEvent("not_msgpack", f"{type(exc).__name__}: {exc}"[:200]) from None


def _event(obj: Any, key: bytes | None, now_ms: int) -> ClickEvent:
    """Check one unpacked event map against the contract."""
    if not isinstance(obj, dict):
        raise InvalidEvent("not_a_map", f"top-level value is {type(obj).__name__}")
    user = _check_id("user", obj.get("user"), required=True)
    item = _check_id("item", obj.get("item"), required=True)
    ts = obj.get("ts")
    if ts is None:
        raise InvalidEvent("missing_field", "field 'ts' is required")
    if isinstance(ts, bool) or not isinstance(ts, int):
        if isinstance(ts, float) and not math.isfinite(ts):
            raise InvalidEvent("bad_timestamp", f"ts is {ts}")
        raise InvalidEvent("wrong_type", f"ts must be an integer (ms), got {type(ts).__name__}")
    if ts < MIN_TS_MS or ts > now_ms + FUTURE_SLACK_MS:
        raise InvalidEvent("bad_timestamp", f"ts={ts} outside [{MIN_TS_MS}, now+1d]")
    kind = obj.get("type", "click")
    if not isinstance(kind, str):
        raise InvalidEvent("wrong_type", f"type must be a string, got {type(kind).__name__}")
    if kind not in EVENT_TYPES:
        raise InvalidEvent("bad_event_type", f"type {kind[:40]!r} not in {EVENT_TYPES}")
    session = _check_id("session", obj.get("session"), required=False)
    event_id = _check_id("id", obj.get("id"), required=False)
    assert user is not None and item is not None
    if key is not None and key != encode_key(user):
        raise InvalidEvent("key_mismatch",
                           f"key {bytes(key[:40])!r} is not the user id {user[:40]!r}")
    return ClickEvent(user=user, item=item, ts=ts, type=kind, session=session, id=event_id)


def decode_event(payload: Any, key: bytes | None = None, *,
                 now_ms: int | None = None) -> ClickEvent:
    """Validate one single-event ``clicks`` message and return the event, or raise
    ``InvalidEvent``."""
    obj = _unpack(payload, MAX_EVENT_BYTES)
    return _event(obj, key, int(time.time() * 1000) if now_ms is None else now_ms)


def _is_envelope(obj: Any) -> bool:
    return isinstance(obj, dict) and "events" in obj and "item" not in obj


def decode_message(payload: Any, key: bytes | None = None, *,
                   now_ms: int | None = None) -> list[ClickEvent | InvalidEvent]:
    """Validate one ``clicks`` message, a single event or an envelope: one entry per event,
    in order, each the event or why it breaks the contract (a message that cannot be read
    at all is one ``InvalidEvent``)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    try:
        if isinstance(payload, bytes | bytearray | memoryview) and len(payload) > MAX_EVENT_BYTES:
            # bigger than one event may be: an envelope, or else oversize (as decode_event
            # says, whatever the bytes are)
            try:
                obj = _unpack(payload, MAX_ENVELOPE_BYTES)
            except InvalidEvent:
                obj = None
            if not _is_envelope(obj):
                raise InvalidEvent("oversize", f"{len(payload)} bytes > {MAX_EVENT_BYTES} "
                                               "and not an envelope")
        else:
            obj = _unpack(payload, MAX_EVENT_BYTES)
            if not _is_envelope(obj):
                return [_event(obj, key, now_ms)]
        user = _check_id("user", obj.get("user"), required=True)
        inner = obj["events"]
        if not isinstance(inner, list) or not 1 <= len(inner) <= MAX_ENVELOPE_EVENTS:
            raise InvalidEvent("wrong_type", f"an envelope's events must be a list of "
                                             f"1..{MAX_ENVELOPE_EVENTS} event maps")
    except InvalidEvent as exc:
        return [exc]
    out: list[ClickEvent | InvalidEvent] = []
    for i, e in enumerate(inner):
        try:
            if isinstance(e, dict) and "user" not in e:
                e = {**e, "user": user}
            elif isinstance(e, dict) and e["user"] != user:
                raise InvalidEvent("key_mismatch", f"event {i} of an envelope of {user[:40]!r} "
                                                   f"names another user")
            out.append(_event(e, key, now_ms))
        except InvalidEvent as exc:
            exc.index = i
            exc.original = msgpack.packb(e, use_bin_type=True)
            out.append(exc)
    return out


def encode_dead_letter(reason: str, detail: str, original: bytes | None,
                       key: bytes | None, topic: str, partition: int, offset: int,
                       index: int | None = None) -> bytes:
    """Serialize a dead letter: the reason and the original bytes, untouched (for an event
    of an envelope, ``index`` is its place there and the original is that event's map)."""
    letter = {"reason": reason, "detail": detail, "original": original, "key": key,
              "topic": topic, "partition": partition, "offset": offset,
              "dead_at_ms": int(time.time() * 1000)}
    if index is not None:
        letter["index"] = index
    return msgpack.packb(letter, use_bin_type=True)


def decode_dead_letter(payload: bytes) -> dict[str, Any]:
    """Parse a message of the dead-letter topic."""
    return msgpack.unpackb(payload, raw=False)


@dataclass(frozen=True, slots=True)
class TrainingExample:
    """A click turned into a supervised example: what the user saw before, what came next."""

    user: UserId
    history: tuple[ItemId, ...]  # oldest first, the clicked item not included
    item: ItemId
    ts: TimestampMs
    flags: tuple[str, ...] = field(default=())  # e.g. ("suspect",) from abuse detection


def encode_batch(examples: list[TrainingExample], *, source: str = "") -> bytes:
    """Serialize a mini-batch for the ``train-batches`` topic."""
    return msgpack.packb(
        {"v": 1, "source": source,
         "examples": [[e.user, list(e.history), e.item, e.ts, list(e.flags)] for e in examples]},
        use_bin_type=True,
    )


def decode_batch(payload: bytes) -> list[TrainingExample]:
    """Parse a ``train-batches`` message; raise ValueError on a foreign format."""
    obj = msgpack.unpackb(payload, raw=False)
    if not isinstance(obj, dict) or obj.get("v") != 1:
        raise ValueError("not an advrec v1 training batch")
    return [TrainingExample(u, tuple(h), i, t, tuple(f)) for u, h, i, t, f in obj["examples"]]
