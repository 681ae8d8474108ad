"""Per-user state and trending counts: pure functions the ingest agent applies per batch."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from advrec.contract import MAX_ID_CHARS, ClickEvent, TrainingExample
from advrec.exclusion import TYPE_CODES
from advrec.suspicion import Behaviour
from advrec.types import ItemId

__all__ = ["TrendingBuckets", "UserState", "fingerprint_hash", "merge_trending", "position",
           "state_size_bound", "update_trending"]


# One remembered event, packed in 12 bytes: a 48-bit hash of its identity (collision odds
# for one user's 32 identities about 1 in 10**13 per event) and its time in ms (48 bits
# reach the year 10889). As msgpack ints a pair took ~18 bytes.
_FP_BYTES = 6


def fingerprint_hash(fingerprint: str) -> int:
    """Return a stable 48-bit hash of an event fingerprint (6 bytes in state, not ~30)."""
    digest = hashlib.blake2b(fingerprint.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest[:_FP_BYTES], "big")


def _pack48(values: list[int]) -> bytes:
    return b"".join(v.to_bytes(_FP_BYTES, "big") for v in values)


def _unpack48(data: bytes) -> list[int]:
    return [int.from_bytes(data[i:i + _FP_BYTES], "big")
            for i in range(0, len(data), _FP_BYTES)]


@dataclass
class UserState:
    """What the service remembers of one user; stored as a msgpack array in ``user_state``.

    Redelivery is told two ways. A user's events all come on one partition of `clicks`, in
    offset order, so an event at or below ``last_position`` (its offset, and its place in an
    envelope: ``position``) was applied already (Kafka redelivered it after a crash or a
    rebalance). A producer's retry arrives with a new
    offset: the identities of the last ``dedup_window`` events catch it, and an event older
    than every identity that left that window counts as a retry too (``floor_ts``), as does
    one at exactly that time whose identity left the window at it (``floor_fps``: events
    often share a timestamp, e.g. ratings saved in bulk).
    """

    history: list[ItemId] = field(default_factory=list)  # last L items, oldest first
    last_ts: int = 0  # latest event time seen (ms)
    count: int = 0  # events applied
    types: dict[str, int] = field(default_factory=dict)  # events applied per type
    fingerprints: list[tuple[int, int]] = field(default_factory=list)  # (fp hash, ts), oldest first
    floor_ts: int = 0  # newest ts among fingerprints that fell out of the window
    last_position: int = -1  # position of the newest event applied (-1: none known)
    floor_fps: list[int] = field(default_factory=list)  # those that left at floor_ts
    # one event-type code (advrec.exclusion.TYPE_CODES) per history item, for the exclusion
    # rule by type (e.g. only purchased items leave the list); empty in older states
    history_types: bytes = b""
    # the fake-user detector's counters (advrec.suspicion): updated by every applied event
    behaviour: Behaviour = field(default_factory=Behaviour)
    # P(fake) the live bundle's detector gave the user at the latest scored batch, and that
    # detector's training rounds (its version); -1: never scored (too few clicks, or no
    # bundle with a detector). The trainer's own flags decide; this is what a worker shows
    suspicion: float = -1.0
    suspicion_rounds: int = 0
    # the hashes of ``fingerprints`` as a set, built on first use and kept in step by
    # apply (a state that lives in memory between events need not rebuild it per event)
    _seen: set[int] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_bytes(cls, data: bytes | None) -> UserState:
        """Decode a ``user_state`` value (msgpack: ~5x cheaper than JSON on this path).

        Reads both layouts: fingerprints packed as 16-byte records with the last offset
        (written since the compact state), and as a flat list of ints without it (before).
        """
        if not data:
            return cls()
        fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
        h, ts, n, c, fp, fl = fields[:6]
        if isinstance(fp, bytes):
            flat = _unpack48(fp)
            pairs = list(zip(flat[::2], flat[1::2], strict=True))
        else:  # 63-bit hashes as ints: their top 48 bits are today's hash
            pairs = [(f >> 15, t) for f, t in zip(fp[::2], fp[1::2], strict=True)]
        return cls(history=h, last_ts=ts, count=n, types=c, fingerprints=pairs, floor_ts=fl,
                   last_position=fields[6] if len(fields) > 6 else -1,
                   floor_fps=_unpack48(fields[7]) if len(fields) > 7 else [],
                   history_types=fields[8] if len(fields) > 8 else b"",
                   behaviour=Behaviour.from_list(fields[9] if len(fields) > 9 else None),
                   suspicion=fields[10] if len(fields) > 10 else -1.0,
                   suspicion_rounds=fields[11] if len(fields) > 11 else 0)

    @staticmethod
    def history_from_bytes(data: bytes | None) -> list[ItemId]:
        """Decode only the history of a ``user_state`` value (the serving path's need)."""
        if not data:
            return []
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(data)
        unpacker.read_array_header()
        return unpacker.unpack()

    def to_bytes(self) -> bytes:
        packed = _pack48([x for pair in self.fingerprints for x in pair])
        floor = _pack48(self.floor_fps)
        return msgpack.packb([self.history, self.last_ts, self.count, self.types, packed,
                              self.floor_ts, self.last_position, floor, self.history_types,
                              self.behaviour.to_list(), self.suspicion, self.suspicion_rounds],
                             use_bin_type=True)

    def public(self) -> dict[str, Any]:
        """Return the state as the HTTP API shows it."""
        suspicion = ({"p_fake": self.suspicion, "detector_rounds": self.suspicion_rounds}
                     if self.suspicion >= 0 else None)
        return {"history": self.history, "last_ts": self.last_ts, "count": self.count,
                "types": self.types, "suspicion": suspicion}

    def apply(self, event: ClickEvent, history_len: int, dedup_window: int,
              fingerprint_set: set[int] | None = None,
              position: int | None = None,
              example_len: int | None = None) -> TrainingExample | None:
        """Apply one event; return its training example, or None for a redelivered copy.

        ``position``: where the event sits on its partition of `clicks`, when it came from
        Kafka (``position(offset, index)``). A copy is recognised by that position (at or
        below the newest applied), by its fingerprint (event id, else item and ts) among the
        last ``dedup_window`` events of the user, or by being older than every fingerprint
        that already left that window. ``example_len``: how much of the history before the
        click the training example carries (default: all of it).
        """
        if position is not None and position <= self.last_position:
            return None
        if position is not None:
            self.last_position = position
        fp = fingerprint_hash(event.fingerprint())
        seen = fingerprint_set
        if seen is None:
            if self._seen is None:
                self._seen = {f for f, _ in self.fingerprints}
            seen = self._seen
        if fp in seen or (self.floor_ts and (event.ts < self.floor_ts or (
                event.ts == self.floor_ts and fp in self.floor_fps))):
            return None
        before = self.history if example_len is None else self.history[-example_len:]
        example = TrainingExample(user=event.user, history=tuple(before), item=event.item,
                                  ts=event.ts)
        self.history.append(event.item)
        codes = self.history_types[-(len(self.history) - 1):] if len(self.history) > 1 else b""
        self.history_types = codes + bytes((TYPE_CODES.get(event.type, 0),))
        if len(self.history) > history_len:
            del self.history[: len(self.history) - history_len]
            self.history_types = self.history_types[-history_len:]
        self.last_ts = max(self.last_ts, event.ts)
        self.behaviour.update(event.ts)
        self.count += 1
        self.types[event.type] = self.types.get(event.type, 0) + 1
        self.fingerprints.append((fp, event.ts))
        seen.add(fp)
        if len(self.fingerprints) > dedup_window:
            n_old = len(self.fingerprints) - dedup_window
            for old_fp, old_ts in self.fingerprints[:n_old]:
                seen.discard(old_fp)
                if old_ts > self.floor_ts:
                    self.floor_ts, self.floor_fps = old_ts, [old_fp]
                elif old_ts == self.floor_ts and len(self.floor_fps) < dedup_window:
                    self.floor_fps.append(old_fp)
            del self.fingerprints[:n_old]
        return example

    def memory_estimate(self) -> int:
        """Rough bytes this state takes decoded in memory (for the write-behind budget)."""
        # a str object is ~49 bytes plus its characters (ids are mostly under 16), a list
        # slot 8; the fingerprints' tuples, the set of their hashes, the dict of types and
        # the dataclass itself come to a few hundred bytes more, the detector's counters ~250
        return (650 + 72 * len(self.history)
                + 120 * (len(self.fingerprints) + len(self.floor_fps)) + 120 * len(self.types))


def position(offset: int, index: int = 0) -> int:
    """The order of an event on its partition: its message's offset, then its place in an
    envelope (at most 65,536 events per message; advrec.contract allows 1,000)."""
    return (offset << 16) | index


def state_size_bound(history_len: int, dedup_window: int) -> int:
    """Most bytes one user's ``user_state`` value can take, whatever the user sends.

    History: ``history_len`` ids of at most MAX_ID_CHARS characters (4 UTF-8 bytes each,
    plus a msgpack header) and one event-type byte each; fingerprints: ``dedup_window``
    packed 12-byte records and at most as many 6-byte ones at the floor; counters for the
    few event types, the timestamps and the offset: well under 210 bytes; the detector's
    seven counters and the score: under 100 more.
    """
    return history_len * (MAX_ID_CHARS * 4 + 4) + dedup_window * 18 + 310


def update_trending(buckets: dict[str, dict[str, int]], items: Iterable[tuple[ItemId, int]],
                    bucket_ms: int, n_buckets: int, top: int) -> dict[str, dict[str, int]]:
    """Add (item, ts) clicks to event-time buckets; keep the newest ``n_buckets``, top items."""
    out = {k: Counter(v) for k, v in buckets.items()}
    for item, ts in items:
        out.setdefault(str(ts // bucket_ms * bucket_ms), Counter())[item] += 1
    newest = sorted(out, key=int)[-n_buckets:]
    return {k: dict(out[k].most_common(top)) for k in newest}


class TrendingBuckets:
    """One partition's item counts per event-time bucket, kept in memory between writes
    (``update_trending``'s layout when written: the newest ``n_buckets``, ``top`` items each)."""

    def __init__(self, bucket_ms: int, n_buckets: int, top: int,
                 stored: dict[str, dict[str, int]] | None = None) -> None:
        self.bucket_ms, self.n_buckets, self.top = bucket_ms, n_buckets, top
        self.counts: dict[int, Counter[str]] = {int(k): Counter(v)
                                                for k, v in (stored or {}).items()}

    def add(self, item: ItemId, ts: int) -> None:
        start = ts // self.bucket_ms * self.bucket_ms
        bucket = self.counts.get(start)
        if bucket is None:
            bucket = self.counts[start] = Counter()
        bucket[item] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        """The value to write: drops buckets older than the newest ``n_buckets``."""
        for old in sorted(self.counts)[: -self.n_buckets]:
            del self.counts[old]
        return {str(k): dict(v.most_common(self.top)) for k, v in self.counts.items()}


def merge_trending(per_partition: Iterable[dict[str, dict[str, int]]], k: int,
                   n_buckets: int) -> list[ItemId]:
    """Return the ``k`` most clicked items over the newest ``n_buckets`` event-time buckets."""
    parts = list(per_partition)
    keys = sorted({b for p in parts for b in p}, key=int)[-n_buckets:]
    total: Counter[str] = Counter()
    for part in parts:
        for key in keys:
            total.update(part.get(key, {}))
    return [item for item, _ in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
