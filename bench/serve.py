"""Serving throughput and latency: /recommendations vs a no-op endpoint, micro-batching on
and off, steady vs a swap every 2 s, and resident memory during swaps.

A real 10k-item generator at the trainer's default shape (random weights: latency does not
depend on training) is exported to a bundle; a worker serves 500 users with 50-item
histories; keep-alive connections at concurrency 1, 8 and 32 (bench/_loadgen.py: a lean
client, since it shares the machine's cores with the worker) load /recommendations and
/noop in alternating slices (8 each), so that the machine's drift hits both sides alike;
each side's CPU time per request (worker event loop, worker's other threads, client) is
recorded beside its rate, and each pair of slices gives a ratio of its own (``ratio_by_round``:
how far the machine's drift moves the ratio within one run). A last run at c=32 serves a
much cheaper model over the same 10k items (d=8, one layer: 0.39 vs 0.99 ms per call of 12
histories, measured alone; the top-k over 10k items remains), to show how much of the gap
the model's size accounts for.

``--items`` from the worker's two-stage size on (ADVREC_TWO_STAGE_ITEMS, 200k) serves the
bundle's two-stage parts (stream_app/retrieval.py): the measurements wait for the first
swap, which builds the index (~75 s at 1M items on one core), and the swap phase then
measures requests while the next bundles arrive and load, each refreshing the live index
(the worker's default; the watcher loads one version at a time, the newest it is told of).
There each swap is a delta against the bundle before it, as the trainer publishes between
full bundles (advrec/bundle.py): ``--delta-rows`` rows of the item table change (20,000:
the trainer's deltas at 1M items averaged 1.89 MB, up to ~23k rows at 73 bytes each,
bench/results/freshness-1000000.json) and ``--delta-items`` items are added; with
``--full-swaps`` the whole bundle is published again each time instead. The deltas are
written before the swap slices start (whole bundles as they go): writing a 1M-item chain
is the trainer's work, in its own container, and here it took this 2-core machine's CPU
from the worker in the swapping slices only.
Writes bench/results/serve.json (10k items) or serve-<items>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advrec.bundle import (
    TWO_STAGE_ITEMS,
    bundle_files,
    delta_files,
    int8_rows,
    item_rows,
    list_versions,
    load_bundle,
    write_bundle,
)
from advrec.contract import ClickEvent, encode_event, encode_key
from advrec.links import npy_bytes
from advrec.replay import produce
from advrec.topics import default_topics, ensure_topics
from bench import _loadgen as loadgen
from bench._common import (
    BundleTopic,
    machine,
    print_table,
    rss_mib,
    scrape,
    start_worker,
    tag,
    thread_cpu_seconds,
    write_result,
)


def make_bundle(root: Path, n_items: int, two_stage: bool | None = None, **shape: int) -> str:
    """Publish a random generator for ``n_items`` items; ``shape`` overrides the trainer's
    default ModelConfig (L, d, layers). ``two_stage`` None: from the trainer's two-stage
    size on (100k items), the bundle carries the two-stage parts, as the trainer's would.

    With the parts, the item table has the synthetic world's planted clusters and popularity
    (bench/ann.py ``planted_table``) instead of random rows: a nearest-neighbour index over
    random 64-dim rows, which no trained model has, took over 4 minutes to build at 1M
    items on one core, against ~80 s for clustered rows."""
    import torch

    from trainer.export import TWO_STAGE_FROM_ITEMS, compact_item_tables, export_onnx
    from trainer.model import Generator, ModelConfig
    from trainer.twostage import export_two_stage

    torch.manual_seed(0)
    gen = Generator(ModelConfig(n_items=n_items, **shape)).eval()
    gen.grow(n_items)  # (V+1, D) live rows: random weights serve as fast as trained ones
    max_len = gen.config.max_len
    if two_stage is None:
        two_stage = n_items >= TWO_STAGE_FROM_ITEMS
    if two_stage:
        from bench.ann import planted_table

        with torch.no_grad():
            gen.items.emb.weight[: n_items + 1] = torch.from_numpy(
                planted_table(n_items, gen.config.d_model, 20, 0))  # (V+1, D)
        compact_item_tables(gen)  # as the trainer's bundles with the parts (int8 rows)
    model = export_onnx(gen, max_len)
    parts = export_two_stage(gen, max_len) if two_stage else None
    vocab = [f"i{n}" for n in range(gen.n_items)]
    return write_bundle(root, model, vocab, {"max_len": max_len, "last_event_ms": 0,
                                             "examples_seen": 0, "metrics": {}}, keep=3,
                        two_stage=parts)


def _stats(latencies: list[float], errors: int, elapsed: float) -> dict:
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 2 else [0.0] * 99
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / elapsed,
            "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}


def side_by_side(url: str, a: list[str], b: list[str], concurrency: int, seconds: float,
                 pid: int, rounds: int = 8) -> tuple[dict, dict]:
    """Load ``a`` and ``b`` in alternating slices (``rounds`` each, ``seconds`` in all per
    side), so that drift in the machine's speed hits both sides alike.

    Each side also reports the CPU time per request of the worker ``pid`` (its event-loop
    thread, and all other threads: inference, onnxruntime, RocksDB, Kafka) and of this
    client process: in a closed loop on a shared machine these say where a request's cost
    goes when the rates alone cannot.
    """
    totals = {"a": ([], 0, 0.0), "b": ([], 0, 0.0)}
    cpu = {side: {"worker_loop": 0.0, "worker_other": 0.0, "client": 0.0} for side in totals}
    by_round: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(rounds):
        for side, paths in (("a", a), ("b", b)):
            before, client = thread_cpu_seconds(pid), time.process_time()
            lat, err, el = asyncio.run(_load(url, paths, concurrency, seconds / rounds))
            after = thread_cpu_seconds(pid)
            cpu[side]["worker_loop"] += after["main"] - before["main"]
            cpu[side]["worker_other"] += after["other"] - before["other"]
            cpu[side]["client"] += time.process_time() - client
            by_round[side].append(len(lat) / el)
            prev = totals[side]
            totals[side] = (prev[0] + lat, prev[1] + err, prev[2] + el)
    out = []
    for side in ("a", "b"):
        stats = _stats(*totals[side])
        n = max(stats["requests"], 1)
        stats["cpu_us_per_request"] = {k: v / n * 1e6 for k, v in cpu[side].items()}
        stats["rps_by_round"] = by_round[side]
        out.append(stats)
    return out[0], out[1]


def round_ratios(a: dict, b: dict) -> list[float]:
    """The ratio of ``a``'s rate to ``b``'s in each pair of adjacent slices of a
    ``side_by_side`` run: how far the machine's drift moves one ratio within a run."""
    return [x / y for x, y in zip(a["rps_by_round"], b["rps_by_round"], strict=True)]


async def _load(url: str, paths: list[str], concurrency: int,
                seconds: float) -> tuple[list[float], int, float]:
    tally, elapsed = await loadgen.load(url, paths, concurrency, seconds)
    return tally.latencies, tally.errors, elapsed


def measure_swaps(url: str, paths: list[str], pid: int, bundles: Path, version: str,
                  topic: BundleTopic, seconds: float, rounds: int = 4, *,
                  deltas: tuple[int, int] | None = None) -> dict:
    """p99 at concurrency 8 steady vs with a new bundle every 2 s on the bundle topic, in
    alternating slices (``rounds`` each, ``seconds`` * 2 in all per side: one p99 window
    each way swung from 0.8x to 1.7x between runs); peak RSS meanwhile. Each swap costs the
    worker what a trainer's publish does: rebuilding the bundle from its chunks, then
    loading and warming it. ``deltas`` (rows changed, items added): each bundle is a delta
    against the one before it (the bundle must have the two-stage parts), all of them
    written before the slices start, so that the slices pay for the worker's work and not
    for this process writing 1M-item tables: a trainer does that in a container of its own.
    Whole bundles are written as they are published."""
    model = (bundles / version / "model.onnx").read_bytes()
    bundle = load_bundle(bundles, version)  # with its two-stage parts, if any
    done = threading.Event()
    before = rss_mib(pid)  # after the load phases, before any swap
    peak = [before]
    published = [0]
    sent_bytes = [0]
    chain: dict = {"version": version, "vocab": list(bundle.vocab)}
    if deltas is not None:
        assert bundle.two_stage is not None, "deltas need the two-stage parts"
        chain["table"] = np.load(io.BytesIO(bundle.two_stage[TWO_STAGE_ITEMS]))
    rng = np.random.default_rng(0)

    def next_delta(meta: dict) -> str:
        """Write the next delta of the chain: rows moved a little, items added."""
        assert deltas is not None and bundle.two_stage is not None
        n_rows, n_new = deltas
        old, vocab = chain["table"], chain["vocab"]
        table = np.concatenate([old, old[rng.integers(1, len(old), n_new)]])  # (V+1+n, D')
        rows = rng.choice(np.arange(1, len(table)), size=n_rows, replace=False)
        moved = item_rows(table[rows])  # (n_rows, D'), float32
        moved += rng.normal(scale=0.01, size=moved.shape).astype(np.float32)
        table[rows] = int8_rows(moved) if table.dtype == np.int8 else moved  # its own form
        grown = [*vocab, *(f"new{meta['examples_seen']}-{n}" for n in range(n_new))]
        new = write_bundle(bundles, None, grown, meta, keep=3,
                           two_stage={**bundle.two_stage, TWO_STAGE_ITEMS: npy_bytes(table)},
                           delta=(chain["version"], delta_files(old, vocab, table, grown)))
        chain.update(version=new, table=table, vocab=grown)
        return new

    def meta(n: int) -> dict:
        return {"max_len": bundle.max_len, "last_event_ms": 0, "examples_seen": n,
                "metrics": {}}

    ready: list[tuple[str, list[tuple[str, bytes]]]] = []  # the deltas, in chain order
    if deltas is not None:  # a slice of s seconds publishes at most s / 2 + 1
        for n in tqdm(range(rounds * (int(seconds * 2 / rounds / 2.0) + 2)),
                      desc="writing the deltas", unit="delta"):
            new = next_delta(meta(n + 1))
            ready.append((new, bundle_files(bundles, new)))
        ready.reverse()

    def swapper(stop: threading.Event) -> None:
        while not stop.is_set():  # one at the slice's start, then every 2 s
            published[0] += 1
            if deltas is not None:
                assert ready, "more swaps than deltas written"
                new, files = ready.pop()
            else:
                new = write_bundle(bundles, model, bundle.vocab, meta(published[0]), keep=3,
                                   two_stage=bundle.two_stage)
                files = bundle_files(bundles, new)
            sent_bytes[0] += sum(len(data) for _, data in files)
            topic.publish(new, files)
            stop.wait(2.0)

    def sampler() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            done.wait(0.05)

    swaps0 = scrape(f"{url}/metrics", "advrec_model_swaps_total")
    totals: dict[str, tuple[list[float], int, float]] = {
        "steady": ([], 0, 0.0), "swapping": ([], 0, 0.0)}
    watcher = threading.Thread(target=sampler)
    watcher.start()
    try:
        for _ in range(rounds):
            for side in ("steady", "swapping"):
                stop = threading.Event()
                thread = (threading.Thread(target=swapper, args=(stop,))
                          if side == "swapping" else None)
                if thread is not None:
                    thread.start()
                try:
                    lat, err, el = asyncio.run(_load(url, paths, 8, seconds * 2 / rounds))
                finally:
                    stop.set()
                    if thread is not None:
                        thread.join()
                prev = totals[side]
                totals[side] = (prev[0] + lat, prev[1] + err, prev[2] + el)
    finally:
        done.set()
        watcher.join()
    steady, swapping = _stats(*totals["steady"]), _stats(*totals["swapping"])
    return {"steady": steady, "swapping": swapping, "published": published[0],
            "kind": "full" if deltas is None else "delta",
            "written_ahead": deltas is not None,
            "delta_rows": None if deltas is None else deltas[0],
            "delta_items": None if deltas is None else deltas[1],
            "mean_bytes_published": sent_bytes[0] / max(1, published[0]),
            "swaps": scrape(f"{url}/metrics", "advrec_model_swaps_total") - swaps0,
            "p99_ratio": swapping["p99_ms"] / steady["p99_ms"], "rss_peak_mib": peak[0],
            "rss_before_swaps_mib": before}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    p.add_argument("--delta-rows", type=int, default=20000,
                   help="with the two-stage parts: rows each swap's delta changes")
    p.add_argument("--delta-items", type=int, default=10,
                   help="with the two-stage parts: items each swap's delta adds")
    p.add_argument("--full-swaps", action="store_true",
                   help="publish each swap as a whole bundle, not as a delta")
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    args = p.parse_args()
    run_dir = Path("var") / f"bench-serve-{tag()}"
    bundles = run_dir / "bundles"
    version = make_bundle(bundles, args.items)
    n_items = len(load_bundle(bundles, version).vocab)
    topic = f"bench-serve-{tag()}"
    asyncio.run(ensure_topics(args.bootstrap, default_topics(
        clicks=topic, dlq=topic + "-dlq", train=topic + "-train")))
    now = int(time.time() * 1000) - 3_600_000
    events = [ClickEvent(f"user{u}", f"i{(u * 37 + j * 11) % n_items}", now + u * 100 + j)
              for u in range(500) for j in range(50)]
    asyncio.run(produce(args.bootstrap, topic, [(encode_key(e.user), encode_event(e))
                                                for e in events], progress=False))
    paths = [f"/recommendations/user{u}?k=10" for u in range(500)]
    result: dict = {"settings": vars(args), "machine": machine(), "n_items": n_items,
                    "runs": {},
                    # the workers inherit this process's environment: settings changed there
                    "worker_env": {k: v for k, v in os.environ.items()
                                   if k.startswith("ADVREC_")}}
    # the same path with a much cheaper model (same 10k items, d=8, one layer): how far
    # the HTTP, state and batching path stays from the no-op when the model costs little
    tiny = run_dir / "tiny-bundles"
    tiny_version = make_bundle(tiny, args.items, d_model=8, n_heads=1, n_layers=1)
    main_topic = BundleTopic(args.bootstrap, f"{topic}-bundles")
    main_topic.publish(version, bundle_files(bundles, version))
    tiny_topic = BundleTopic(args.bootstrap, f"{topic}-tiny-bundles")
    tiny_topic.publish(tiny_version, bundle_files(tiny, tiny_version))
    rows = []
    for label, micro, bundle_topic in (("microbatch", "32", main_topic),
                                       ("no_microbatch", "1", main_topic),
                                       ("tiny_model", "32", tiny_topic)):
        env = {"ADVREC_BROKER": f"kafka://{args.bootstrap}", "ADVREC_TOPIC_CLICKS": topic,
               "ADVREC_TOPIC_DLQ": topic + "-dlq", "ADVREC_TOPIC_TRAIN": topic + "-train",
               "ADVREC_TOPIC_BUNDLES": bundle_topic.topic, "ADVREC_APP_ID": f"bench-{tag()}",
               "ADVREC_BUNDLE_DIR": str(run_dir / f"cache-{tag()}"),
               "ADVREC_MICROBATCH_MAX": micro, "ADVREC_LOG_LEVEL": "warning"}
        # a worker that starts reads the topic: after the swap phase, a full bundle and
        # the chain of deltas since, rebuilt in order, then the index of the newest built
        started = time.monotonic()
        proc, url = start_worker(run_dir, env, timeout=900)
        result.setdefault("ready_s", {})[label] = time.monotonic() - started
        try:
            deadline = time.monotonic() + 600  # a 1M-item bundle's index takes ~75 s
            while scrape(f"{url}/metrics", "advrec_model_swaps_total") < 1:
                assert time.monotonic() < deadline, "no model swapped in"
                time.sleep(0.5)
            deadline = time.monotonic() + 120
            while scrape(f"{url}/metrics", "advrec_events_consumed_total") < len(events):
                assert time.monotonic() < deadline, "events not consumed"
                time.sleep(0.5)
            for c in (32,) if label == "tiny_model" else (1, 8, 32):
                calls0 = scrape(f"{url}/metrics", "advrec_microbatch_size_count")
                rec, noop = side_by_side(url, paths, ["/noop"], c, args.seconds, proc.pid)
                calls = scrape(f"{url}/metrics", "advrec_microbatch_size_count") - calls0
                rec["mean_microbatch"] = rec["requests"] / max(calls, 1)
                spread = round_ratios(rec, noop)
                result["runs"][f"{label}/c{c}"] = {"recommendations": rec, "noop": noop,
                                                    "ratio": rec["rps"] / noop["rps"],
                                                    "ratio_by_round": spread}
                rows.append((f"{label} c={c}",
                             f"rec {rec['rps']:7.0f}/s p50 {rec['p50_ms']:6.2f} p99 "
                             f"{rec['p99_ms']:6.2f} ms | noop {noop['rps']:7.0f}/s | "
                             f"ratio {rec['rps'] / noop['rps']:.2f} (slices {min(spread):.2f}"
                             f"-{max(spread):.2f}) | errors {rec['errors']}"))
                if c == 32:
                    for name, side in (("rec", rec), ("noop", noop)):
                        us = side["cpu_us_per_request"]
                        rows.append((f"{label} c=32 {name} CPU" + (
                                         f" (mean batch {rec['mean_microbatch']:.1f})"
                                         if name == "rec" else ""),
                                     f"worker loop {us['worker_loop']:.0f} + other threads "
                                     f"{us['worker_other']:.0f} + client {us['client']:.0f} "
                                     "us per request"))
            if label == "microbatch":
                # steady vs. a swap every 2 s, and memory above the no-model baseline
                staged = load_bundle(bundles, version, model=False).two_stage is not None
                result["swap"] = measure_swaps(
                    url, paths, proc.pid, bundles, version, main_topic, args.seconds,
                    deltas=None if args.full_swaps or not staged
                    else (args.delta_rows, args.delta_items))
                swap = result["swap"]
                rows.append(("steady c=8", f"p99 {swap['steady']['p99_ms']:.2f} ms"))
                rows.append(("swap every 2 s c=8",
                             f"p99 {swap['swapping']['p99_ms']:.2f} ms ({swap['swaps']:.0f} "
                             f"swaps of {swap['kind']} bundles, "
                             f"{swap['mean_bytes_published'] / 1e6:.1f} MB each, "
                             f"{swap['swapping']['errors']} errors) -> "
                             f"{swap['p99_ratio']:.2f}x steady"))
        finally:
            proc.terminate()
            proc.wait(60)
    # memory of one loaded session above the process baseline: a worker without a model
    empty_topic = BundleTopic(args.bootstrap, f"{topic}-empty-bundles")
    env["ADVREC_TOPIC_BUNDLES"] = empty_topic.topic
    env["ADVREC_BUNDLE_DIR"] = str(run_dir / "empty-cache")
    env["ADVREC_MICROBATCH_MAX"] = "32"
    env["ADVREC_APP_ID"] = f"bench-{tag()}"
    proc, url = start_worker(run_dir, env)
    try:
        time.sleep(3)
        base = rss_mib(proc.pid)
        newest = list_versions(bundles)[-1]  # the swaps above pruned the first version
        # its whole files (a delta's are written whole here too): a worker that starts on
        # this topic has no base to rebuild a delta from
        path = bundles / newest
        whole = sorted((p.name for p in path.iterdir()), key=lambda n: n == "meta.json")
        empty_topic.publish(newest, [(name, (path / name).read_bytes()) for name in whole])
        deadline = time.monotonic() + 600
        while scrape(f"{url}/metrics", "advrec_model_swaps_total") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(2)
        one = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    model_mib = max(one - base, 1e-6)
    swap = result["swap"]
    swap["rss_baseline_mib"] = base
    swap["rss_one_model_mib"] = one
    swap["swap_memory_vs_one_model"] = (swap["rss_peak_mib"] - base) / model_mib
    rows.append(("memory", f"baseline {base:.0f} MiB, +1 model {one - base:.0f} MiB, peak "
                           f"during swaps {swap['rss_peak_mib'] - base:.0f} MiB above baseline "
                           f"= {swap['swap_memory_vs_one_model']:.2f}x one model (the serving "
                           f"worker held {swap['rss_before_swaps_mib'] - base:.0f} MiB above "
                           "baseline before its first swap)"))
    result["goals"] = {"recommendations_vs_noop_c32": ">= 0.5", "swap_p99_vs_steady": "<= 1.5",
                       "swap_memory_vs_one_model": "<= 2.2"}
    if n_items >= 200_000:  # issue 23's goals for a large catalogue
        result["goals"] = {"recommendations_vs_noop_c32": ">= 0.3", "p99_c32_ms": "<= 25",
                           "swap_p99_vs_steady": "<= 1.5", "rss_one_model_mib": "<= 2048"}
    for bundle_topic in (main_topic, tiny_topic, empty_topic):
        bundle_topic.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    path = write_result("serve" if n_items == 10_000 else f"serve-{n_items}", result)
    print_table(f"bench/serve ({n_items} items)", [*rows, ("results", str(path))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
