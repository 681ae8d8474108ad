"""How a user's behaviour becomes the fake-user detector's input: one encoding for trainer
and worker, as advrec/encoding.py is for the generator's input.

A user's ``Behaviour`` is a handful of counters kept with the user's state and updated per
event (when the account first and last clicked, how many clicks, the distribution of the
gaps between them). ``behaviour_features`` turns it into the detector's behaviour input; the
detector (trainer/detector.py, exported into the bundle) adds what the items say: how
popular they are, how concentrated on one, whether other users click them together (real
sessions follow the catalogue's structure; fillers drawn at random do not), and whether one
of them is bursting (an attack's target is clicked by every fake user at once).

``FEATURES`` names every input the detector weighs, in its order: the admin API explains a
flag by the features that pushed the score up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["BEHAVIOUR_FEATURES", "CONTENT_FEATURES", "FEATURES", "SHORT_GAP_MS", "Behaviour",
           "behaviour_features", "behaviour_matrix"]

SHORT_GAP_MS = 10_000  # a click within 10 s of the previous one is a short gap
BEHAVIOUR_FEATURES = (
    "log_clicks",  # log(1 + clicks)
    "log_age_h",  # log(1 + hours between the first and the latest click)
    "log_rate",  # log(clicks per hour of account age, the age at least a minute)
    "short_gaps",  # share of gaps under SHORT_GAP_MS
    "log_gap_mean",  # mean of log(1 + gap in s)
    "log_gap_std",  # its standard deviation
)
CONTENT_FEATURES = (
    "pop_mean",  # mean popularity percentile of the history's items (1 = the most clicked)
    "pop_std",  # their spread
    "repeat_share",  # share of the history that repeats its most clicked item (0: none)
    "coherence",  # mean log ratio of co-clicks by others to chance, over nearby item pairs
    "unlinked",  # share of those pairs that nobody else co-clicked
    "burst",  # the history's most bursting item: log ratio of its recent clicks to its usual
)
FEATURES = BEHAVIOUR_FEATURES + CONTENT_FEATURES


@dataclass
class Behaviour:
    """Per-user counters for the detector (a msgpack list of 7 numbers in the state)."""

    first_ts: int = 0
    last_ts: int = 0
    clicks: int = 0
    gaps: int = 0
    short_gaps: int = 0
    log_gap_sum: float = 0.0
    log_gap_sq: float = 0.0

    def update(self, ts: int) -> None:
        """Count one click at ``ts`` (ms); an out-of-order click adds no gap."""
        if self.clicks == 0:
            self.first_ts = self.last_ts = ts
        elif ts >= self.last_ts:
            gap = ts - self.last_ts
            lg = math.log1p(gap / 1000.0)
            self.gaps += 1
            self.short_gaps += gap < SHORT_GAP_MS
            self.log_gap_sum += lg
            self.log_gap_sq += lg * lg
            self.last_ts = ts
        else:
            self.first_ts = min(self.first_ts, ts)
        self.clicks += 1

    def to_list(self) -> list[float]:
        return [self.first_ts, self.last_ts, self.clicks, self.gaps, self.short_gaps,
                self.log_gap_sum, self.log_gap_sq]

    @classmethod
    def from_list(cls, raw: list[float] | None) -> Behaviour:
        if not raw:
            return cls()
        f, la, c, g, s, ls, lq = raw
        return cls(int(f), int(la), int(c), int(g), int(s), float(ls), float(lq))


def behaviour_features(b: Behaviour) -> list[float]:
    """The detector's behaviour input, in ``BEHAVIOUR_FEATURES`` order."""
    age_h = max(b.last_ts - b.first_ts, 0) / 3_600_000.0
    mean = b.log_gap_sum / b.gaps if b.gaps else 0.0
    var = b.log_gap_sq / b.gaps - mean * mean if b.gaps else 0.0
    return [math.log1p(b.clicks), math.log1p(age_h),
            math.log(max(b.clicks, 1) / max(age_h, 1 / 60)),
            b.short_gaps / b.gaps if b.gaps else 0.0, mean, math.sqrt(max(var, 0.0))]


def behaviour_matrix(behaviours: Iterable[Behaviour]) -> np.ndarray:
    """The detector's ``behaviour`` input [B, F_b] float32 for B users (trainer and worker)."""
    rows = [behaviour_features(b) for b in behaviours]
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(BEHAVIOUR_FEATURES))
