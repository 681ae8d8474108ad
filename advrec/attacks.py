"""Shilling (data-poisoning) attacks: fake users injected into a click stream, as a producer
of fake accounts would send them.

An attack adds ``budget`` x (real users) fake users. Each clicks ``filler`` filler items and,
spread among them, the target items (``target_clicks`` times in all), in a burst of clicks that
starts somewhere in the attack window (a share of the stream's time span). What the fillers
are is the kind of attack, after the shilling-attack literature turned to implicit clicks:

- ``random``: items drawn uniformly from the catalogue seen before the attack;
- ``average``: items drawn in proportion to their clicks so far (the average profile);
- ``bandwagon``: the most clicked items so far (the top ``bandwagon_top``), plus a quarter
  random ones;
- ``segment``: items clicked by the target's audience (users who clicked a target before
  the attack), falling back to ``average`` where a target has no audience yet;
- ``generated``: sessions sampled from a sequence model trained on the stream before the
  attack (a ``SequenceSampler``: trainer/attack_model.py wraps the generator), continued
  after each target click, the hardest to tell from real users.

The labels (which users are fake, and the targets) are returned aside, for evaluation; they
are never part of an event. ``inject`` merges the fake events into the real ones in time
order (a real event first on equal timestamps).
"""

from __future__ import annotations

import argparse
import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from advrec.contract import ClickEvent
from advrec.types import ItemId, UserId

__all__ = [
    "ATTACK_KINDS",
    "AttackConfig",
    "AttackLabels",
    "Catalogue",
    "SequenceSampler",
    "add_attack_arguments",
    "attack_config",
    "fake_session",
    "inject",
    "merge_by_time",
    "plan_attack",
]

ATTACK_KINDS = ("random", "average", "bandwagon", "segment", "generated")
DEFAULT_GAP_MS = 20_000  # between a fake user's clicks where the stream has no repeat users


class SequenceSampler(Protocol):
    """What the ``generated`` attack needs: next items of a session, given its start."""

    def sample(self, prefix: Sequence[ItemId], n: int, rng: np.random.Generator) -> list[ItemId]:
        """Return ``n`` items that a real user could click after ``prefix`` (oldest first)."""
        ...


@dataclass(frozen=True)
class AttackConfig:
    """One attack: its kind, size and where in the stream it happens."""

    kind: str = "bandwagon"
    budget: float = 0.01  # fake users as a share of the stream's real users
    filler: int = 20  # filler clicks per fake user
    targets: tuple[ItemId, ...] = ()  # items pushed; empty: ``n_targets`` unpopular ones
    n_targets: int = 1
    target_clicks: int = 3  # clicks on the targets per fake user, spread among the fillers
    start: float = 0.5  # the attack window, as shares of the stream's time span
    end: float = 0.6
    bandwagon_top: int = 50  # most clicked items the bandwagon fillers come from
    gap_ms: int = 0  # between a fake user's clicks; 0 draws from the stream's own gaps
    user_prefix: str = "u-x"  # fake user ids: prefix + number (nothing in them says fake)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise ValueError(f"attack kind {self.kind!r} is not one of {', '.join(ATTACK_KINDS)}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"attack budget {self.budget} must lie in (0, 1]")
        if self.filler < 0 or self.target_clicks < 1 or self.n_targets < 1:
            raise ValueError("filler must be >= 0, target_clicks and n_targets >= 1")
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(f"attack window [{self.start}, {self.end}] must satisfy "
                             "0 <= start < end <= 1")
        if self.bandwagon_top < 1 or self.gap_ms < 0:
            raise ValueError("bandwagon_top must be >= 1 and gap_ms >= 0")


@dataclass
class AttackLabels:
    """Ground truth of one attack, kept aside from the stream."""

    config: AttackConfig
    fake_users: list[UserId] = field(default_factory=list)
    targets: list[ItemId] = field(default_factory=list)
    n_events: int = 0
    start_ms: int = 0
    end_ms: int = 0

    def is_fake(self, user: UserId) -> bool:
        return user in self._fake

    def __post_init__(self) -> None:
        self._fake = set(self.fake_users)

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "fake_users": self.fake_users,
                "targets": self.targets, "n_events": self.n_events,
                "start_ms": self.start_ms, "end_ms": self.end_ms}

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> AttackLabels:
        raw = json.loads(Path(path).read_text())
        cfg = raw.pop("config")
        cfg["targets"] = tuple(cfg["targets"])
        return cls(config=AttackConfig(**cfg), **raw)


def _stream_gaps(events: Sequence[ClickEvent], limit: int) -> np.ndarray:
    """Gaps (ms) between consecutive clicks of the same user, from the stream's start."""
    last: dict[UserId, int] = {}
    gaps: list[int] = []
    for e in events[:limit]:
        if e.user in last and e.ts > last[e.user]:
            gaps.append(e.ts - last[e.user])
        last[e.user] = e.ts
    return np.asarray(gaps, dtype=np.int64)


class Catalogue:
    """What a fake-account operator can see of the stream before the attack: each item's
    clicks and each user's items."""

    def __init__(self, counts: Counter[ItemId], by_user: dict[UserId, list[ItemId]]) -> None:
        self.counts = counts
        self.items = list(counts)  # first-seen order
        weights = np.asarray([counts[i] for i in self.items], dtype=np.float64)
        self.pop_p = weights / weights.sum() if len(weights) else weights
        self.by_user = by_user
        self.by_pop = sorted(self.items, key=lambda i: -counts[i])  # most clicked first
        self._audience: dict[tuple[ItemId, ...], Counter[ItemId]] = {}

    @classmethod
    def from_events(cls, events: Sequence[ClickEvent], cut: int) -> Catalogue:
        by_user: dict[UserId, list[ItemId]] = defaultdict(list)
        for e in events[:cut]:
            by_user[e.user].append(e.item)
        return cls(Counter(e.item for e in events[:cut]), by_user)

    def unpopular_targets(self, n: int, rng: np.random.Generator) -> list[ItemId]:
        """``n`` items with few clicks so far (at most the median; the ones a push helps)."""
        ranked = self.by_pop[::-1]
        pool = ranked[: max(n, len(ranked) // 2)]
        picks = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
        return [pool[int(k)] for k in picks]

    def audience(self, targets: tuple[ItemId, ...]) -> Counter[ItemId]:
        """Items clicked by users who clicked a target (the target's segment), cached."""
        if targets not in self._audience:
            wanted = set(targets)
            out: Counter[ItemId] = Counter()
            for items in self.by_user.values():
                if wanted.intersection(items):
                    out.update(i for i in items if i not in wanted)
            self._audience[targets] = out
        return self._audience[targets]


def _fillers(kind: str, before: Catalogue, n: int, targets: Sequence[ItemId],
             rng: np.random.Generator, cfg: AttackConfig) -> list[ItemId]:
    """``n`` distinct-where-possible filler items of one fake user (not the targets)."""
    exclude = set(targets)
    if n == 0 or not set(before.items) - exclude:
        return []
    if kind == "bandwagon":
        tops = [i for i in before.by_pop[: cfg.bandwagon_top + len(exclude)]
                if i not in exclude][: cfg.bandwagon_top]
        first = _draw(tops, None, n - n // 4, rng, exclude)
        return first + _draw(before.items, None, n - len(first), rng, exclude | set(first))
    if kind == "segment":
        seg = before.audience(tuple(targets))
        if seg:
            items = list(seg)
            w = np.asarray([seg[i] for i in items], dtype=np.float64)
            return _draw(items, w / w.sum(), n, rng, exclude)
    p = None if kind == "random" else before.pop_p  # average (and segment without audience)
    return _draw(before.items, p, n, rng, exclude)


def _draw(items: Sequence[ItemId], p: np.ndarray | None, n: int,
          rng: np.random.Generator, exclude: set[ItemId] | frozenset = frozenset()
          ) -> list[ItemId]:
    """``n`` items (distinct while there are enough) not in ``exclude``, by weights ``p``."""
    if not items or n <= 0:
        return []
    m = len(items)
    size = min(m, n + len(exclude))
    replace = n + len(exclude) > m
    picks = rng.choice(m, size=n + len(exclude) if replace else size, replace=replace, p=p)
    out = [items[int(k)] for k in picks if items[int(k)] not in exclude][:n]
    while len(out) < n and len(exclude) < m:  # too few left after the exclusions: repeat
        k = int(rng.choice(m, p=p))
        if items[k] not in exclude:
            out.append(items[k])
    return out


def _with_targets(fillers: list[ItemId], targets: Sequence[ItemId], clicks: int,
                  rng: np.random.Generator) -> list[ItemId]:
    """Put ``clicks`` target clicks (cycling through the targets) at random places."""
    seq = list(fillers)
    for c in range(clicks):
        seq.insert(int(rng.integers(0, len(seq) + 1)), targets[c % len(targets)])
    return seq


def _generated(sampler: SequenceSampler, before: Catalogue, cfg: AttackConfig,
               targets: Sequence[ItemId], rng: np.random.Generator) -> list[ItemId]:
    """A session sampled from the sequence model, with target clicks woven in: the model
    continues after each target click as after any other."""
    total = cfg.filler + cfg.target_clicks
    at = set(rng.choice(total, size=cfg.target_clicks, replace=False).tolist())
    seed_item = _draw(before.items, before.pop_p, 1, rng)
    seq: list[ItemId] = []
    n_target = 0
    for pos in range(total):
        if pos in at:
            seq.append(targets[n_target % len(targets)])
            n_target += 1
        elif not seq:
            seq.extend(seed_item)
        else:
            seq.extend(sampler.sample(seq, 1, rng))
    return seq


def fake_session(cfg: AttackConfig, catalogue: Catalogue, targets: Sequence[ItemId],
                 rng: np.random.Generator, sampler: SequenceSampler | None = None
                 ) -> list[ItemId]:
    """The items one fake user of ``cfg``'s kind clicks, in order (fillers and targets)."""
    if cfg.kind == "generated":
        if sampler is None:
            raise ValueError("the generated attack needs a sequence sampler (a trained "
                             "generator)")
        return _generated(sampler, catalogue, cfg, targets, rng)
    fillers = _fillers(cfg.kind, catalogue, cfg.filler, targets, rng, cfg)
    return _with_targets(fillers, targets, cfg.target_clicks, rng)


def plan_attack(events: Sequence[ClickEvent], cfg: AttackConfig,
                sampler: SequenceSampler | None = None) -> tuple[list[ClickEvent], AttackLabels]:
    """Return the fake events (time order) of ``cfg`` against ``events`` (time order), and
    their labels. Only what was clicked before the attack window is used to build them."""
    if not events:
        raise ValueError("cannot attack an empty stream")
    rng = np.random.default_rng(cfg.seed)
    t0, t1 = events[0].ts, events[-1].ts
    start_ms = int(t0 + cfg.start * (t1 - t0))
    end_ms = int(t0 + cfg.end * (t1 - t0))
    cut = next((n for n, e in enumerate(events) if e.ts >= start_ms), len(events))
    before = Catalogue.from_events(events, max(cut, 1))
    targets = list(cfg.targets) or before.unpopular_targets(cfg.n_targets, rng)
    n_real = len({e.user for e in events})
    n_fake = max(1, round(cfg.budget * n_real))
    gaps = _stream_gaps(events, max(cut, 1)) if cfg.gap_ms == 0 else np.zeros(0)
    if cfg.gap_ms == 0 and len(gaps) == 0:
        gaps = np.asarray([DEFAULT_GAP_MS])
    fake: list[ClickEvent] = []
    users: list[UserId] = []
    for u in range(n_fake):
        user = f"{cfg.user_prefix}{cfg.seed}-{u}"
        users.append(user)
        items = fake_session(cfg, before, targets, rng, sampler)
        ts = int(rng.integers(start_ms, max(end_ms, start_ms + 1)))
        for n, item in enumerate(items):
            if n:
                ts += int(cfg.gap_ms or gaps[int(rng.integers(0, len(gaps)))])
            fake.append(ClickEvent(user=user, item=item, ts=ts))
    fake.sort(key=lambda e: e.ts)
    labels = AttackLabels(cfg, users, targets, len(fake), start_ms, end_ms)
    return fake, labels


def inject(events: Sequence[ClickEvent], cfg: AttackConfig,
           sampler: SequenceSampler | None = None) -> tuple[list[ClickEvent], AttackLabels]:
    """Return the stream with the attack's fake users merged in by time, and the labels."""
    fake, labels = plan_attack(events, cfg, sampler)
    return merge_by_time(events, fake), labels


def merge_by_time(real: Iterable[ClickEvent], fake: Iterable[ClickEvent]) -> list[ClickEvent]:
    """Merge two time-ordered streams; on equal timestamps the real event goes first."""
    tagged_real = ((e.ts, 0, n, e) for n, e in enumerate(real))
    tagged_fake = ((e.ts, 1, n, e) for n, e in enumerate(fake))
    return [e for _, _, _, e in heapq.merge(tagged_real, tagged_fake)]


# ---------------------------------------------------------------------------- command line


def add_attack_arguments(p: argparse.ArgumentParser, labels: bool = True) -> None:
    """The attack flags shared by ``advrec replay`` and ``advrec evaluate``."""
    a = p.add_argument_group(
        "attack", "inject fake users (a shilling attack) into the stream; which users are "
                  "fake is kept aside, never put into an event (advrec/attacks.py)")
    a.add_argument("--attack", choices=ATTACK_KINDS, default=None, metavar="KIND",
                   help="kind of fillers: random, average (by popularity), bandwagon (the most "
                        "clicked), segment (the target's audience), generated (sampled from a "
                        "generator trained on the stream before the attack; needs torch)")
    a.add_argument("--attack-budget", type=float, default=0.01,
                   help="fake users as a share of the real users (default 0.01 = 1 %%)")
    a.add_argument("--attack-filler", type=int, default=20, help="filler clicks per fake user")
    a.add_argument("--attack-targets", default="",
                   help="comma-separated items to push (default: one unpopular item)")
    a.add_argument("--attack-target-clicks", type=int, default=3,
                   help="target clicks per fake user, spread among the fillers")
    a.add_argument("--attack-window", default="0.5,0.6", metavar="START,END",
                   help="when fake users start, as shares of the stream's time span")
    a.add_argument("--attack-seed", type=int, default=0, help="attack seed")
    if labels:
        a.add_argument("--labels", default="attack-labels.json",
                       help="where the fake users and targets are written (JSON)")


def attack_config(args: argparse.Namespace) -> AttackConfig:
    """Build the attack the flags ask for (ValueError with the reason if they are wrong)."""
    try:
        start, end = (float(x) for x in args.attack_window.split(","))
    except ValueError:
        raise ValueError(f"--attack-window {args.attack_window!r} is not START,END") from None
    targets = tuple(t for t in args.attack_targets.split(",") if t)
    return AttackConfig(kind=args.attack, budget=args.attack_budget, filler=args.attack_filler,
                        targets=targets, target_clicks=args.attack_target_clicks,
                        start=start, end=end, seed=args.attack_seed)
