"""Training examples/s per adversarial mode, as a ratio to `none` in the same run.

Every mode trains on the same synthetic batches (same seed), one after the other in this
process, with the trainer's default model and replay settings. Writes
bench/results/train.json and prints a table.
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
from trainer.learner import OnlineLearner, TrainConfig
from trainer.model import ModelConfig


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
    base = result["modes"]["none"]["examples_per_s"]
    for mode, r in result["modes"].items():
        r["cost_vs_none"] = base / r["examples_per_s"]
        rows.append((mode, f"{r['examples_per_s']:8.0f} examples/s   cost {r['cost_vs_none']:.2f}x"
                           " none"))
    result["goal"] = "irgan cost <= 2x none"
    path = write_result("train", result)
    print_table(f"bench/train (batch {args.batch_size}, {args.items} items, "
                f"{args.threads} threads)", [*rows, ("results", str(path))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
