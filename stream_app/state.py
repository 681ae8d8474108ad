"""Per-user state and trending counts: pure functions the ingest agent applies per batch."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from advrec.contract import ClickEvent, TrainingExample
from advrec.types import ItemId

__all__ = ["UserState", "merge_trending", "update_trending"]


@dataclass
class UserState:
    """What the service remembers of one user; stored as a JSON map in ``user_state``."""

    history: list[ItemId] = field(default_factory=list)  # last L items, oldest first
    last_ts: int = 0  # latest event time seen (ms)
    count: int = 0  # events applied
    types: dict[str, int] = field(default_factory=dict)  # events applied per type
    fingerprints: list[tuple[str, int]] = field(default_factory=list)  # (fp, ts), oldest first
    floor_ts: int = 0  # newest ts among fingerprints that fell out of the window

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> UserState:
        if not data:
            return cls()
        return cls(history=list(data.get("h", ())), last_ts=int(data.get("ts", 0)),
                   count=int(data.get("n", 0)), types=dict(data.get("c", {})),
                   fingerprints=[(f, int(t)) for f, t in data.get("fp", ())],
                   floor_ts=int(data.get("fl", 0)))

    def to_dict(self) -> dict[str, Any]:
        return {"h": self.history, "ts": self.last_ts, "n": self.count, "c": self.types,
                "fp": [list(p) for p in self.fingerprints], "fl": self.floor_ts}

    def public(self) -> dict[str, Any]:
        """Return the state as the HTTP API shows it."""
        return {"history": self.history, "last_ts": self.last_ts, "count": self.count,
                "types": self.types}

    def apply(self, event: ClickEvent, history_len: int, dedup_window: int,
              fingerprint_set: set[str] | None = None) -> TrainingExample | None:
        """Apply one event; return its training example, or None for a redelivered copy.

        A copy is recognised by its fingerprint (event id, else item and ts) among the last
        ``dedup_window`` events of the user, or by being older than every fingerprint that
        already left that window (redelivery of something long processed).
        """
        fp = event.fingerprint()
        seen = (fingerprint_set if fingerprint_set is not None
                else {f for f, _ in self.fingerprints})
        if fp in seen or (self.floor_ts and event.ts < self.floor_ts):
            return None
        example = TrainingExample(user=event.user, history=tuple(self.history),
                                  item=event.item, ts=event.ts)
        self.history.append(event.item)
        if len(self.history) > history_len:
            del self.history[: len(self.history) - history_len]
        self.last_ts = max(self.last_ts, event.ts)
        self.count += 1
        self.types[event.type] = self.types.get(event.type, 0) + 1
        self.fingerprints.append((fp, event.ts))
        seen.add(fp)
        if len(self.fingerprints) > dedup_window:
            n_old = len(self.fingerprints) - dedup_window
            for old_fp, old_ts in self.fingerprints[:n_old]:
                seen.discard(old_fp)
                self.floor_ts = max(self.floor_ts, old_ts)
            del self.fingerprints[:n_old]
        return example


def update_trending(buckets: dict[str, dict[str, int]], items: Iterable[tuple[ItemId, int]],
                    bucket_ms: int, n_buckets: int, top: int) -> dict[str, dict[str, int]]:
    """Add (item, ts) clicks to event-time buckets; keep the newest ``n_buckets``, top items."""
    out = {k: Counter(v) for k, v in buckets.items()}
    for item, ts in items:
        out.setdefault(str(ts // bucket_ms * bucket_ms), Counter())[item] += 1
    newest = sorted(out, key=int)[-n_buckets:]
    return {k: dict(out[k].most_common(top)) for k in newest}


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
