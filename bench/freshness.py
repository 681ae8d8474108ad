"""Freshness: time from producing an event to a served model that trained on it.

Runs a worker and a trainer with default settings on a live synthetic stream whose events
carry the wall-clock time as event time. Every half second one event is a probe; a probe
is fresh once the model the worker *serves* (its /readyz version) has a ``last_event_ms``
at or after the probe's time. Writes bench/results/freshness.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.request import urlopen

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advrec.contract import ClickEvent, encode_event, encode_key
from advrec.replay import produce
from advrec.synthetic import SyntheticConfig, synthetic_events
from bench._common import (
    finish,
    machine,
    pair_env,
    print_table,
    scrape,
    start_trainer,
    start_worker,
    stop_processes,
    tag,
    write_result,
)


def live_stream(rate: float, seconds: float, probes: list[tuple[float, int]]):
    """Yield (key, value) in real time; every 0.5 s remember a probe (wall time, ts)."""
    cfg = SyntheticConfig(n_users=1000, n_items=2000, seed=4)
    next_probe = 0.0
    started = time.monotonic()
    for n, e in enumerate(synthetic_events(cfg, int(rate * seconds))):
        due = started + n / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now = time.time()
        ts = int(now * 1000)
        if now >= next_probe:
            probes.append((now, ts))
            next_probe = now + 0.5
        yield encode_key(e.user), encode_event(ClickEvent(e.user, e.item, ts, id=f"f{n}"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=120.0, help="length of the live stream")
    p.add_argument("--rate", type=float, default=200.0, help="events per second")
    p.add_argument("--warmup", type=float, default=30.0, help="probes before this are ignored")
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    args = p.parse_args()
    run_dir = Path("var") / f"bench-fresh-{tag()}"
    run_dir.mkdir(parents=True)
    bundles = run_dir / "bundles"
    env = pair_env("fresh", run_dir, args.bootstrap)
    worker, url = start_worker(run_dir, env)
    trainer = start_trainer(run_dir, env)
    probes: list[tuple[float, int]] = []
    served: list[tuple[float, int]] = []  # (wall time first seen, last_event_ms of the model)
    ages: list[tuple[float, float]] = []  # (wall time, the worker's advrec_model_age_seconds)
    stop = threading.Event()

    def poll() -> None:
        seen: set[str] = set()
        next_age = 0.0
        while not stop.is_set():
            if time.time() >= next_age and served:
                next_age = time.time() + 0.5
                try:
                    ages.append((time.time(), scrape(f"{url}/metrics",
                                                     "advrec_model_age_seconds")))
                except OSError:
                    pass
            try:
                version = json.loads(urlopen(f"{url}/readyz", timeout=2).read())["model_version"]
            except (OSError, ValueError, KeyError):
                version = None
            if version and version not in seen:
                seen.add(version)
                meta = json.loads((bundles / version / "meta.json").read_text())
                served.append((time.time(), int(meta.get("last_event_ms") or 0)))
            stop.wait(0.1)

    poller = threading.Thread(target=poll)
    poller.start()
    started = time.time()
    try:
        asyncio.run(produce(args.bootstrap, env["ADVREC_TOPIC_CLICKS"],
                            live_stream(args.rate, args.seconds, probes), progress=False))
        time.sleep(20)  # let the last probes reach a model
    finally:
        stop.set()
        poller.join()
        stop_processes(trainer, worker)
    delays = []
    for wall, ts in probes:
        if wall - started < args.warmup:
            continue
        fresh = [t for t, last in served if last >= ts and t >= wall]
        if fresh:
            delays.append(min(fresh) - wall)
    missing = sum(1 for wall, _ in probes if wall - started >= args.warmup) - len(delays)
    # the gauge, sampled while the stream ran (after the warm-up): how old the served model
    # said it was; steady exports every T s give both figures about delay + T/2
    stream_end = started + args.seconds
    gauge = [a for t, a in ages if started + args.warmup <= t <= stream_end]
    result = {"settings": vars(args), "machine": machine(), "probes": len(delays),
              "probes_never_served": missing, "swaps_seen": len(served),
              "median_s": statistics.median(delays) if delays else None,
              "p95_s": (statistics.quantiles(delays, n=20)[18] if len(delays) > 2 else None),
              "max_s": max(delays) if delays else None,
              "model_age_gauge": {
                  "samples": len(gauge),
                  "median_s": statistics.median(gauge) if gauge else None,
                  "p95_s": statistics.quantiles(gauge, n=20)[18] if len(gauge) > 2 else None},
              "defaults": {"ADVREC_TRAIN_BATCH_S": 2.0, "ADVREC_EXPORT_EVERY_S": 5.0,
                           "ADVREC_WATCH_INTERVAL_S": 1.0},
              "goal": "median <= 10 s"}
    path = write_result("freshness", result)
    print_table("bench/freshness (event produced -> served by a model trained on it)", [
        ("probes", f"{len(delays)} (never served: {missing})"),
        ("median", f"{result['median_s']:.2f} s" if delays else "-"),
        ("p95", f"{result['p95_s']:.2f} s" if result["p95_s"] else "-"),
        ("bundles served", str(len(served))),
        ("advrec_model_age_seconds", f"median {statistics.median(gauge):.2f} s over "
                                     f"{len(gauge)} samples" if gauge else "-"),
        ("results", str(path)),
    ])
    return finish(run_dir, bool(delays), "no probe was served")


if __name__ == "__main__":
    sys.exit(main())
