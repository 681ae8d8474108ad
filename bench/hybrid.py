"""What the co-occurrence prior costs at serving: the hybrid graph against G alone.

One learner is trained on the synthetic stream (10,000 items, the default model), so that
every item has its links; G alone (prior weight 0) and the hybrid (the shipped weight) are
exported to ONNX as the trainer exports them and called by onnxruntime side by side, in
alternating slices, at the batch sizes a worker sends (1, the mean micro-batch of
bench/serve.py at c=32, and the largest). Writes bench/results/hybrid.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advrec.bundle import INPUT_NAME, OUTPUT_NAME
from advrec.synthetic import SyntheticConfig, synthetic_events
from bench._common import machine, print_table, write_result
from trainer.evaluate import build_examples
from trainer.export import export_onnx, scoring_model
from trainer.learner import OnlineLearner, TrainConfig
from trainer.model import ModelConfig
from trainer.prior import PriorConfig


def session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--events", type=int, default=100_000, help="synthetic events trained on")
    p.add_argument("--batches", default="1,11,32", help="batch sizes of the model calls")
    p.add_argument("--slices", type=int, default=10, help="alternating slices per batch size")
    p.add_argument("--calls", type=int, default=200, help="calls per slice")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(1)
    model_cfg = ModelConfig()
    learner = OnlineLearner(model_cfg, TrainConfig(mode="none", steps_per_batch=1, seed=0),
                            prior_cfg=PriorConfig())
    events = list(synthetic_events(SyntheticConfig(n_users=5000, n_items=args.items, seed=1,
                                                   initial_items=1.0),
                                   args.events))
    examples = list(build_examples(events, model_cfg.max_len))
    for i in range(0, len(examples), 1024):
        learner.train_batch(examples[i : i + 1024])
    hybrid = export_onnx(scoring_model(learner), model_cfg.max_len)
    learner.prior_cfg = dataclasses.replace(learner.prior_cfg, weight=0.0)
    alone = export_onnx(scoring_model(learner), model_cfg.max_len)
    sessions = {"G alone": session(alone, args.threads), "hybrid": session(hybrid, args.threads)}
    rng = np.random.default_rng(0)
    n_rows = learner.generator.n_items
    result = {"settings": vars(args), "machine": machine(), "items": n_rows,
              "prior": dataclasses.asdict(PriorConfig()),
              "bytes": {"G alone": len(alone), "hybrid": len(hybrid)}, "batches": {}}
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        history = rng.integers(1, n_rows + 1, size=(b, model_cfg.max_len)).astype(np.int64)
        per_call: dict[str, list[float]] = {name: [] for name in sessions}
        for s in sessions.values():  # warm-up
            for _ in range(20):
                s.run([OUTPUT_NAME], {INPUT_NAME: history})
        for _ in range(args.slices):
            for name, s in sessions.items():
                started = time.perf_counter()
                for _ in range(args.calls):
                    s.run([OUTPUT_NAME], {INPUT_NAME: history})
                per_call[name].append((time.perf_counter() - started) / args.calls * 1e6)
        med = {name: statistics.median(v) for name, v in per_call.items()}
        ratios = [h / g for h, g in zip(per_call["hybrid"], per_call["G alone"], strict=True)]
        result["batches"][str(b)] = {"us_per_call": med, "slices_us": per_call,
                                     "hybrid_over_alone": statistics.median(ratios),
                                     "ratio_range": [min(ratios), max(ratios)]}
        rows.append((f"batch {b}", f"G alone {med['G alone']:8.0f} us   hybrid "
                                   f"{med['hybrid']:8.0f} us   {statistics.median(ratios):.2f}x "
                                   f"(slices {min(ratios):.2f}-{max(ratios):.2f})"))
    rows.append(("model bytes", f"G alone {len(alone) / 1e6:.1f} MB   hybrid "
                                f"{len(hybrid) / 1e6:.1f} MB"))
    path = write_result("hybrid", result)
    print_table(f"bench/hybrid ({n_rows} items, L={model_cfg.max_len}, {args.threads} "
                "onnxruntime thread(s))", [*rows, ("results", str(path))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
