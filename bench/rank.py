"""Two-stage ranking at a large catalogue, in-process (no broker, no HTTP): the model server
at concurrency 1 and 32 on the two-stage and the exact path, p99 while the next bundle's
index is refreshed (the worker's default) and while it is built afresh vs steady, the
worker's memory with the model and its index, and recall@10 of the two-stage path against
exact scoring, on the random model and on a trained one (its index built afresh, and an
earlier model's index refreshed with its vectors).

A random generator at the trainer's default shape over ``--items`` items is exported with
its two-stage parts (bench/serve.py ``make_bundle``). A child process that imports what a
worker imports (no torch) loads it as the worker does (stream_app/serving.py
``load_model``, faiss index built on one thread), serves 500 users with 50-item histories
through ``ModelServer`` (micro-batches of up to 32, one inference thread), and swaps in new
versions through ``BundleWatcher``: a slice of requests runs while each version loads.

The trained model: ``--train-events`` synthetic events over ``--train-items`` items
(advrec/synthetic.py), trained online (mode none, one step per batch), published with its
two-stage parts; recall@10 over the last histories of ``--recall-users`` users, seen items
excluded, two-stage (the worker's default candidates) against exact: with the index built
afresh, and with the index of the model published at 80 % of the events refreshed.

bench/serve.py measures the same through HTTP against a no-op endpoint, with a broker.
Writes bench/results/rank-<items>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, print_table, rss_mib, tag, write_result

USERS, HISTORY = 500, 50
REFRESH_AT = 0.8  # the trained model's refreshed index: its graph is from this share of events


class PeakRss:
    """The highest RSS (MiB) of process ``pid``, sampled every 50 ms on a thread between
    ``start`` and ``stop`` (or over a ``with`` block)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mib(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            self._done.wait(0.05)

    def start(self) -> PeakRss:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def __enter__(self) -> PeakRss:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stats(latencies: list[float], elapsed: float) -> dict[str, float]:
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 2 else [0.0] * 99
    return {"requests": len(latencies), "rps": len(latencies) / elapsed,
            "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}


async def _load(server: Any, users: list[list[str]], concurrency: int,
                seconds: float) -> tuple[list[float], float]:
    """Closed loop: ``concurrency`` clients each asking for one user's top 10 after another."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def client(n: int) -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            answer = await server.recommend(users[n % len(users)], 10)
            assert answer is not None and len(answer[0]) == 10
            latencies.append(time.perf_counter() - t)
            n += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(concurrency)))
    return latencies, time.perf_counter() - started


def recall_at_10(staged: Any, exact: Any, users: list[list[str]]) -> float:
    """Mean share of the exact path's top 10 that the two-stage path returns."""
    got, want = [], []
    for i in range(0, len(users), 32):
        chunk = users[i : i + 32]
        got += staged.recommend_batch(chunk, [10] * len(chunk))
        want += exact.recommend_batch(chunk, [10] * len(chunk))
    return float(np.mean([len(set(g) & set(w)) / max(1, len(w))
                          for g, w in zip(got, want, strict=True)]))


def serve(root: Path, version: str, swaps: list[str], seconds: float, exact: bool) -> dict:
    """The child: load, serve, swap; return the figures (runs without torch)."""
    from advrec.memory import release_freed_memory
    from stream_app.hotswap import BundleWatcher
    from stream_app.metrics import StreamMetrics
    from stream_app.retrieval import IndexConfig
    from stream_app.serving import ModelServer, load_model

    pid = os.getpid()
    out: dict[str, Any] = {"rss_baseline_mib": rss_mib(pid)}
    # the worker's defaults (ADVREC_TWO_STAGE_*, ADVREC_ANN_*), two-stage whatever the size
    index = IndexConfig(min_items=0)
    with PeakRss(pid) as loading:
        model = load_model(root, version, threads=1, index=index)
    release_freed_memory()  # as the watcher does after a swap
    out.update(path=model.path, load_s=model.load_seconds, rss_peak_loading_mib=loading.peak,
               index_build_s=model.two_stage.index_seconds,
               rss_one_model_mib=rss_mib(pid), candidates=index.candidates)
    vocab = model.bundle.vocab
    rng = np.random.default_rng(0)
    users = [[vocab[i] for i in rng.choice(len(vocab), HISTORY, replace=False)]
             for _ in range(USERS)]

    async def measure(m: Any, label: str) -> None:
        server = ModelServer(max_batch=32, threads=1, call_timeout_s=30.0)
        server.swap(m)
        for c in (1, 32):
            await _load(server, users, c, 1.0)  # warm
            out[f"{label}/c{c}"] = _stats(*await _load(server, users, c, seconds))
        await server.stop()

    asyncio.run(measure(model, "two_stage"))
    if exact:
        exact_model = load_model(root, version, threads=1)
        out["rss_with_exact_too_mib"] = rss_mib(pid)
        asyncio.run(measure(exact_model, "exact"))
        out["recall10_random_model"] = recall_at_10(model, exact_model, users[:320])
        del exact_model
        release_freed_memory()  # the swaps' peak is measured from the two-stage model alone

    async def swapping(first: list[Any]) -> None:
        """Swap in every version of ``swaps`` while serving at c=32: all but the last refresh
        the live index (the worker's default), the last builds its index afresh (as every
        ``rebuild_after_s``). A slice of requests runs while each version loads, another
        before it; when the slice ends before the load, the rest of the load is waited for
        without requests (``waited_after_slice_s``)."""
        metrics = StreamMetrics.create()
        server = ModelServer(max_batch=32, threads=1, call_timeout_s=30.0, metrics=metrics)
        server.swap(first.pop())  # the server holds the only reference: a swap frees it
        afresh = dataclasses.replace(index, rebuild_after_s=0.0)
        slices: dict[str, tuple[list[float], float]] = {}
        rss = PeakRss(pid).start()
        loads = []
        try:
            for n, new in enumerate(swaps):
                kind = "rebuild" if n == len(swaps) - 1 else "refresh"
                watcher = BundleWatcher(root, server, threads=1, metrics=metrics,
                                        index=afresh if kind == "rebuild" else index)
                for label in (f"steady_{kind}", f"while_{kind}"):
                    if label.startswith("while"):
                        loading = asyncio.create_task(watcher.activate(new))
                    lat, el = await _load(server, users, 32, seconds)
                    old = slices.get(label, ([], 0.0))
                    slices[label] = (old[0] + lat, old[1] + el)
                t = time.perf_counter()
                assert await loading, f"{new} was rejected: {watcher.rejected}"
                loads.append({"version": new, "kind": kind,
                              "refreshed": server.current.two_stage.index.refreshed,
                              "load_s": server.current.load_seconds,
                              "index_s": server.current.two_stage.index_seconds,
                              "waited_after_slice_s": time.perf_counter() - t})
        finally:
            rss.stop()
            await server.stop()
        stats = {label: _stats(*v) for label, v in slices.items()}
        out["swap"] = {**stats, "loads": loads, "rss_peak_mib": rss.peak,
                       "index_build_s_observed": metrics.registry.get_sample_value(
                           "advrec_index_build_seconds_sum")}
        for kind in ("refresh", "rebuild"):
            if f"while_{kind}" in stats:
                out["swap"][f"p99_ratio_{kind}"] = (stats[f"while_{kind}"]["p99_ms"]
                                                    / stats[f"steady_{kind}"]["p99_ms"])

    held = [model]
    del model
    asyncio.run(swapping(held))
    return out


def train_and_recall(n_items: int, n_events: int, n_users: int, recall_users: int,
                     run_dir: Path) -> dict:
    """Train online on a synthetic stream, publish with the two-stage parts, and measure
    recall@10 of the two-stage path against exact scoring on the users' last histories."""
    import torch

    from advrec.contract import TrainingExample
    from advrec.synthetic import SyntheticConfig, synthetic_events
    from stream_app.retrieval import IndexConfig
    from stream_app.serving import load_model
    from trainer.export import publish_bundle
    from trainer.learner import OnlineLearner, TrainConfig

    torch.set_num_threads(1)
    learner = OnlineLearner(train_cfg=TrainConfig(mode="none", steps_per_batch=1))
    histories: dict[str, list[str]] = {}
    batch: list[TrainingExample] = []
    started = time.perf_counter()
    cfg = SyntheticConfig(n_users=n_users, n_items=n_items, seed=1)
    root = run_dir / "trained"
    index = IndexConfig(min_items=0)
    early = None  # the index of the model at REFRESH_AT of the stream, to refresh later
    for n, event in enumerate(synthetic_events(cfg, n_events)):
        past = histories.setdefault(event.user, [])
        batch.append(TrainingExample(event.user, tuple(past[-20:]), event.item, event.ts))
        past.append(event.item)
        if len(batch) == 256:
            learner.train_batch(batch)
            batch = []
        if early is None and n + 1 >= REFRESH_AT * n_events and not batch:
            early = load_model(root, publish_bundle(learner, root, {}, two_stage_items=1),
                               threads=1, index=index)
            early_rows = len(learner.vocab)
    train_s = time.perf_counter() - started
    version = publish_bundle(learner, root, {}, two_stage_items=1)
    exact = load_model(root, version, threads=1)
    staged = load_model(root, version, threads=1, index=index)
    # the early index refreshed with the final model's vectors, however much it grew since
    # (the worker would have built afresh past ``rebuild_growth``): the drift, bounded above
    refreshed = load_model(root, version, threads=1, previous=early,
                           index=dataclasses.replace(index, rebuild_growth=10.0))
    assert refreshed.two_stage is not None and refreshed.two_stage.index.refreshed
    active = sorted(histories, key=lambda u: -len(histories[u]))[:recall_users]
    users = [histories[u][-HISTORY:] for u in active]
    # what rounding the item tables changes (int8 rows, advrec/bundle.py; float16 in runs
    # before it): the bundle's exact top 10 (rounded rows) against the learner's own
    # (float32 rows), seen items excluded alike
    vocab = exact.bundle.vocab
    served = [[vocab[r - 1] for r in rows]
              for rows in exact.recommend_batch(users, [10] * len(users))]
    own = [learner.recommend(u, 10) for u in users]
    overlap = float(np.mean([len(set(a) & set(b)) / 10
                             for a, b in zip(served, own, strict=True)]))
    return {"catalogue_items": n_items, "events": n_events, "vocabulary": len(learner.vocab),
            "rounded_overlap10": overlap,
            "train_s": train_s, "index_build_s": staged.two_stage.index_seconds,
            "users": len(users), "candidates": index.candidates,
            "recall10": recall_at_10(staged, exact, users),
            "refreshed": {"graph_from_events": round(REFRESH_AT * n_events),
                          "graph_rows": early_rows, "rows_added_since": len(learner.vocab)
                          - early_rows, "index_s": refreshed.two_stage.index_seconds,
                          "recall10": recall_at_10(refreshed, exact, users)}}


def versions_like(root: Path, version: str, n: int) -> list[str]:
    """``n`` more versions of one bundle under ``root`` (hard links, a meta of their own)."""
    out = []
    for i in range(1, n + 1):
        new = f"{int(version) + i:013d}"
        (root / new).mkdir()
        for f in (root / version).iterdir():
            if f.name != "meta.json":
                os.link(f, root / new / f.name)
        meta = json.loads((root / version / "meta.json").read_text())
        meta["version"] = new
        (root / new / "meta.json").write_text(json.dumps(meta))
        out.append(new)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    p.add_argument("--swaps", type=int, default=3,
                   help="versions loaded while serving: the last builds its index afresh, "
                        "the others refresh the live one")
    p.add_argument("--no-exact", action="store_true", help="skip the exact path")
    p.add_argument("--train-items", type=int, default=100_000)
    p.add_argument("--train-events", type=int, default=150_000)
    p.add_argument("--train-users", type=int, default=10_000)
    p.add_argument("--recall-users", type=int, default=1000)
    p.add_argument("--no-train", action="store_true", help="skip the trained model's recall")
    p.add_argument("--serve", nargs=3, metavar=("ROOT", "VERSION", "SWAPS"),
                   help=argparse.SUPPRESS)  # the child
    args = p.parse_args()
    if args.serve:
        root, version, swaps = args.serve
        print(json.dumps(serve(Path(root), version, [s for s in swaps.split(",") if s],
                               args.seconds, not args.no_exact)))
        return 0
    from bench.serve import make_bundle

    run_dir = Path("var") / f"bench-rank-{tag()}"
    bundles = run_dir / "bundles"
    result: dict[str, Any] = {"settings": vars(args), "machine": machine()}
    t = time.perf_counter()
    version = make_bundle(bundles, args.items, two_stage=True)
    result["bundle_export_s"] = time.perf_counter() - t
    result["bundle_mib"] = sum(f.stat().st_size for f in (bundles / version).iterdir()) / 2**20
    swaps = versions_like(bundles, version, args.swaps)
    child = [sys.executable, __file__, "--serve", str(bundles), version, ",".join(swaps),
             "--seconds", str(args.seconds)] + (["--no-exact"] if args.no_exact else [])
    done = subprocess.run(child, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    result["serving"] = served = json.loads(done.stdout.strip().splitlines()[-1])
    if not args.no_train:
        result["trained"] = train_and_recall(args.train_items, args.train_events,
                                             args.train_users, args.recall_users, run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    result["goals"] = {"p99_c32_ms": "<= 25", "swap_p99_vs_steady (refresh)": "<= 1.5",
                       "recall10_trained": ">= 0.95", "rss_one_model_mib": "<= 2048"}
    rows = [("bundle", f"{result['bundle_mib']:.0f} MiB, exported in "
                       f"{result['bundle_export_s']:.0f} s"),
            ("load", f"{served['load_s']:.1f} s, of which index build "
                     f"{served['index_build_s']:.1f} s"),
            ("worker RSS", f"{served['rss_baseline_mib']:.0f} MiB before, "
                           f"{served['rss_one_model_mib']:.0f} MiB with the model and index")]
    for label in ("two_stage", "exact"):
        for c in (1, 32):
            r = served.get(f"{label}/c{c}")
            if r:
                rows.append((f"{label} c={c}", f"{r['rps']:7.0f}/s p50 {r['p50_ms']:6.2f} "
                                               f"p99 {r['p99_ms']:7.2f} ms"))
    swap = served["swap"]
    for kind in ("refresh", "rebuild"):
        if f"while_{kind}" in swap:
            rows.append((f"c=32 steady vs {kind}", f"p99 {swap[f'steady_{kind}']['p99_ms']:.2f}"
                         f" vs {swap[f'while_{kind}']['p99_ms']:.2f} ms -> "
                         f"{swap[f'p99_ratio_{kind}']:.2f}x"))
    rows.append(("swaps", ", ".join(f"{x['kind']} {x['index_s']:.1f} s" for x in swap["loads"])
                 + f"; RSS peak {swap['rss_peak_mib']:.0f} MiB"))
    if "recall10_random_model" in served:
        rows.append(("recall@10 random model", f"{served['recall10_random_model']:.3f}"))
    if "trained" in result:
        tr = result["trained"]
        rows.append(("recall@10 trained model", f"{tr['recall10']:.3f} ({tr['vocabulary']} "
                                                f"items, {tr['events']} events, "
                                                f"{tr['users']} users)"))
        rows.append(("int8 rows vs float32", f"top-10 overlap {tr['rounded_overlap10']:.4f}"))
        re = tr["refreshed"]
        rows.append(("recall@10 refreshed index", f"{re['recall10']:.3f} (graph of "
                                                  f"{re['graph_rows']} rows, "
                                                  f"{re['rows_added_since']} added since)"))
    path = write_result(f"rank-{args.items}", result)
    print_table(f"bench/rank ({args.items} items)", [*rows, ("results", str(path))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
