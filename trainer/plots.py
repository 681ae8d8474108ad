"""PNG plots of evaluation runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after matplotlib.use: the backend must be chosen first
import numpy as np

if TYPE_CHECKING:
    from trainer.evaluate import MethodRun

__all__ = [
    "plot_cold_start",
    "plot_d_scores",
    "plot_item_pca",
    "plot_loo_validation",
    "plot_metric_over_stream",
    "plot_training",
    "prequential_plots",
    "rolling",
]

SMOOTH = 2000  # scored events per rolling window of the stream curves


def _file_name(method: str) -> str:
    """A method's name as a file name part (``apr+cooc/filter|bandwagon`` has three
    characters that paths and shells dislike)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", method)


def _save(fig: Any, path: Path) -> None:
    """Lay out, write the PNG and free the figure (pyplot keeps every open one)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rolling(values: np.ndarray, window: int) -> np.ndarray:
    """Return the trailing mean over ``window`` values (shorter at the start)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    c = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def _hits(ranks: np.ndarray, k: int) -> np.ndarray:
    return ((ranks >= 1) & (ranks <= k)).astype(np.float64)


def _ndcg(ranks: np.ndarray, k: int) -> np.ndarray:
    hit = (ranks >= 1) & (ranks <= k)
    return np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 1) + 1.0), 0.0)


def plot_metric_over_stream(runs: Sequence[MethodRun], path: Path, metric: str = "hr",
                            k: int = 10, window: int = SMOOTH) -> Path:
    """Plot a rolling metric over the scored events, one line per method (mean of seeds)."""
    fn = _hits if metric == "hr" else _ndcg
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method in dict.fromkeys(r.method for r in runs):
        curves = [rolling(fn(r.ranks, k), window) for r in runs if r.method == method]
        n = min(c.size for c in curves)
        if n == 0:
            continue
        ax.plot(np.arange(n), np.mean([c[:n] for c in curves], axis=0), label=method, lw=1.2)
    ax.set_xlabel("scored events (replay order)")
    ax.set_ylabel(f"{metric.upper()}@{k} (trailing {window} events)")
    ax.set_title(f"Prequential {metric.upper()}@{k} over the stream")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def plot_training(runs: Sequence[MethodRun], path: Path, window: int = 20) -> Path:
    """Plot G's loss, D's loss and D's accuracy per batch for the first seed of each mode."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    seen: set[str] = set()
    for r in runs:
        if r.method in seen or not r.curves or "loss_g" not in r.curves[-1]:
            continue
        seen.add(r.method)
        for ax, key in zip(axes, ("loss_g", "loss_d", "d_acc"), strict=True):
            y = np.array([row.get(key, np.nan) for row in r.curves], dtype=np.float64)
            if np.all(np.isnan(y)):
                continue
            ok = ~np.isnan(y)
            ax.plot(np.flatnonzero(ok), rolling(y[ok], window), label=r.method, lw=1.2)
    for ax, title in zip(axes, ("G loss (ML + adversarial terms)", "D loss (BCE real vs G)",
                                "D accuracy (real vs G samples)"), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("batch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    _save(fig, path)
    return path


def plot_d_scores(snapshots: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Histogram D's logits on real next items vs G's samples at a few points in training."""
    n = max(1, len(snapshots))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for ax, snap in zip(axes[0], snapshots, strict=False):
        real, fake = np.asarray(snap["real"]), np.asarray(snap["fake"])
        both = np.concatenate([real, fake]) if real.size + fake.size else np.zeros(1)
        bins = np.linspace(both.min(), both.max() + 1e-9, 30)
        ax.hist(real, bins=bins, alpha=0.6, label="real next item", color="tab:green")
        ax.hist(fake, bins=bins, alpha=0.6, label="sampled from G", color="tab:red")
        ax.set_title(f"{snap['fraction']:.0%} of the stream", fontsize=9)
        ax.set_xlabel("D logit")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or "Discriminator scores", fontsize=10)
    _save(fig, path)
    return path


def plot_item_pca(embeddings: np.ndarray, counts: np.ndarray, path: Path,
                  title: str = "") -> Path:
    """Scatter the first two principal components of item embeddings, coloured by clicks."""
    x = np.asarray(embeddings, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if x.shape[0] >= 2:
        x = x - x.mean(axis=0)
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        xy = x @ vt[:2].T  # (V, 2)
        var = (s[:2] ** 2) / max(float((s**2).sum()), 1e-12)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=np.log1p(counts[: len(xy)]), s=3,
                        cmap="viridis", alpha=0.7)
        fig.colorbar(sc, ax=ax, label="log(1 + clicks as target)")
        ax.set_xlabel(f"PC1 ({var[0]:.0%})")
        ax.set_ylabel(f"PC2 ({var[1]:.0%})" if var.size > 1 else "PC2")
    ax.set_title(title or "Item embeddings (PCA)", fontsize=10)
    _save(fig, path)
    return path


def plot_loo_validation(history: dict[str, list[dict[str, float]]], path: Path,
                        metric: str = "ndcg@10") -> Path:
    """Plot the validation metric per epoch for each mode (leave-one-out protocol)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, rows in history.items():
        ax.plot([r["epoch"] for r in rows], [r[metric] for r in rows], marker="o", label=mode)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def plot_target_exposure(runs: Sequence[MethodRun], path: Path, window: int = 10) -> Path:
    """Plot the share of real users' top-10 lists holding an attack's target, per batch
    (trailing ``window`` batches), one line per method (mean of seeds)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method in dict.fromkeys(r.method for r in runs):
        lines = []
        for r in (r for r in runs if r.method == method):
            hits = np.diff([0.0, *[c.get("target_hits", 0.0) for c in r.curves]])
            lists = np.diff([0.0, *[c.get("target_lists", 0.0) for c in r.curves]])
            kernel = np.ones(window)
            lines.append(np.convolve(hits, kernel)[: hits.size]
                         / np.maximum(np.convolve(lists, kernel)[: lists.size], 1.0))
        n = min(x.size for x in lines)
        events = [c["events"] for c in next(r for r in runs if r.method == method).curves][:n]
        ax.plot(events, np.mean([x[:n] for x in lines], axis=0), label=method, lw=1.2)
    ax.set_xlabel("events replayed")
    ax.set_ylabel(f"real users' top-10 lists holding a target (trailing {window} batches)")
    ax.set_title("Target exposure over the stream")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def plot_suspicion(runs: Sequence[MethodRun], path: Path, threshold: float) -> Path:
    """Histogram of each scored user's highest P(fake), as log-odds, real vs fake users."""
    real = [p for r in runs for _, f, p in r.suspicion if not f]
    fake = [p for r in runs for _, f, p in r.suspicion if f]
    logit = lambda p: np.log(np.clip(p, 1e-12, 1 - 1e-12) / np.clip(1 - p, 1e-12, None))  # noqa: E731
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bins = np.linspace(-40, 40, 81)
    for name, vals in (("real users", real), ("fake users", fake)):
        if vals:
            ax.hist(np.clip(logit(np.asarray(vals)), -40, 40), bins=bins, alpha=0.6,
                    label=f"{name} ({len(vals)})", density=True)
    ax.axvline(float(logit(np.asarray(threshold))), color="k", ls="--", lw=1, label="threshold")
    ax.set_xlabel("highest log-odds of P(fake) while the user's clicks arrived")
    ax.set_ylabel("density")
    ax.set_title("Detector scores of real and fake users")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def plot_cold_start(runs: Sequence[MethodRun], path: Path) -> Path:
    """Plot HR@10 by the user's past events (0: the trending list) and by the target's past
    clicks (0: items nobody clicked before), one line per method, mean and spread of seeds."""
    from trainer.evaluate import ITEM_BUCKETS, USER_BUCKETS, bucket_name

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind, buckets, xlabel in (
            (axes[0], "user", USER_BUCKETS, "user's past events (0: first click, trending list)"),
            (axes[1], "item", ITEM_BUCKETS, "target's past clicks (0: never clicked)")):
        names = [bucket_name(b) for b in buckets]
        for method in dict.fromkeys(r.method for r in runs):
            vals = np.array([[r.metrics[f"cold_{kind}_hr@10:{n}"] for n in names]
                             for r in runs if r.method == method])  # (seeds, buckets)
            ax.errorbar(range(len(names)), vals.mean(axis=0), yerr=vals.std(axis=0),
                        marker="o", capsize=3, lw=1.2, label=method)
        sizes = [runs[0].metrics[f"cold_{kind}_n:{n}"] for n in names]
        ax.set_xticks(range(len(names)), [f"{n}\n({s:.0f})" for n, s in zip(names, sizes,
                                                                              strict=True)])
        ax.set_xlabel(xlabel + ", (events)")
        ax.set_ylabel("HR@10")
        ax.grid(alpha=0.3)
    axes[0].set_title("Cold users")
    axes[1].set_title("Cold items")
    axes[1].legend(fontsize=8)
    _save(fig, path)
    return path


def prequential_plots(out: Path, runs: Sequence[MethodRun],
                      threshold: float | None = None) -> list[Path]:
    """Write every plot of a prequential run into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_metric_over_stream(runs, out / "stream_hr10.png", "hr", 10),
             plot_metric_over_stream(runs, out / "stream_ndcg10.png", "ndcg", 10)]
    if runs and all("cold_item_hr@10:0" in r.metrics for r in runs):
        paths.append(plot_cold_start(runs, out / "cold_start.png"))
    if any(r.curves and "target_hits" in r.curves[-1] for r in runs):
        paths.append(plot_target_exposure(runs, out / "target_exposure.png"))
    attacked = [r for r in runs if r.suspicion and "|" in r.method]
    if attacked and threshold is not None:
        firsts = {id(r.suspicion): r for r in attacked}  # one per replay (shared detector)
        paths.append(plot_suspicion(list(firsts.values()), out / "suspicion.png", threshold))
    if any(r.curves and "loss_g" in r.curves[-1] for r in runs):
        paths.append(plot_training(runs, out / "training.png"))
    for r in runs:
        if r.d_snapshots:
            name = _file_name(r.method)
            paths.append(plot_d_scores(r.d_snapshots, out / f"d_scores_{name}.png",
                                       f"D logits, {r.method}, seed {r.seed}"))
    firsts = {r.method: r for r in reversed(runs) if r.embeddings is not None and r.seed == 0}
    for method, r in firsts.items():
        assert r.embeddings is not None and r.embedding_counts is not None
        name = _file_name(method)
        paths.append(plot_item_pca(r.embeddings, r.embedding_counts,
                                   out / f"pca_items_{name}.png",
                                   f"G item embeddings, {method} (PCA)"))
    return paths
