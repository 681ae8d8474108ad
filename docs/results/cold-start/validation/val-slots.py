"""Offline estimate: HR@10 when N of the 10 slots go to the best never-clicked items.

Runs ``advrec evaluate`` (apr+cooc/content, seed 0) on the first ``FRACTION`` of
ml-latest-small and, for every scored event whose target the model knows, forms the list
from the top 10 - N items by score plus the N best-scored items with no click yet::

    python docs/results/cold-start/validation/val-slots.py 0.3 > val-slots.log
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from trainer import evaluate as E

LEARNERS: list[Any] = []
SLOTS = (0, 1, 2, 3)
# per number of slots: hits, events, hits on cold targets, cold targets
STATS = {n: [0, 0, 0, 0] for n in SLOTS}
make_method, rank_targets = E.make_method, E.rank_targets


def remember_learner(*args: Any, **kwargs: Any) -> Any:
    adapter = make_method(*args, **kwargs)
    LEARNERS.append(adapter.learner)
    return adapter


def count_slots(scores: np.ndarray, target: np.ndarray, history: Any, **kwargs: Any
                ) -> np.ndarray:
    ranks = rank_targets(scores, target, history, **kwargs)  # masks ``scores`` in place
    cold = np.zeros(scores.shape[1], dtype=bool)
    cold[LEARNERS[-1].cold_rows(scores.shape[1])] = True
    for row, t in zip(scores, target, strict=True):
        if t < 0:
            continue
        best = np.argpartition(-row, 10)[:10]
        best = best[np.argsort(-row[best], kind="stable")]
        cold_row = np.where(cold, row, -np.inf)
        best_cold = np.argpartition(-cold_row, 13)[:13]
        best_cold = best_cold[np.argsort(-cold_row[best_cold], kind="stable")]
        for n in SLOTS:
            listed = list(best[: 10 - n])
            listed += [j for j in best_cold
                       if np.isfinite(cold_row[j]) and j not in listed][:n]
            hit = t in listed and bool(np.isfinite(row[t]))
            STATS[n][0] += hit
            STATS[n][1] += 1
            if cold[t]:
                STATS[n][2] += hit
                STATS[n][3] += 1
    return ranks


def main(fraction: str) -> None:
    E.make_method, E.rank_targets = remember_learner, count_slots
    data = "../shared/data/ml-latest-small"
    E.main(["--dataset", "movielens", f"{data}/ratings.csv", "--catalogue",
            f"{data}/movies.csv", "--methods", "apr+cooc", "--content", "on", "--until",
            fraction, "--seeds", "1", "--no-progress", "--out", "/tmp/val-slots"])
    for n, (hits, events, cold_hits, cold_events) in STATS.items():
        print(f"reserved {n}: HR@10 {hits / events:.4f} (n {events}), "
              f"cold-target HR@10 {cold_hits / max(cold_events, 1):.4f} (n {cold_events})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "0.3")
