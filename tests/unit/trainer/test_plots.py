"""Tests of the evaluation plots: each writes a non-empty PNG from small inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer import plots
from trainer.evaluate import MethodRun


def _run(method: str, seed: int, with_losses: bool) -> MethodRun:
    rng = np.random.default_rng(seed)
    curves = [{"batch": float(b), **({"loss_g": 5.0 - b / 10, "loss_d": 1.3, "d_acc": 0.6}
                                     if with_losses else {})} for b in range(30)]
    return MethodRun(method, seed, rng.integers(0, 40, 500), {}, curves, [],
                     [{"batch": 1, "fraction": 0.5, "real": rng.normal(1, 1, 50).tolist(),
                       "fake": rng.normal(-1, 1, 50).tolist()}] if with_losses else [],
                     rng.normal(size=(40, 8)) if with_losses else None,
                     rng.integers(0, 9, 40) if with_losses else None)


def test_rolling_mean_matches_hand_computed() -> None:
    assert plots.rolling(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]


def test_prequential_plots_write_pngs(tmp_path: Path) -> None:
    runs = [_run("pop", 0, False), _run("irgan", 0, True), _run("irgan", 1, True)]
    paths = plots.prequential_plots(tmp_path, runs)
    names = {p.name for p in paths}
    assert {"stream_hr10.png", "stream_ndcg10.png", "training.png", "d_scores_irgan.png",
            "pca_items_irgan.png"} <= names
    assert all(p.stat().st_size > 1000 for p in paths)


def test_plot_loo_validation(tmp_path: Path) -> None:
    path = plots.plot_loo_validation(
        {"none": [{"epoch": 1.0, "ndcg@10": 0.01}, {"epoch": 2.0, "ndcg@10": 0.02}]},
        tmp_path / "v.png")
    assert path.stat().st_size > 1000
