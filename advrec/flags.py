"""Flagged users on Kafka: one record format for the trainer, which flags, and the admin,
who re-admits; and the book every reader keeps.

The ``user-flags`` topic is compacted and keyed by user, so its latest record per user is
the truth that every pod shares: the active trainer writes ``flagged`` when its detector
flags a user (with the score and the features that raised it), an admin writes
``readmitted`` through any worker (``POST /admin/flagged/{user}/readmit``). The trainer
reads the topic back: a re-admitted user trains again, and a trainer that takes over keeps
the flags of the one before. Workers read it to list flagged users (``GET /admin/flagged``).
A record is msgpack: ``{"v": 1, "state", "at_ms", "by", "p_fake", "reasons", "rounds",
"note"}``; ``reasons`` are ``[feature, term in the logit]`` pairs, strongest first, then
``["company", n]``: how many high scorers push one item with the user (the flag needs 3).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

__all__ = ["FLAGGED", "READMITTED", "FlagBook", "FlagError", "FlagRecord", "publish_flags"]

FLAGGED = "flagged"
READMITTED = "readmitted"
FORMAT_VERSION = 1


class FlagError(ValueError):
    """A record on the flags topic that is not a flag record."""


@dataclass(frozen=True)
class FlagRecord:
    """One user's flag state, as written at ``at_ms`` by ``by``."""

    user: str
    state: str  # FLAGGED or READMITTED
    at_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    by: str = ""  # the trainer's identity, or the admin caller
    p_fake: float | None = None  # the score that crossed the threshold (flags only)
    reasons: tuple[tuple[str, float], ...] = ()  # features that raised it, strongest first
    rounds: int = 0  # the detector's training rounds when it flagged (its version)
    note: str = ""  # the admin's reason for a re-admission

    def __post_init__(self) -> None:
        if self.state not in (FLAGGED, READMITTED):
            raise FlagError(f"state {self.state!r} is not {FLAGGED!r} or {READMITTED!r}")
        if not self.user:
            raise FlagError("a flag record needs a user")

    @property
    def key(self) -> bytes:
        return self.user.encode()

    @property
    def value(self) -> bytes:
        return msgpack.packb({"v": FORMAT_VERSION, "state": self.state, "at_ms": self.at_ms,
                              "by": self.by, "p_fake": self.p_fake,
                              "reasons": [list(r) for r in self.reasons],
                              "rounds": self.rounds, "note": self.note}, use_bin_type=True)

    @classmethod
    def decode(cls, key: bytes | None, value: bytes | None) -> FlagRecord:
        if not key:
            raise FlagError("a flag record without a key (the user)")
        try:
            obj = msgpack.unpackb(value or b"", raw=False)
        except Exception as exc:
            raise FlagError(f"undecodable flag record: {exc}") from None
        if not isinstance(obj, dict) or obj.get("v") != FORMAT_VERSION:
            raise FlagError("not a version 1 flag record")
        try:
            reasons = tuple((str(n), float(t)) for n, t in obj.get("reasons") or ())
            p_fake = obj.get("p_fake")
            return cls(user=key.decode(), state=str(obj["state"]), at_ms=int(obj["at_ms"]),
                       by=str(obj.get("by", "")),
                       p_fake=None if p_fake is None else float(p_fake), reasons=reasons,
                       rounds=int(obj.get("rounds", 0)), note=str(obj.get("note", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise FlagError(f"bad flag record: {exc}") from None

    def as_json(self) -> dict[str, Any]:
        return {"user": self.user, "state": self.state, "at_ms": self.at_ms, "by": self.by,
                "p_fake": self.p_fake, "rounds": self.rounds, "note": self.note,
                "reasons": [{"feature": n, "term": t} for n, t in self.reasons]}


class FlagBook:
    """The latest record per user, as read from the topic in order."""

    def __init__(self) -> None:
        self.records: dict[str, FlagRecord] = {}
        self.bad = 0  # records that could not be decoded (skipped, counted)
        self.n_flagged = 0  # users whose latest record is a flag

    def apply(self, record: FlagRecord) -> None:
        self._forget(record.user)
        self.records[record.user] = record
        self.n_flagged += record.state == FLAGGED

    def _forget(self, user: str) -> None:
        old = self.records.pop(user, None)
        if old is not None and old.state == FLAGGED:
            self.n_flagged -= 1

    def apply_raw(self, key: bytes | None, value: bytes | None) -> FlagRecord | None:
        """Apply one topic record; a tombstone forgets the user, a bad record is counted."""
        if value is None:
            if key:
                self._forget(key.decode(errors="replace"))
            return None
        try:
            record = FlagRecord.decode(key, value)
        except FlagError:
            self.bad += 1
            return None
        self.apply(record)
        return record

    def flagged(self) -> list[FlagRecord]:
        """The users flagged now, the highest score first."""
        out = [r for r in self.records.values() if r.state == FLAGGED]
        return sorted(out, key=lambda r: (-(r.p_fake or 0.0), r.user))

    def get(self, user: str) -> FlagRecord | None:
        return self.records.get(user)


async def publish_flags(producer: Any, topic: str, records: Iterable[FlagRecord]) -> int:
    """Send ``records`` (keyed by user) with a started ``AIOKafkaProducer``; wait for all."""
    futures = [await producer.send(topic, key=r.key, value=r.value) for r in records]
    for f in futures:
        await f
    return len(futures)
