"""Training examples/s per adversarial mode, as a ratio to `none` in the same run, and what
the fake-user detector and training filter add to the default mode.

Every mode trains on the same synthetic batches (same seed), one after the other in this
process, with the trainer's default model and replay settings. Then the default mode runs
again with the detector on (``ADVREC_TRAINER_DETECTOR=1``: every batch counted and its
users scored, a training round every 10 batches): its examples/s, the seconds of a round
and the scoring cost per example. Writes bench/results/train.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advrec.contract import TrainingExample
from advrec.synthetic import SyntheticConfig, synthetic_events
from bench._common import machine, print_table, write_result
from trainer.adversarial import MODES, AdversarialConfig
from trainer.detector import DetectorConfig, TrainingFilter
from trainer.learner import OnlineLearner, TrainConfig
from trainer.model import ModelConfig
from trainer.settings import TrainerSettings


def batches(n: int, size: int, n_items: int, seed: int) -> list[list[TrainingExample]]:
    history: dict[str, list[str]] = {}
    out: list[TrainingExample] = []
    cfg = SyntheticConfig(n_users=2000, n_items=n_items, seed=seed)
    for e in synthetic_events(cfg, n * size):
        h = history.setdefault(e.user, [])
        out.append(TrainingExample(e.user, tuple(h[-50:]), e.item, e.ts))
        h.append(e.item)
    return [out[i:i + size] for i in range(0, len(out), size)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", type=int, default=40, help="timed batches per mode")
    p.add_argument("--warmup", type=int, default=10, help="untimed batches first")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = batches(args.warmup + args.batches, args.batch_size, args.items, seed=3)
    rows, result = [], {"settings": vars(args), "machine": machine(), "modes": {}}
    model_cfg = ModelConfig()
    adv_cfg = AdversarialConfig()
    result["model"] = dataclasses.asdict(model_cfg)
    result["adversarial"] = dataclasses.asdict(adv_cfg)
    for mode in MODES:
        learner = OnlineLearner(model_cfg, TrainConfig(mode=mode, seed=0), adv_cfg)
        for b in data[: args.warmup]:
            learner.train_batch(b)
        n = 0
        started = time.perf_counter()
        for b in data[args.warmup:]:
            n += int(learner.train_batch(b)["examples"])
        seconds = time.perf_counter() - started
        result["modes"][mode] = {"examples_per_s": n / seconds, "seconds": seconds,
                                 "examples": n}
    result["detector"] = detector_cost(data, args.warmup, model_cfg, adv_cfg)
    base = result["modes"]["none"]["examples_per_s"]
    for mode, r in result["modes"].items():
        r["cost_vs_none"] = base / r["examples_per_s"]
        rows.append((mode, f"{r['examples_per_s']:8.0f} examples/s   cost {r['cost_vs_none']:.2f}x"
                           " none"))
    d = result["detector"]
    d["cost_vs_off"] = result["modes"][d["mode"]]["examples_per_s"] / d["examples_per_s"]
    rows.append((f"{d['mode']} + detector", f"{d['examples_per_s']:8.0f} examples/s   cost "
                 f"{d['cost_vs_off']:.2f}x {d['mode']}; a round {d['round_s']:.2f} s "
                 f"({d['rounds']} rounds), scoring {d['score_us_per_example']:.0f} us/example"))
    result["goal"] = "irgan cost <= 2x none"
    path = write_result("train", result)
    print_table(f"bench/train (batch {args.batch_size}, {args.items} items, "
                f"{args.threads} threads)", [*rows, ("results", str(path))])
    return 0


def detector_cost(data: list[list[TrainingExample]], warmup: int, model_cfg: ModelConfig,
                  adv_cfg: AdversarialConfig) -> dict[str, float | int | str]:
    """The default mode with the detector and filter on, over the same batches."""
    mode = TrainerSettings.trainer_mode  # the sidecar's default mode
    learner = OnlineLearner(model_cfg, TrainConfig(mode=mode, seed=0), adv_cfg)
    guard = TrainingFilter(learner, DetectorConfig(min_users=50))
    rounds: list[float] = []
    train_round = guard.detector.train_round

    def timed_round(*a: object, **k: object) -> dict[str, float]:
        t0 = time.perf_counter()
        out = train_round(*a, **k)  # type: ignore[arg-type]
        if out:
            rounds.append(time.perf_counter() - t0)
        return out

    guard.detector.train_round = timed_round  # type: ignore[method-assign]
    for bi, b in enumerate(data[:warmup]):
        learner.train_batch(guard.admit(b, bi))
    n, admit_s, examples = 0, 0.0, 0
    timed_from = len(rounds)
    started = time.perf_counter()
    for bi, b in enumerate(data[warmup:], start=warmup):
        t0 = time.perf_counter()
        kept = guard.admit(b, bi)
        admit_s += time.perf_counter() - t0
        examples += len(b)
        n += int(learner.train_batch(kept)["examples"])
    seconds = time.perf_counter() - started
    timed = rounds[timed_from:]
    return {"mode": mode, "examples_per_s": n / seconds, "seconds": seconds, "examples": n,
            "rounds": len(timed), "round_s": sum(timed) / max(1, len(timed)),
            "score_us_per_example": (admit_s - sum(timed)) / max(1, examples) * 1e6,
            "flagged_users": len(guard.flagged)}


if __name__ == "__main__":
    sys.exit(main())
