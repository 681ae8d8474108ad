"""Print the bounded-vocabulary table of docs/results.md from the runs in this folder:
HR@10 (every scored event and the reported part, mean of 3 seeds) and the vocabulary's
rows (peak over the run, live items at the end, items that expired), seed 0. The
ml-latest-small run without a bound is the reported one (docs/results/ml-A-shipped): the
same code as yoochoose-A-ttl0 here, which gave the reported yoochoose figures exactly."""

from __future__ import annotations

import csv
from pathlib import Path

HERE = Path(__file__).parent
RUNS = [("yoochoose-100k", "yoochoose-A-ttl0", "none"),
        ("yoochoose-100k", "yoochoose-A-ttl3d", "3 days"),
        ("yoochoose-100k", "yoochoose-A-ttl1d", "1 day"),
        ("ml-latest-small", "../ml-A-shipped", "none"),
        ("ml-latest-small", "ml-A-ttl365d", "365 days")]
METHOD = "apr+cooc@4"
ITEMS = {"ml-latest-small": 9724, "yoochoose-100k": 2933}  # distinct items (../shared/data)

print("| stream | TTL | HR@10 | HR@10, last 70 % | rows at the peak | live items at the end "
      "| items expired |")
print("|---|---|---|---|---|---|---|")
for stream, run, ttl in RUNS:
    folder = HERE / run
    if not (folder / "summary.csv").exists():
        continue
    summary = next(r for r in csv.DictReader(open(folder / "summary.csv"))
                   if r["method"] == METHOD)
    curves = [r for r in csv.DictReader(open(folder / "curves.csv"))
              if r["method"] == METHOD and r["seed"] == "0"]
    if "vocab_size" in curves[0]:
        peak = max(float(r["vocab_size"]) for r in curves)
        live = float(curves[-1]["live_items"])
        expired = sum(float(r["expired_items"]) for r in curves)
    else:  # a run from before these columns, without a bound: every item of the stream stays
        peak = live = float(ITEMS[stream])
        expired = 0.0
    print(f"| {stream} | {ttl} | {float(summary['hr@10_mean']):.4f} "
          f"± {float(summary['hr@10_std']):.4f} | {float(summary['test:hr@10_mean']):.4f} "
          f"± {float(summary['test:hr@10_std']):.4f} | {peak:,.0f} | {live:,.0f} | "
          f"{expired:,.0f} |")
