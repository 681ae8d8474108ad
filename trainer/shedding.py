"""Load shedding: how much of each batch to train on, so one trainer keeps up with a fleet.

One trainer serves every worker. When clicks arrive faster than it can train, a trainer
that trained on everything would fall further behind with every batch, and the served
model's age would grow without bound. Instead it trains on a sample of each batch (the rest
still enter the replay buffer, and a sample is still scored for the prequential metrics),
steered by how old the batch it is about to train on is: additive increase, multiplicative
decrease, at most one change a second, as TCP does with its congestion window. Far behind (a
restart after an outage), it jumps to the newest batches.

The signal is the batch's age (now minus the time the worker wrote it), not the number of
batches waiting: batches are cut by size or by time, so twenty small ones may be less work
than two full ones, while the age is what the served model's freshness pays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LoadShedder"]


@dataclass
class LoadShedder:
    """Steers the fraction of each batch trained on by the age of the batches.

    While batches are older than ``target_lag_s`` the fraction shrinks by ``decrease``, or
    by ``target_lag_s / lag`` if that is smaller (far behind, e.g. a standby that just took
    over, it falls at once instead of over many seconds), down to ``min_fraction``; below
    half the target it grows by ``increase`` (up to 1); in between it holds; at most one
    change per ``interval_s``. Beyond ``skip_lag_s`` (0: never) the trainer skips to the
    newest batches instead.
    """

    target_lag_s: float = 3.0
    min_fraction: float = 0.05
    decrease: float = 0.7
    increase: float = 0.1
    interval_s: float = 1.0
    skip_lag_s: float = 300.0
    fraction: float = 1.0
    _changed_at: float = float("-inf")

    def __post_init__(self) -> None:
        assert self.target_lag_s > 0, "target_lag_s must be > 0"
        assert 0.0 < self.min_fraction <= 1.0, "min_fraction must be in (0, 1]"
        assert 0.0 < self.decrease < 1.0 and self.increase > 0.0 and self.interval_s >= 0
        assert self.skip_lag_s == 0 or self.skip_lag_s > self.target_lag_s

    def update(self, lag_s: float, now: float) -> float:
        """Return the fraction to train on for the next batch, ``lag_s`` old at ``now``."""
        if now - self._changed_at < self.interval_s:
            return self.fraction
        if lag_s > self.target_lag_s and self.fraction > self.min_fraction:
            factor = min(self.decrease, self.target_lag_s / lag_s)
            self.fraction = max(self.min_fraction, self.fraction * factor)
            self._changed_at = now
        elif lag_s < self.target_lag_s / 2 and self.fraction < 1.0:
            self.fraction = min(1.0, self.fraction + self.increase)
            self._changed_at = now
        return self.fraction

    def should_skip(self, lag_s: float) -> bool:
        """Whether the trainer is so far behind that it should jump to the newest batches."""
        return self.skip_lag_s > 0 and lag_s > self.skip_lag_s

    @property
    def level(self) -> int:
        """A coarse level of shedding (0: none; n: trains on under 2**-(n-1) of a batch), so
        the log says when shedding changes, not on every batch."""
        return 0 if self.fraction >= 1.0 else 1 + math.floor(-math.log2(self.fraction))
