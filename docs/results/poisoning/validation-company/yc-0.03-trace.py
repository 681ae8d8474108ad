"""Per detector round of a 3 % bandwagon attack on yoochoose-100k: where the fake users go
(how many are scored, above the bar, suspects, flagged, and among a round's real examples).

    python docs/results/poisoning/validation-company/yc-0.03-trace.py > yc-0.03-trace.log
"""

from __future__ import annotations

import math
import sys
from typing import Any

from trainer import detector as Dt
from trainer import evaluate as E

train_round, admit = Dt.OnlineDetector.train_round, Dt.TrainingFilter.admit
PENDING: list[tuple[int, int, dict[str, float]]] = []


def is_fake(user: Any) -> bool:
    return str(user).startswith("u-x")  # advrec.attacks' fake user ids


def counting_round(self: Dt.OnlineDetector, reals: Any) -> dict[str, float]:
    out = train_round(self, reals)
    PENDING.append((len(reals), sum(is_fake(u) for u, _ in reals), out))
    return out


def reporting_admit(self: Dt.TrainingFilter, batch: Any, bi: int, batches: int = 1) -> Any:
    before = self.detector.rounds
    kept = admit(self, batch, bi, batches)
    if self.detector.rounds != before:
        n, n_fake, out = PENDING.pop()
        bar = self.detector.threshold_logit
        fakes = [u for u in self.records if is_fake(u)]
        scored = [u for u in fakes if u in self.latest]
        enough = sum(self.records[u].behaviour.clicks >= self.cfg.min_clicks for u in fakes)
        print(f"round {self.detector.rounds} batch {bi}: negatives {n} ({n_fake} fake) | "
              f"threshold logit {bar:.2f} | fakes seen {len(fakes)}, >=min_clicks {enough}, "
              f"scored {len(scored)}, high {sum(self.latest[u] >= bar for u in scored)}, "
              f"suspects {sum(is_fake(u) for u in self.streak)}, flagged "
              f"{sum(is_fake(u) for u in self.flagged)} (real flagged "
              f"{sum(not is_fake(u) for u in self.flagged)}), lone {self.lone} | train recall "
              f"{out.get('train_recall', math.nan):.2f} fpr {out.get('train_fpr', math.nan):.3f}",
              flush=True)
    return kept


def main(budget: str) -> None:
    Dt.OnlineDetector.train_round = counting_round  # type: ignore[method-assign]
    Dt.TrainingFilter.admit = reporting_admit  # type: ignore[method-assign]
    E.main(["--dataset", "yoochoose", "../shared/data/yoochoose-100k", "--methods",
            "none+cooc", "--prior-weights", "4", "--threads", "1", "--attack", "bandwagon",
            "--no-progress", "--out", f"/tmp/trace-{budget}", "--attack-budget", budget,
            "--defence", "on", "--seeds", "1", "--attacked-only"])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "0.03")
