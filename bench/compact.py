"""What the bundle's compact item table costs in ranking quality: the prequential HR@10 of
the shipped configuration when every list is ranked with G's item tables as a two-stage
bundle carries them (int8 rows with a power-of-two scale each: advrec/bundle.py "item
rows"; float16, the earlier form) against the learner's own float32 tables.

One ``advrec evaluate`` run per form, same seed, in a process each. Rounding touches only
how the lists are ranked (trainer/export.py ``compact_item_tables``, applied to a copy of
the tables before each batch is scored, the learner's own left as they were), so the runs
train alike and differ only by what the rounding changes: the figures pair by event.
Writes bench/results/compact-<dataset>.json and prints a table.

    python bench/compact.py --dataset movielens ../shared/data/ml-latest-small/ratings.csv
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, print_table, write_result

FORMS = ("float32", "float16", "int8")
FIGURES = ("hr@10", "ndcg@10", "test:hr@10", "test:ndcg@10")


def _rounded_scores(form: str) -> None:
    """Make the evaluator rank with G's item tables rounded to ``form`` (in this process)."""
    import torch

    from trainer import evaluate
    from trainer.export import compact_item_tables

    own = evaluate.LearnerAdapter.scores

    def scores(self: Any, histories: Sequence[Sequence[str]]) -> Any:
        tables = [t.emb.weight for t in self.learner.generator.item_tables()]
        saved = [w.detach().clone() for w in tables]
        with torch.no_grad():
            if form == "int8":
                compact_item_tables(self.learner.generator)
            else:
                for w in tables:
                    w.copy_(w.half().float())
        try:
            return own(self, histories)
        finally:
            with torch.no_grad():
                for w, kept in zip(tables, saved, strict=True):
                    w.copy_(kept)

    if form != "float32":
        evaluate.LearnerAdapter.scores = scores  # type: ignore[method-assign]


def _run(form: str, argv: list[str], out: Path) -> dict[str, Any]:
    from trainer import evaluate

    _rounded_scores(form)
    started = time.perf_counter()
    rc = evaluate.main([*argv, "--out", str(out / form), "--no-progress"])
    assert rc == 0, f"advrec evaluate failed for {form} ({rc})"
    results = json.loads((out / form / "results.json").read_text())
    run = results["runs"][0]
    return {"form": form, "seconds": time.perf_counter() - started,
            "command": results["command"],
            "metrics": {k: run["metrics"][k] for k in FIGURES if k in run["metrics"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", nargs=2, metavar=("SOURCE", "PATH"), required=True,
                   help="as advrec evaluate's --dataset (movielens, yoochoose, ...)")
    p.add_argument("--method", default="apr+cooc", help="the method (shipped: apr+cooc)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-from", default="0.3", help="as advrec evaluate's")
    p.add_argument("--until", default="1.0", help="as advrec evaluate's")
    p.add_argument("--jobs", type=int, default=2, help="forms run at once")
    args = p.parse_args(argv)
    evaluate_argv = ["--dataset", *args.dataset, "--methods", args.method, "--seeds", "1",
                     "--first-seed", str(args.seed), "--report-from", args.report_from,
                     "--until", args.until]
    with tempfile.TemporaryDirectory() as tmp, \
            multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        runs = pool.starmap(_run, [(form, evaluate_argv, Path(tmp)) for form in FORMS])
    base = runs[0]["metrics"]
    for run in runs:
        run["vs_float32"] = {k: v / base[k] - 1 for k, v in run["metrics"].items()
                             if base.get(k)}
    source = Path(args.dataset[1])  # a file (ml-latest-small/ratings.csv) or a folder
    name = source.name if source.is_dir() else source.parent.name or source.stem
    result = {"dataset": args.dataset, "method": args.method, "seed": args.seed,
              "machine": machine(), "goal": "HR@10 within 2 % of the float32 tables' "
              "(issue: compact the table where quality allows)", "runs": runs}
    path = write_result(f"compact-{name}", result)
    rows = [(f"{run['form']:<8} {k}", f"{v:.4f} ({run['vs_float32'].get(k, 0.0):+.2%})")
            for run in runs for k, v in run["metrics"].items()]
    print_table(f"{args.method} on {name}, item tables as the bundle ranks with them", rows)
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
