"""Choosing the worker's nearest-neighbour library: faiss-cpu, usearch (hnswlib has no wheel
for Python 3.11 here: pip offers only its source) over an item table of ``--items`` rows.

The table has the planted shape of the synthetic world (advrec/synthetic.py): items in
clusters, each vector its cluster's centre plus noise, and a few rows much longer than the
rest (popular items score high for everyone under an inner product). User vectors are a
centre plus noise too. For each library and setting: build time, query latency at batch 1
and 32 (one thread, as the worker runs it), and recall@10: the share of the exact top 10 by
inner product found among the ``--candidates`` rows the index returns (what two-stage
serving rescores), and among its top 10. Writes bench/results/ann-choice.json; with
``--sweep``, bench/results/ann-sweep.json (the chosen index at several breadths).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, print_table, rss_mib, write_result


def planted_table(n_items: int, dim: int, n_clusters: int, seed: int) -> np.ndarray:
    """Item vectors [n_items + 1, dim] float32 with planted clusters; row 0 (padding) is 0."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)).astype(np.float32)  # (K, D)
    cluster = rng.integers(0, n_clusters, n_items)  # (V,)
    table = centres[cluster] + rng.normal(scale=0.8, size=(n_items, dim)).astype(np.float32)
    # popularity: a Zipf-like spread of norms, as trained rows of popular items grow longer
    table *= (1.0 + 0.5 * rng.pareto(3.0, size=(n_items, 1))).astype(np.float32)
    return np.concatenate([np.zeros((1, dim), np.float32), table]).astype(np.float32) * 0.1


def user_vectors(table: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Queries [n, D]: a random item's vector plus noise (a user near one taste)."""
    rng = np.random.default_rng(seed + 1)
    base = table[rng.integers(1, len(table), n)]
    return (base + rng.normal(scale=0.05, size=base.shape)).astype(np.float32)


def exact_top(table: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows by inner product [n, k], row 0 excluded."""
    out = []
    for q in queries:
        s = table @ q  # (V+1,)
        s[0] = -np.inf
        top = np.argpartition(-s, k)[:k]
        out.append(top[np.argsort(-s[top])])
    return np.array(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t)
                          for f, t in zip(found, truth, strict=True)]))


def timed_queries(search: Any, queries: np.ndarray, n: int, batch: int) -> dict[str, float]:
    """p50 and p99 ms per call of ``search(queries[i:i+batch], n)`` over the queries."""
    times = []
    for i in range(0, len(queries) - batch + 1, batch):
        t = time.perf_counter()
        search(queries[i : i + batch], n)
        times.append(time.perf_counter() - t)
    times.sort()
    return {"p50_ms": times[len(times) // 2] * 1e3,
            "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3}


def faiss_hnsw(table: np.ndarray, m: int, ef_construction: int, ef_search: int) -> Any:
    import faiss

    index = faiss.IndexHNSWFlat(table.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(table)
    index.hnsw.efSearch = ef_search

    def search(q: np.ndarray, n: int) -> np.ndarray:
        index.hnsw.efSearch = max(ef_search, n)
        return index.search(q, n)[1]

    def search_at_breadth(q: np.ndarray, n: int) -> np.ndarray:
        index.hnsw.efSearch = n  # the breadth is the number of candidates asked for
        return index.search(q, n)[1]

    search.at_breadth = search_at_breadth  # type: ignore[attr-defined]
    return search


def faiss_ivf(table: np.ndarray, nlist: int, nprobe: int) -> Any:
    import faiss

    quantizer = faiss.IndexFlatIP(table.shape[1])
    index = faiss.IndexIVFFlat(quantizer, table.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    index.train(table[rng.choice(len(table), min(len(table), 40 * nlist), replace=False)])
    index.add(table)
    index.nprobe = nprobe

    def search(q: np.ndarray, n: int) -> np.ndarray:
        return index.search(q, n)[1]
    return search


def usearch_hnsw(table: np.ndarray, connectivity: int, expansion_add: int,
                 expansion_search: int, dtype: str) -> Any:
    from usearch.index import Index

    index = Index(ndim=table.shape[1], metric="ip", dtype=dtype, connectivity=connectivity,
                  expansion_add=expansion_add, expansion_search=expansion_search)
    index.add(np.arange(len(table)), table, threads=1)

    def search(q: np.ndarray, n: int) -> np.ndarray:
        found = index.search(q, n, threads=1)
        keys = found.keys  # (B, n) or (n,) for one query
        return keys.reshape(len(q), -1)
    return search


NOT_MEASURED = {"hnswlib": "no wheel for Python 3.11 here: pip offers only hnswlib-0.8.0.tar.gz "
                          "(a C++ build), so it is no candidate for the worker's image"}
CANDIDATES = {
    "faiss-hnsw-m16": lambda t: faiss_hnsw(t, 16, 80, 200),
    "faiss-ivf-flat-1024": lambda t: faiss_ivf(t, 1024, 16),
    "usearch-hnsw-c16-f32": lambda t: usearch_hnsw(t, 16, 80, 200, "f32"),
    "usearch-hnsw-c16-f16": lambda t: usearch_hnsw(t, 16, 80, 200, "f16"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64, help="the trainer's default d_model")
    p.add_argument("--clusters", type=int, default=20)
    p.add_argument("--queries", type=int, default=320)
    p.add_argument("--candidates", type=int, default=200, help="rows retrieved per query")
    p.add_argument("--only", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", type=int, nargs="*", default=[],
                   help="also measure the chosen index (faiss-hnsw-m16) returning this many "
                        "candidates (= HNSW's efSearch), one build")
    args = p.parse_args()
    import faiss

    faiss.omp_set_num_threads(1)  # the worker builds and queries on one core
    table = planted_table(args.items, args.dim, args.clusters, args.seed)
    queries = user_vectors(table, args.queries, args.seed)
    truth = exact_top(table, queries, 10)
    result: dict[str, Any] = {"settings": vars(args), "machine": machine(), "libraries": {},
                              "not_measured": NOT_MEASURED}
    rows = []
    for name in args.only:
        rss0 = rss_mib(os.getpid())
        t = time.perf_counter()
        search = CANDIDATES[name](table)
        build = time.perf_counter() - t
        rss1 = rss_mib(os.getpid())
        found = search(queries, args.candidates)
        entry = {"build_s": build, "rss_growth_mib": rss1 - rss0,
                 f"recall10_at_{args.candidates}": recall(found, truth),
                 "recall10_at_10": recall(search(queries, 10), truth),
                 "batch1": timed_queries(search, queries, args.candidates, 1),
                 "batch32": timed_queries(search, queries, args.candidates, 32)}
        result["libraries"][name] = entry
        rows.append((name, f"build {build:6.1f} s | recall@10 in {args.candidates} "
                           f"{entry[f'recall10_at_{args.candidates}']:.3f}, in 10 "
                           f"{entry['recall10_at_10']:.3f} | b1 p50 "
                           f"{entry['batch1']['p50_ms']:.2f} ms | b32 p50 "
                           f"{entry['batch32']['p50_ms']:.2f} p99 "
                           f"{entry['batch32']['p99_ms']:.2f} ms | +{rss1 - rss0:.0f} MiB"))
        print(rows[-1][0], rows[-1][1], flush=True)
        if name == "faiss-hnsw-m16":
            at = search.at_breadth
            for n in args.sweep:  # efSearch = n: the breadth is what costs and finds
                sweep = {"recall10_at_n": recall(at(queries, n), truth),
                         "batch1": timed_queries(at, queries, n, 1),
                         "batch32": timed_queries(at, queries, n, 32)}
                result.setdefault("sweep", {})[str(n)] = sweep
                rows.append((f"  {name} n={n}", f"recall@10 {sweep['recall10_at_n']:.3f} | b1 "
                                                f"p50 {sweep['batch1']['p50_ms']:.2f} ms | b32 "
                                                f"p50 {sweep['batch32']['p50_ms']:.2f} p99 "
                                                f"{sweep['batch32']['p99_ms']:.2f} ms"))
                print(*rows[-1], flush=True)
        del search
    path = write_result("ann-sweep" if args.sweep else "ann-choice", result)
    print_table(f"bench/ann ({args.items} items x {args.dim})", [*rows, ("results", str(path))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
