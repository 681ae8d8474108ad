"""The plain-Python reference of what ingestion must produce, and a stream to check it on."""

from __future__ import annotations

import random
from collections import Counter

import httpx
import numpy as np

from advrec.contract import ClickEvent, encode_event, encode_key
from advrec.synthetic import SyntheticConfig, malformed_payloads, synthetic_events
from tests.integration.conftest import Worker

HISTORY_LEN = 50


def reference_state(events: list[ClickEvent]) -> dict[str, dict]:
    """Compute what user_state must hold, the plain way, from the valid events."""
    ref: dict[str, dict] = {}
    for e in events:
        s = ref.setdefault(e.user, {"history": [], "count": 0, "last_ts": 0, "types": Counter()})
        s["history"] = (s["history"] + [e.item])[-HISTORY_LEN:]
        s["count"] += 1
        s["last_ts"] = max(s["last_ts"], e.ts)
        s["types"][e.type] += 1
    return ref


def fetch_states(worker: Worker, users: list[str]) -> dict[str, dict]:
    out = {}
    with httpx.Client(base_url=worker.url, timeout=10) as client:
        for user in users:
            r = client.get(f"/users/{user}")
            assert r.status_code == 200, (user, r.status_code, r.text)
            out[user] = r.json()
    return out


def assert_states_match(worker: Worker, ref: dict[str, dict]) -> None:
    got = fetch_states(worker, sorted(ref))
    mismatched = [u for u, s in ref.items()
                  if (got[u]["history"], got[u]["count"], got[u]["last_ts"], got[u]["types"])
                  != (s["history"], s["count"], s["last_ts"], dict(s["types"]))]
    assert not mismatched, (f"{len(mismatched)} of {len(ref)} users differ, e.g. "
                            f"{mismatched[0]}: {got[mismatched[0]]} vs {ref[mismatched[0]]}")


def states_match(worker: Worker, ref: dict[str, dict]) -> bool:
    try:
        assert_states_match(worker, ref)
        return True
    except AssertionError:
        return False


class Stream:
    """20,000 synthetic events with 1% malformed ones mixed in at random positions."""

    def __init__(self, n: int = 20_000, bad_fraction: float = 0.01, seed: int = 7) -> None:
        cfg = SyntheticConfig(n_users=1000, n_items=2000, seed=seed)
        self.valid = list(synthetic_events(cfg, n))
        rng = np.random.default_rng(seed)
        self.bad = malformed_payloads(rng, int(n * bad_fraction))
        payloads = [(encode_key(e.user), encode_event(e)) for e in self.valid]
        slots = sorted(random.Random(seed).sample(range(len(payloads) + len(self.bad)),
                                                  len(self.bad)))
        merged, bad_iter, good_iter = [], iter(self.bad), iter(payloads)
        slot_set = set(slots)
        for i in range(len(payloads) + len(self.bad)):
            if i in slot_set:
                raw, _reason = next(bad_iter)
                merged.append((f"u{i % 97}".encode(), raw))
            else:
                merged.append(next(good_iter))
        self.payloads = merged
        self.reference = reference_state(self.valid)
