"""Offline leave-one-out protocol: train on prefixes over epochs, select on validation, test once.

Per user (events in order), the last item is the test target and the second-to-last the
validation target; every earlier click with a non-empty history is a training example
(history = the previous ``max_len`` items). Ranking is full, over every item the model knows;
the user's previously seen items are removed from the list, except the target itself
(the usual leave-one-out rule). Each mode trains with the same ``OnlineLearner`` code as the
stream, epoch by epoch; the epoch (and, across modes, the model) with the best validation
NDCG@10 is kept, and only that state is ever scored on the test targets.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from advrec.contract import TrainingExample
from advrec.datasets import EventLog
from advrec.types import ItemId
from trainer.adversarial import AdversarialConfig
from trainer.evaluate import BASELINES, KS, make_method, method_settings
from trainer.learner import TrainConfig
from trainer.metrics import rank_targets, ranking_metrics

__all__ = ["LooSplit", "evaluate_split", "loo_split", "run_loo", "run_loo_cli"]

SELECT_ON = "ndcg@10"


@dataclass
class LooSplit:
    """Training examples and the validation / test examples of leave-one-out."""

    train: list[TrainingExample]
    valid: list[TrainingExample]
    test: list[TrainingExample]
    seen_valid: list[tuple[ItemId, ...]]  # every item before the validation target
    seen_test: list[tuple[ItemId, ...]]


def loo_split(events: EventLog | Sequence[Any], max_len: int) -> LooSplit:
    """Split each user's sequence: ..., train prefixes, validation item, test item."""
    seqs: dict[str, list[Any]] = {}
    for e in events:
        seqs.setdefault(e.user, []).append(e)
    split = LooSplit([], [], [], [], [])
    for user, evs in seqs.items():
        items = [e.item for e in evs]
        n = len(items)
        n_train = n - 2 if n >= 3 else n  # short users only train
        for t in range(1, n_train):
            split.train.append(TrainingExample(user, tuple(items[max(0, t - max_len):t]),
                                               items[t], evs[t].ts))
        if n >= 3:
            for t, out, seen in ((n - 2, split.valid, split.seen_valid),
                                 (n - 1, split.test, split.seen_test)):
                out.append(TrainingExample(user, tuple(items[max(0, t - max_len):t]),
                                           items[t], evs[t].ts))
                seen.append(tuple(items[:t]))
    return split


def evaluate_split(model: Any, examples: Sequence[TrainingExample],
                   seen: Sequence[tuple[ItemId, ...]], split: str,
                   chunk: int = 1024) -> dict[str, float]:
    """Rank every example's target over all known items, seen items (but the target) removed."""
    del split  # named for the caller's bookkeeping (tests count the "test" calls)
    ranks = []
    for i in range(0, len(examples), chunk):
        part = examples[i : i + chunk]
        scores = model.scores([e.history for e in part])
        target = np.array([model.column(e.item) for e in part], dtype=np.int64)
        exclude = [np.array([model.column(x) for x in set(s)], dtype=np.int64)
                   for s in seen[i : i + chunk]]
        ranks.append(rank_targets(scores, target, exclude, variant="loo",
                                  tiebreak=model.tiebreak()))
    r = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    out = ranking_metrics(r, KS)
    out["n"] = float(r.size)
    out["n_unknown_target"] = float(np.count_nonzero(r == 0))
    return out


def _batches(examples: Sequence[TrainingExample], size: int,
             order: np.ndarray) -> list[list[TrainingExample]]:
    return [[examples[j] for j in order[i : i + size]] for i in range(0, len(order), size)]


def run_loo(split: LooSplit, methods: Sequence[str], *, epochs: int = 10, patience: int = 3,
            batch_size: int = 256, seed: int = 0, model_cfg: Any = None,
            train_cfg: TrainConfig | None = None, adv_cfg: AdversarialConfig | None = None,
            progress: bool = False, log: Any = None) -> dict[str, Any]:
    """Train each method, pick its best validation epoch, test only that; pick the best method."""
    train_cfg = train_cfg or TrainConfig(replay_ratio=0.0)
    adv_cfg = adv_cfg or AdversarialConfig()
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {"methods": {}, "select_on": SELECT_ON}
    for method in methods:
        t0 = time.perf_counter()
        model = make_method(method, seed, model_cfg, train_cfg, adv_cfg)
        n_epochs = 1 if method in BASELINES else epochs  # counting baselines: one pass suffices
        history: list[dict[str, float]] = []
        best: tuple[float, int, Any] | None = None
        for epoch in range(1, n_epochs + 1):
            te = time.perf_counter()
            order = (np.arange(len(split.train)) if method in BASELINES
                     else rng.permutation(len(split.train)))
            batches = _batches(split.train, batch_size, order)
            it = batches
            if progress:
                from tqdm import tqdm

                it = tqdm(batches, desc=f"{method} epoch {epoch}", file=sys.stderr,
                          leave=False, dynamic_ncols=True)
            losses = [x for x in (model.train(b).get("loss_ml") for b in it) if x is not None]
            train_s = time.perf_counter() - te
            val = evaluate_split(model, split.valid, split.seen_valid, "valid")
            row = {"epoch": float(epoch), "train_s": train_s,
                   "loss_ml": float(np.mean(losses)) if losses else 0.0, **val}
            history.append(row)
            if log is not None:
                print(f"{method} epoch {epoch}: val {SELECT_ON} {val[SELECT_ON]:.4f} "
                      f"hr@10 {val['hr@10']:.4f} ({train_s:.0f}s train)", file=log, flush=True)
            if best is None or val[SELECT_ON] > best[0]:
                state = (copy.deepcopy(model.learner.state_dict())
                         if hasattr(model, "learner") else None)
                best = (val[SELECT_ON], epoch, state)
            elif epoch - best[1] >= patience:
                break
        assert best is not None
        if best[2] is not None:
            model.learner.load_state_dict(best[2])
        test = evaluate_split(model, split.test, split.seen_test, "test")
        result["methods"][method] = {"settings": method_settings(model),
                                     "best_epoch": best[1], "valid": history[best[1] - 1],
                                     "test": test, "history": history,
                                     "seconds": time.perf_counter() - t0}
    chosen = max(result["methods"], key=lambda m: result["methods"][m]["valid"][SELECT_ON])
    result["selected"] = chosen
    return result


def run_loo_cli(args: argparse.Namespace, events: EventLog, methods: list[str]) -> int:
    """Run the leave-one-out protocol for ``advrec evaluate --protocol loo``."""
    from trainer.evaluate import _configs

    evs = events.events[: args.limit] if args.limit else events.events
    split = loo_split(evs, args.max_len)
    model_cfg, train_cfg, adv_cfg = _configs(args, 0.0)
    print(f"leave-one-out: {len(split.train)} training examples, {len(split.valid)} users "
          f"validated and tested, {len({e.item for e in evs})} items", file=sys.stderr)
    results = []
    for seed in range(args.seeds):
        results.append(run_loo(split, methods, epochs=args.epochs, patience=args.patience,
                               batch_size=args.batch_size, seed=seed, model_cfg=model_cfg,
                               train_cfg=dataclasses.replace(train_cfg, seed=seed),
                               adv_cfg=adv_cfg, progress=not args.no_progress, log=sys.stderr))
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"protocol": "loo", "command": args.command,
           "dataset": {"source": args.dataset[0], "path": str(args.dataset[1]),
                       "events": len(evs)},
           "rule": "full ranking over all known items; the user's earlier items removed "
                   "except the target; epoch and model selected on validation NDCG@10",
           # what every run starts from; each method's own (its mode, seed) is in
           # seeds[i].methods[m].settings
           "base_model_config": dataclasses.asdict(model_cfg),
           "base_train_config": dataclasses.asdict(train_cfg), "epochs": args.epochs,
           "patience": args.patience, "seeds": results}
    (args.out / "loo.json").write_text(json.dumps(doc, indent=1))
    lines = ["method,seed,best_epoch,epochs_run,valid_ndcg@10,test_hr@10,test_ndcg@10,"
             "test_mrr@10,test_hr@20,test_ndcg@20,seconds"]
    for seed, res in enumerate(results):
        for m, r in res["methods"].items():
            t = r["test"]
            lines.append(f"{m},{seed},{r['best_epoch']},{len(r['history'])},"
                         f"{r['valid'][SELECT_ON]:.5f},{t['hr@10']:.5f},{t['ndcg@10']:.5f},"
                         f"{t['mrr@10']:.5f},{t['hr@20']:.5f},{t['ndcg@20']:.5f},"
                         f"{r['seconds']:.0f}")
    (args.out / "loo.csv").write_text("\n".join(lines) + "\n")
    if args.plots:
        from trainer import plots

        plots.plot_loo_validation({m: r["history"] for m, r in results[0]["methods"].items()},
                                  args.out / "loo_validation.png")
    print("\n".join(lines))
    print(f"selected on validation: {results[0]['selected']}")
    return 0
