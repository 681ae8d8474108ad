"""A seedable synthetic click stream with planted structure, for demos and tests.

The world: items fall into clusters; inside a cluster, popularity follows a Zipf law and the
items form a chain (a random cyclic order) that sessions tend to walk along, so a sequence
model can beat popularity. Each user prefers one cluster and switches to another now and
then (taste drift). The catalogue starts partly hidden and grows as events go by. Event time
advances at a fixed rate from a start that, by default, makes the last event "now".
The same world scales to a million items (``n_items``; ``advrec replay --items``), for the
large-catalogue benchmarks: ~0.2 s to plant it, and the events stream at the usual rate.
"""

from __future__ import annotations

import bisect
import itertools
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgpack
import numpy as np

from advrec.contract import MAX_EVENT_BYTES, MAX_ID_CHARS, MIN_TS_MS, ClickEvent
from advrec.types import TimestampMs

__all__ = [
    "MALFORMED_KINDS",
    "SyntheticConfig",
    "SyntheticStream",
    "malformed_payloads",
    "synthetic_events",
]


@dataclass(frozen=True)
class SyntheticConfig:
    """Settings of the synthetic world and of its event clock."""

    n_users: int = 1000
    n_items: int = 2000  # final catalogue size, reached as new items appear
    n_clusters: int = 20
    zipf_a: float = 1.1  # popularity of the r-th item of a cluster ~ r ** -zipf_a
    drift: float = 0.01  # chance per event that the user's preferred cluster changes
    chain_prob: float = 0.5  # chance the next click follows the cluster's item chain
    explore: float = 0.05  # chance a click lands in a random cluster instead
    session_end: float = 0.15  # chance a session ends after a click
    initial_items: float = 0.5  # fraction of the catalogue visible at the start
    new_item_rate: float = 0.01  # chance per event that one hidden item appears
    user_zipf_a: float = 0.5  # activity skew over users (0 = uniform)
    events_per_s: float = 50.0  # event-time rate; 50/s puts 100k events in ~33 minutes
    start_ms: TimestampMs | None = None  # None: now minus the duration of the stream
    seed: int = 0

    def __post_init__(self) -> None:
        assert self.n_users >= 1 and self.n_clusters >= 1, "need at least one user and cluster"
        assert self.n_items >= self.n_clusters, "need at least one item per cluster"
        assert self.zipf_a >= 0 and self.user_zipf_a >= 0, "Zipf exponents must be >= 0"
        for name in ("drift", "chain_prob", "explore", "session_end", "initial_items",
                     "new_item_rate"):
            value = getattr(self, name)
            assert 0.0 <= value <= 1.0, f"{name}={value} must lie in [0, 1]"
        assert self.events_per_s > 0, "events_per_s must be positive"
        assert self.start_ms is None or self.start_ms >= MIN_TS_MS, "start_ms before 1990"


def _cdf(weights: list[float]) -> list[float]:
    return list(itertools.accumulate(weights))


@dataclass
class SyntheticStream:
    """The planted world of a ``SyntheticConfig``; ``events`` replays clicks from it."""

    cfg: SyntheticConfig
    cluster_of: np.ndarray = field(init=False)  # (n_items,) cluster of each item
    next_item: np.ndarray = field(init=False)  # (n_items,) successor in the cluster chain
    appear_order: np.ndarray = field(init=False)  # (n_items,) item indices, first visible first

    def __post_init__(self) -> None:
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed)
        # Every cluster gets at least one item; the rest are spread at random.
        cluster_of = np.concatenate([np.arange(cfg.n_clusters),
                                     rng.integers(0, cfg.n_clusters,
                                                  cfg.n_items - cfg.n_clusters)])
        self.cluster_of = rng.permutation(cluster_of)
        self.members = [np.flatnonzero(self.cluster_of == c) for c in range(cfg.n_clusters)]
        # Zipf weight by a random popularity rank inside the cluster.
        self.weight = np.zeros(cfg.n_items)
        self.next_item = np.zeros(cfg.n_items, dtype=np.int64)
        for items in self.members:
            ranks = rng.permutation(len(items)) + 1
            self.weight[items] = ranks.astype(float) ** -cfg.zipf_a
            chain = rng.permutation(items)
            self.next_item[chain] = np.roll(chain, -1)
        self.appear_order = rng.permutation(cfg.n_items)
        self.n_initial = max(cfg.n_clusters, round(cfg.initial_items * cfg.n_items))
        self.n_initial = min(self.n_initial, cfg.n_items)
        user_w = (np.arange(1, cfg.n_users + 1, dtype=float) ** -cfg.user_zipf_a)
        self.user_cdf = _cdf(rng.permutation(user_w).tolist())
        self.initial_taste = rng.integers(0, cfg.n_clusters, cfg.n_users)
        self.py_seed = int(rng.integers(0, 2**63))

    def item_id(self, index: int) -> str:
        """Return the external id of item ``index``."""
        return f"i{index}"

    def user_id(self, index: int) -> str:
        """Return the external id of user ``index``."""
        return f"u{index}"

    def start_ms(self, limit: int | None) -> TimestampMs:
        """Return the first timestamp: configured, or now minus the stream's duration."""
        if self.cfg.start_ms is not None:
            return self.cfg.start_ms
        duration = 0 if limit is None else int(limit * 1000 / self.cfg.events_per_s)
        return int(time.time() * 1000) - duration - 1000

    def events(self, limit: int | None = None) -> Iterator[ClickEvent]:
        """Yield ``limit`` click events (endless when None) in non-decreasing time order."""
        cfg = self.cfg
        rnd = random.Random(self.py_seed)
        start = self.start_ms(limit)
        order = self.appear_order.tolist()
        cluster_of = self.cluster_of.tolist()
        visible = [False] * cfg.n_items
        for item in order[: self.n_initial]:
            visible[item] = True
        n_visible = self.n_initial
        # Per cluster: the visible items and the cumulative Zipf weights over them.
        pool: list[list[int]] = [[] for _ in range(cfg.n_clusters)]
        for item in order[: self.n_initial]:
            pool[cluster_of[item]].append(item)
        cdfs: dict[int, list[float]] = {}
        taste = self.initial_taste.tolist()
        last: list[int | None] = [None] * cfg.n_users  # last item of the open session
        session_no = [0] * cfg.n_users
        weight = self.weight.tolist()
        next_item = self.next_item.tolist()

        def draw(cluster: int) -> int:
            if not pool[cluster]:
                cluster = rnd.choice([c for c in range(cfg.n_clusters) if pool[c]])
            cdf = cdfs.get(cluster)
            if cdf is None:
                cdf = cdfs[cluster] = _cdf([weight[i] for i in pool[cluster]])
            pos = bisect.bisect_right(cdf, rnd.random() * cdf[-1])
            return pool[cluster][min(pos, len(cdf) - 1)]

        counter = itertools.count() if limit is None else range(limit)
        for n in counter:
            if n_visible < cfg.n_items and rnd.random() < cfg.new_item_rate:
                item = order[n_visible]
                visible[item] = True
                n_visible += 1
                pool[cluster_of[item]].append(item)
                cdf = cdfs.get(cluster_of[item])
                if cdf is not None:  # extend, not rebuild: a cluster of a 1M catalogue
                    cdf.append(cdf[-1] + weight[item])  # holds ~50k items
            user = bisect.bisect_right(self.user_cdf, rnd.random() * self.user_cdf[-1])
            user = min(user, cfg.n_users - 1)
            if rnd.random() < cfg.drift:
                taste[user] = rnd.randrange(cfg.n_clusters)
            prev = last[user]
            follow = next_item[prev] if prev is not None else None
            if follow is not None and visible[follow] and rnd.random() < cfg.chain_prob:
                item = follow
            elif rnd.random() < cfg.explore:
                item = draw(rnd.randrange(cfg.n_clusters))
            else:
                item = draw(taste[user])
            yield ClickEvent(
                user=self.user_id(user), item=self.item_id(item),
                ts=start + int(n * 1000 / cfg.events_per_s),
                session=f"{self.user_id(user)}-s{session_no[user]}",
                id=f"syn{cfg.seed}-{n}",
            )
            if rnd.random() < cfg.session_end:
                last[user] = None
                session_no[user] += 1
            else:
                last[user] = item


def synthetic_events(cfg: SyntheticConfig | None = None,
                     limit: int | None = None) -> Iterator[ClickEvent]:
    """Yield ``limit`` synthetic click events of ``cfg`` (endless when None), oldest first."""
    return SyntheticStream(cfg or SyntheticConfig()).events(limit)


MALFORMED_KINDS = (
    "not_msgpack", "not_a_map", "oversize", "missing_field", "wrong_type", "bad_id",
    "bad_timestamp", "bad_event_type",
)


def _good(rng: np.random.Generator) -> dict:
    return {"user": f"u{rng.integers(1000)}", "item": f"i{rng.integers(1000)}",
            "ts": int(time.time() * 1000) - int(rng.integers(1, 10**9))}


def _malformed(kind: str, rng: np.random.Generator) -> bytes:
    good = _good(rng)
    variant = int(rng.integers(3))
    if kind == "not_msgpack":
        return [b"\xc1", msgpack.packb(good)[:-3], msgpack.packb(good) + b"\x01"][variant]
    if kind == "not_a_map":
        return msgpack.packb([[good["user"], good["item"]], good["ts"], "click"][variant])
    if kind == "oversize":
        good["pad"] = "x" * (MAX_EVENT_BYTES + int(rng.integers(1, 1000)))
        return msgpack.packb(good)
    if kind == "missing_field":
        del good[["user", "item", "ts"][variant]]
        return msgpack.packb(good)
    if kind == "wrong_type":
        field_name, value = [("ts", str(good["ts"])), ("ts", good["ts"] + 0.5),
                             ("user", int(rng.integers(1000)))][variant]
        good[field_name] = value
        return msgpack.packb(good)
    if kind == "bad_id":
        good[["user", "item", "user"][variant]] = ["", "", "u" * (MAX_ID_CHARS + 1)][variant]
        return msgpack.packb(good)
    if kind == "bad_timestamp":
        day = 24 * 3600 * 1000
        good["ts"] = [0, -int(rng.integers(1, 10**12)),
                      int(time.time() * 1000) + int(rng.integers(3, 10**6)) * day][variant]
        return msgpack.packb(good)
    if kind == "bad_event_type":
        good["type"] = ["like", "", "CLICK"][variant]
        return msgpack.packb(good)
    raise ValueError(f"unknown malformed kind {kind!r}")


def malformed_payloads(rng: np.random.Generator, n: int) -> list[tuple[bytes, str]]:
    """Return ``n`` broken ``clicks`` payloads, each with the reason ``decode_event`` gives.

    Kinds cycle through ``MALFORMED_KINDS`` (reasons of ``advrec.contract.REASONS``), so any
    ``n >= len(MALFORMED_KINDS)`` covers them all; the content of each is random.
    """
    return [(_malformed(kind, rng), kind)
            for kind in itertools.islice(itertools.cycle(MALFORMED_KINDS), n)]
