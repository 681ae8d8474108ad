"""Soak: a worker and a trainer under steady traffic for a long while, with live model swaps.

Synthetic click events are produced at a steady rate (event time = wall clock), several
clients ask for recommendations without pause, and the trainer exports a new bundle every
``--export-every`` seconds, which the worker hot-swaps. Every few seconds the script samples
each process's resident memory, the worker's consumer lag and the swap count. It passes when
no request failed, neither process's memory grew by more than 10 % after warm-up, and the lag
stayed bounded. Writes bench/results/soak.json (or --out), a PNG of memory and lag over time,
and prints a table; exits 1 if a goal was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advrec.contract import ClickEvent, encode_event, encode_key
from advrec.replay import produce
from advrec.synthetic import SyntheticConfig, synthetic_events
from bench._common import (
    RESULTS,
    finish,
    machine,
    pair_env,
    print_table,
    rss_mib,
    scrape,
    start_trainer,
    start_worker,
    stop_processes,
    tag,
)

MEMORY_GROWTH_GOAL = 0.10


def live_stream(rate: float, seconds: float,
                stop: threading.Event) -> Iterator[tuple[bytes, bytes]]:
    """Synthetic events paced in real time, stamped with the wall clock."""
    cfg = SyntheticConfig(n_users=2000, n_items=3000, seed=9)
    started = time.monotonic()
    for n, e in enumerate(synthetic_events(cfg, int(rate * seconds))):
        if stop.is_set():
            return
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        event = ClickEvent(e.user, e.item, int(time.time() * 1000), type=e.type, id=f"s{n}")
        yield encode_key(e.user), encode_event(event)


def client(url: str, n_users: int, stop: threading.Event, statuses: Counter,
           latencies: list[float], seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=10) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = http.get(f"/recommendations/u{rng.randrange(n_users)}", params={"k": 10})
                statuses[r.status_code] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - t0)


def growth(series: list[float]) -> float:
    """Relative growth of the last fifth of a series over its first fifth (medians)."""
    if len(series) < 5:
        return float("nan")
    fifth = max(1, len(series) // 5)
    first, last = statistics.median(series[:fifth]), statistics.median(series[-fifth:])
    return last / first - 1.0


def plot(samples: list[dict], warmup: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name in ("worker", "trainer"):
        rss = [s[f"{name}_rss_mib"] for s in samples]
        after = [r for s, r in zip(samples, rss, strict=True) if s["t"] >= warmup] or rss
        ax1.plot(t, [100.0 * (r / after[0] - 1.0) for r in rss],
                 label=f"{name} (100 % = {after[0]:.0f} MiB)")
    ax1.axhline(100 * MEMORY_GROWTH_GOAL, color="tab:red", linestyle="--", label="goal")
    ax1.set_ylabel("RSS vs. end of warm-up (%)")
    ax1.legend()
    ax2.plot(t, [s["lag"] for s in samples], color="tab:red")
    ax2.set_ylabel("consumer lag (messages)")
    ax2.set_xlabel("seconds")
    for ax in (ax1, ax2):
        ax.axvline(warmup, color="grey", linestyle=":")
    fig.suptitle("soak: memory and lag (dotted: end of warm-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (600)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds ignored for memory growth (default: a fifth of --duration)")
    p.add_argument("--rate", type=float, default=200.0, help="events per second (200)")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients (4)")
    p.add_argument("--export-every", type=float, default=10.0,
                   help="seconds between trainer exports, i.e. model swaps (10)")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--max-lag-s", type=float, default=10.0,
                   help="lag goal: at most this many seconds of events behind (10)")
    p.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json", help="result JSON")
    args = p.parse_args(argv)
    warmup = args.duration / 5 if args.warmup is None else args.warmup

    run_dir = Path("var") / f"bench-soak-{tag()}"
    run_dir.mkdir(parents=True)
    env = {**pair_env("soak", run_dir, args.bootstrap), "ADVREC_TRAINER_THREADS": "1",
           "ADVREC_EXPORT_EVERY_S": str(args.export_every)}
    worker, url = start_worker(run_dir, env)
    trainer = start_trainer(run_dir, env)
    trainer_url = f"http://127.0.0.1:{env['ADVREC_TRAINER_METRICS_PORT']}"
    stop = threading.Event()
    statuses: Counter = Counter()
    latencies: list[float] = []
    samples: list[dict] = []
    producer = threading.Thread(target=lambda: asyncio.run(produce(
        args.bootstrap, env["ADVREC_TOPIC_CLICKS"], live_stream(args.rate, args.duration, stop),
        progress=False)))
    clients = [threading.Thread(target=client, args=(url, 2000, stop, statuses, latencies, i))
               for i in range(args.clients)]
    started = time.monotonic()
    producer.start()
    for c in clients:
        c.start()
    try:
        from tqdm import tqdm

        with tqdm(total=int(args.duration), unit="s", desc="soak", file=sys.stderr) as bar:
            while (elapsed := time.monotonic() - started) < args.duration:
                time.sleep(args.sample_every)
                if worker.poll() is not None or trainer.poll() is not None:
                    break
                try:
                    swaps = scrape(f"{url}/metrics", "advrec_model_swaps_total")
                    lag = scrape(f"{url}/metrics", "advrec_consumer_lag_messages")
                    rocksdb = scrape(f"{url}/metrics",
                                     'advrec_rocksdb_memory_bytes{kind="cache"}') / 2**20
                    batches = scrape(f"{trainer_url}/metrics", "advrec_trainer_batches_total")
                except OSError:
                    swaps = lag = rocksdb = batches = float("nan")
                samples.append({"t": round(elapsed, 1), "worker_rss_mib": rss_mib(worker.pid),
                                "worker_rocksdb_mib": rocksdb,
                                "trainer_rss_mib": rss_mib(trainer.pid), "lag": lag,
                                "swaps": swaps, "trainer_batches": batches,
                                "requests": sum(statuses.values())})
                bar.update(int(elapsed) - bar.n)
    finally:
        stop.set()
        for c in clients:
            c.join()
        producer.join()
        alive = {"worker": worker.poll() is None, "trainer": trainer.poll() is None}
        stop_processes(trainer, worker)

    after = [s for s in samples if s["t"] >= warmup]
    errors = sum(n for status, n in statuses.items() if status != 200)
    w_growth = growth([s["worker_rss_mib"] for s in after])
    t_growth = growth([s["trainer_rss_mib"] for s in after])
    max_lag = max((s["lag"] for s in after), default=float("nan"))
    swaps = max((s["swaps"] for s in samples if s["swaps"] == s["swaps"]), default=0.0)
    goals = {"no_errors": errors == 0 and all(alive.values()),
             "worker_memory_growth_below_10pct": w_growth < MEMORY_GROWTH_GOAL,
             "trainer_memory_growth_below_10pct": t_growth < MEMORY_GROWTH_GOAL,
             "lag_bounded": max_lag <= args.rate * args.max_lag_s,
             "models_swapped": swaps > 0}
    lat = sorted(latencies)
    result = {"settings": {**vars(args), "out": str(args.out), "warmup": warmup},
              "machine": machine(), "processes_alive_at_end": alive,
              "requests": sum(statuses.values()), "statuses": {str(k): v for k, v in
                                                               statuses.items()},
              "errors": errors,
              "p50_ms": lat[len(lat) // 2] * 1000 if lat else None,
              "p99_ms": lat[int(len(lat) * 0.99)] * 1000 if lat else None,
              "worker_rss_growth": w_growth, "trainer_rss_growth": t_growth,
              "max_lag_after_warmup": max_lag, "swaps": swaps, "goals": goals,
              "samples": samples}
    path = args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True))
    if samples:
        plot(samples, warmup, path.with_suffix(".png"))
    print_table(f"bench/soak ({args.duration:.0f} s, {args.rate:.0f} ev/s, "
                f"{args.clients} clients)", [
        ("requests", f"{result['requests']} ({errors} errors)"),
        ("latency p50 / p99", f"{result['p50_ms']:.1f} / {result['p99_ms']:.1f} ms"
         if lat else "-"),
        ("model swaps", f"{swaps:.0f}"),
        ("worker RSS growth", f"{w_growth:+.1%} (after {warmup:.0f} s warm-up)"),
        ("worker RocksDB cache", " -> ".join(f"{s['worker_rocksdb_mib']:.1f}" for s in (
            after[0], after[-1])) + " MiB" if after else "-"),
        ("trainer RSS growth", f"{t_growth:+.1%}"),
        ("max consumer lag", f"{max_lag:.0f} messages"),
        ("goals", ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in goals.items())),
        ("results", str(path)),
    ])
    return finish(run_dir, all(goals.values()), "a goal was missed")


if __name__ == "__main__":
    sys.exit(main())
