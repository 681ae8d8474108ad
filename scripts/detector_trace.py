"""Trace the fake-user detector round by round on a dataset with an injected attack.

Replays a stream (the learner in ``none`` mode, the detector and training filter in front of
it, as ``advrec evaluate --defence on`` runs them) and prints, after each training round of
the detector once the attack has begun: how many fake users have enough clicks to be
scored, their median logit under the new classifier, how many are above the threshold, how
many real users are, and how many users are flagged so far. At the end, the F1 that other
thresholds would have given (from each user's highest logit while scored). This is how the
detector's settings are compared on a validation attack (docs/results.md, "Poisoning").

    python scripts/detector_trace.py --dataset yoochoose ../shared/data/yoochoose-100k \\
        --attack bandwagon --attack-seed 1 --seed 3 --negatives-below 3
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advrec.attacks import ATTACK_KINDS, AttackConfig, inject
from advrec.datasets import load_events
from advrec.suspicion import FEATURES
from trainer.detector import DetectorConfig, TrainingFilter
from trainer.evaluate import build_examples
from trainer.learner import OnlineLearner, TrainConfig
from trainer.model import ModelConfig

SWEEP = (6.9, 8.0, 10.0, 12.0, 15.0, 20.0)  # logits; 6.9 is P(fake) 0.999


def main(argv: list[str] | None = None) -> int:
    d = DetectorConfig()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", nargs=2, metavar=("SOURCE", "PATH"), required=True,
                   help="a loader of advrec.datasets (yoochoose, movielens, ...) and its path")
    p.add_argument("--attack", choices=ATTACK_KINDS, default="bandwagon")
    p.add_argument("--attack-budget", type=float, default=0.01)
    p.add_argument("--attack-seed", type=int, default=1,
                   help="1 by default: the reported runs use attack seed 0")
    p.add_argument("--seed", type=int, default=3, help="the learner's seed")
    p.add_argument("--until", type=float, default=1.0, help="replay this first share only")
    p.add_argument("--threshold", type=float, default=d.threshold)
    p.add_argument("--negatives-below", type=float, default=d.negatives_below,
                   help="a round's real examples: users whose latest logit is below this "
                        "('inf': every user not flagged)")
    p.add_argument("--confirm-rounds", type=int, default=d.confirm_rounds,
                   help="rounds in a row that must score a user above the threshold")
    p.add_argument("--timing-shares", default=",".join(map(str, d.timing_shares)),
                   help="how the synthesized fakes click: bot, stream gaps, a real user's "
                        "counters (three shares summing to 1)")
    p.add_argument("--group-min", type=int, default=d.group_min,
                   help="high scorers that must share an item for a flag (1: no such check)")
    p.add_argument("--group-share", type=float, default=d.group_share)
    p.add_argument("--lone-rounds", type=int, default=d.lone_rounds,
                   help="rounds a suspect without company waits before it is cleared")
    p.add_argument("--explain", action="store_true",
                   help="at the end, the raw features of flagged real users, unflagged real "
                        "users and fake users (medians), and why each flagged user was flagged")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    events = load_events(*args.dataset).events
    events = events[: round(args.until * len(events))]
    attacked, labels = inject(events, AttackConfig(kind=args.attack, budget=args.attack_budget,
                                                   seed=args.attack_seed))
    fake = set(labels.fake_users)
    learner = OnlineLearner(ModelConfig(), TrainConfig(mode="none", seed=args.seed))
    guard = TrainingFilter(learner, DetectorConfig(threshold=args.threshold,
                                                   negatives_below=args.negatives_below,
                                                   confirm_rounds=args.confirm_rounds,
                                                   group_min=args.group_min,
                                                   group_share=args.group_share,
                                                   lone_rounds=args.lone_rounds,
                                                   timing_shares=tuple(map(
                                                       float, args.timing_shares.split(",")))))
    examples = list(build_examples(attacked, learner.model_cfg.max_len))
    rounds = 0
    for bi, start in enumerate(range(0, len(examples), 256)):
        learner.train_batch(guard.admit(examples[start:start + 256], bi))
        det = guard.detector
        if det.rounds == rounds:
            continue
        rounds = det.rounds
        users = [u for u, r in guard.records.items() if r.behaviour.clicks >= d.min_clicks]
        is_fake = np.array([u in fake for u in users], dtype=bool)
        if not is_fake.any():
            continue
        logits = det.logits([guard.records[u] for u in users])
        above = logits >= det.threshold_logit
        print(f"batch {bi:4d} round {rounds:3d}: {is_fake.sum():4d} fake users scored, median "
              f"logit {np.median(logits[is_fake]):6.1f}, {(above & is_fake).sum():4d} above "
              f"the threshold | real users above: {(above & ~is_fake).sum():3d} of "
              f"{(~is_fake).sum()} | flagged so far: {len(guard.flagged & fake)} fake, "
              f"{len(guard.flagged - fake)} real", flush=True)
    by_fakes = sum(1 for ex in examples if ex.user in fake)
    print(f"flagged: {len(guard.flagged & fake)} of {len(fake)} fake users, "
          f"{len(guard.flagged - fake)} real users ({guard.lone} suspects cleared for want "
          f"of company); examples filtered: {guard.filtered} (fake users' examples: "
          f"{by_fakes})")
    if args.explain:
        explain(guard, fake)
    for t in SWEEP:
        tp = sum(1 for u, z in guard.worst.items() if z >= t and u in fake)
        fp = sum(1 for u, z in guard.worst.items() if z >= t and u not in fake)
        precision, recall = tp / max(1, tp + fp), tp / max(1, len(fake))
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        print(f"threshold logit {t:4.1f} (P {1 / (1 + math.exp(-t)):.5f}): {tp} fake, {fp} real "
              f"users, F1 {f1:.3f}")
    return 0


def explain(guard: TrainingFilter, fake: set[str]) -> None:
    """Median raw features per group, then the terms that flagged each user."""
    det = guard.detector
    groups = {"real, flagged": [u for u in guard.flagged if u not in fake],
              "real, not flagged": [u for u in guard.worst if u not in fake
                                    and u not in guard.flagged],
              "fake": [u for u in fake if u in guard.records]}
    print(f"{'median feature':>16}" + "".join(f"{g:>20}" for g in groups))
    cols = {g: det.features([guard.records[u] for u in us]).numpy() if us else None
            for g, us in groups.items()}
    for k, name in enumerate(FEATURES):
        print(f"{name:>16}" + "".join(
            f"{np.median(x[:, k]) if x is not None else math.nan:20.3f}" for x in cols.values()))
    for g in ("real, flagged", "fake"):
        for u in groups[g]:
            rec = guard.records[u]
            print(f"{g:>14} {u:>8} clicks {rec.behaviour.clicks:5d} logit "
                  f"{guard.worst.get(u, -math.inf):6.1f}: {det.explain(rec, top=4)}")


if __name__ == "__main__":
    sys.exit(main())
