"""Tests of ``advrec evaluate``: ranking plumbing, the prequential run, leave-one-out, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from advrec.contract import ClickEvent, TrainingExample
from advrec.datasets import load_events
from tests.datasets import MOVIELENS_SLICE
from trainer import evaluate, offline
from trainer.evaluate import build_examples, run_prequential
from trainer.metrics import OUT_OF_LIST
from trainer.model import ModelConfig

ML = MOVIELENS_SLICE  # real ratings shipped with the tests (tests/data/README.md)
TINY = ModelConfig(n_items=64, max_len=8, d_model=16, n_heads=1, n_layers=1, d_disc=8)


def _events(pairs: list[tuple[str, str]]) -> list[ClickEvent]:
    return [ClickEvent(user=u, item=i, ts=1_500_000_000_000 + k) for k, (u, i) in enumerate(pairs)]


# ---------------------------------------------------------------------------- prequential


def test_build_examples_history_is_last_l_items() -> None:
    ex = list(build_examples(_events([("u", "a"), ("u", "b"), ("v", "a"), ("u", "c")]), 1))
    assert [e.history for e in ex] == [(), ("a",), (), ("b",)]
    ex = list(build_examples(_events([("u", "a"), ("u", "b"), ("u", "c")]), 5))
    assert ex[2].history == ("a", "b")


def test_prequential_first_event_not_scored_and_unknown_target_missed() -> None:
    # batch 1 teaches a, b; batch 2: u's re-click of a (in its past), v's first event
    # (not scored), w's click on never-seen z (a miss), x's click on b after a.
    pairs = [("u", "a"), ("x", "a"), ("x", "b"), ("u", "b"),
             ("u", "a"), ("v", "a"), ("w", "a"), ("w", "z")]
    examples = list(build_examples(_events(pairs), 10))
    run_a = run_prequential(examples, "pop", variant="A", batch_size=4, n_windows=2)
    run_b = run_prequential(examples, "pop", variant="B", batch_size=4, n_windows=2)
    # scored: batch 1 has x->b, u->b with nothing known yet (misses); batch 2: u->a, w->z
    assert run_a.metrics["n_scored"] == 4
    assert run_a.metrics["n_unknown_target"] == 3  # both of batch 1, and z
    assert run_a.metrics["n_target_in_past"] == 1  # u re-clicks a
    # A: the re-click is out of the list: a miss, even among only two items
    assert run_a.ranks.tolist() == [0, 0, OUT_OF_LIST, 0] and run_a.metrics["hr@10"] == 0.0
    # B: a and b were clicked twice each, b more recently (recency decay): a ranks second
    assert run_b.ranks.tolist() == [0, 0, 2, 0]
    assert run_b.metrics["hr@10"] == pytest.approx(0.25)


def test_prequential_neural_mode_records_losses_and_d_scores() -> None:
    rng = np.random.default_rng(0)
    pairs = [(f"u{rng.integers(8)}", f"i{rng.integers(20)}") for _ in range(160)]
    examples = list(build_examples(_events(pairs), 8))
    run = run_prequential(examples, "irgan", batch_size=32, model_cfg=TINY, record_d=True)
    assert run.metrics["n_scored"] == sum(1 for e in examples if e.history)
    assert {"loss_g", "loss_d", "d_acc"} <= set(run.curves[-1])
    assert run.d_snapshots and len(run.d_snapshots[-1]["real"]) > 0
    assert run.embeddings is not None and run.embeddings.shape[1] == TINY.d_model
    assert 0 < run.metrics["coverage@10"] <= 1


def test_evaluate_cli_end_to_end_on_movielens(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = evaluate.main(["--dataset", "movielens", str(ML), "--limit", "3000",
                        "--methods", "pop,knn,none,irgan", "--seeds", "2", "--out", str(out),
                        "--plots", "--no-progress", "--dim", "16", "--layers", "1",
                        "--max-len", "10"])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["variant"] == "A" and doc["dataset"]["events"] == 3000
    assert set(doc["summary"]) == {"pop", "knn", "none", "irgan"}
    assert doc["summary"]["none"]["n_seeds"]["n"] == 2
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert {r["method"] for r in rows} == {"pop", "knn", "none", "irgan"}
    for name in ("stream_hr10.png", "training.png", "d_scores_irgan.png", "pca_items_none.png"):
        assert (out / name).stat().st_size > 1000, name
    assert "hr@10" in capsys.readouterr().out


def test_first_seed_reruns_exactly_one_seed_of_a_longer_run(tmp_path: Path) -> None:
    common = ["--dataset", "movielens", str(ML), "--limit", "1500", "--methods", "none",
              "--no-progress", "--dim", "16", "--layers", "1", "--max-len", "8"]
    assert evaluate.main([*common, "--seeds", "2", "--out", str(tmp_path / "both")]) == 0
    assert evaluate.main([*common, "--seeds", "1", "--first-seed", "1",
                          "--out", str(tmp_path / "second")]) == 0
    both = json.loads((tmp_path / "both" / "results.json").read_text())["runs"]
    second = json.loads((tmp_path / "second" / "results.json").read_text())["runs"]
    assert [r["seed"] for r in both] == [0, 1] and [r["seed"] for r in second] == [1]
    def quality(run: dict) -> dict:
        return {k: v for k, v in run["metrics"].items() if k != "seconds"}

    assert quality(second[0]) == quality(both[1]) != quality(both[0])


def test_replays_run_in_parallel_jobs_give_the_same_results_in_the_same_order(
        tmp_path: Path) -> None:
    common = ["--dataset", "movielens", str(ML), "--limit", "1500", "--methods", "none,pop",
              "--seeds", "2", "--no-progress", "--dim", "16", "--layers", "1",
              "--max-len", "8", "--attack", "random", "--attack-budget", "0.05",
              "--defence", "both"]
    assert evaluate.main([*common, "--out", str(tmp_path / "one")]) == 0
    assert evaluate.main([*common, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0

    def runs(name: str) -> list[tuple[str, int, dict]]:
        doc = json.loads((tmp_path / name / "results.json").read_text())
        return [(r["method"], r["seed"], {k: v for k, v in r["metrics"].items()
                                          if k != "seconds"}) for r in doc["runs"]]

    one = runs("one")
    assert {m for m, _, _ in one} == {"none", "none/filter", "pop", "none|random",
                                      "none/filter|random", "pop|random"}
    assert runs("two") == one


def test_results_record_each_runs_own_method_seed_and_settings(tmp_path: Path) -> None:
    common = ["--dataset", "movielens", str(ML), "--limit", "600", "--methods", "irgan,knn",
              "--seeds", "2", "--first-seed", "3", "--no-progress", "--dim", "16",
              "--layers", "1", "--max-len", "8", "--lr", "0.01"]
    assert evaluate.main([*common, "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    neural = [r for r in runs if r["method"] == "irgan"]
    assert [(r["seed"], r["settings"]["train"]["seed"]) for r in neural] == [(3, 3), (4, 4)]
    assert {r["settings"]["train"]["mode"] for r in neural} == {"irgan"}
    assert {r["settings"]["train"]["lr"] for r in neural} == {0.01}
    assert neural[0]["settings"]["model"]["d_model"] == 16
    (knn,) = [r for r in runs if r["method"] == "knn"]
    assert knn["settings"]["baseline"] == "ItemKNN" and "n_recent" in knn["settings"]


# ---------------------------------------------------------------------------- leave-one-out


def _sequences(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    lines = []
    for u in range(40):  # each user walks a ring of 12 items: next = previous + 1
        start = int(rng.integers(12))
        lines.append(f"u{u} " + " ".join(f"i{(start + k) % 12}" for k in range(7)))
    path = tmp_path / "seqs.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loo_selects_on_validation_and_tests_once(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    split = offline.loo_split(load_events("sequences", _sequences(tmp_path)), 8)
    assert len(split.valid) == len(split.test) == 40
    assert len(split.train) == 40 * 4  # positions 1..4 of 7 (5: validation, 6: test)
    assert split.test[0].history[-1] == split.valid[0].item
    calls: list[str] = []
    real = offline.evaluate_split

    def counting(model, examples, seen, split_name, chunk=1024):  # type: ignore[no-untyped-def]
        calls.append(split_name)
        return real(model, examples, seen, split_name, chunk)

    monkeypatch.setattr(offline, "evaluate_split", counting)
    res = offline.run_loo(split, ["none"], epochs=4, patience=10, batch_size=32,
                          model_cfg=TINY)
    r = res["methods"]["none"]
    vals = [h[offline.SELECT_ON] for h in r["history"]]
    assert r["best_epoch"] == int(np.argmax(vals)) + 1
    assert calls.count("test") == 1 and calls.count("valid") == 4
    assert calls[-1] == "test"
    assert res["selected"] == "none"


def test_loo_cli_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "loo"
    rc = evaluate.main(["--protocol", "loo", "--dataset", "sequences",
                        str(_sequences(tmp_path)), "--methods", "pop,none", "--epochs", "2",
                        "--out", str(out), "--no-progress", "--dim", "16", "--layers", "1",
                        "--max-len", "8", "--plots"])
    assert rc == 0
    doc = json.loads((out / "loo.json").read_text())
    assert set(doc["seeds"][0]["methods"]) == {"pop", "none"}
    assert (out / "loo_validation.png").exists()


# ---------------------------------------------------------------------------- errors


def test_malformed_file_exits_1_with_line_number(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "ratings.csv"
    bad.write_text("userId,movieId,rating,timestamp\n1,10,4.0,964982703\n1,11,oops,964982704\n")
    rc = evaluate.main(["--dataset", "movielens", str(bad), "--out", str(tmp_path / "o"),
                        "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1
    assert f"{bad}:3:" in err and "oops" in err


def test_missing_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = evaluate.main(["--dataset", "movielens", str(tmp_path / "nope.csv"), "--no-progress"])
    assert rc == 1
    assert "nope.csv" in capsys.readouterr().err


def test_unknown_method_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(["--dataset", "movielens", "x", "--methods", "gan"]) == 2
    assert "gan" in capsys.readouterr().err


def test_training_example_history_type() -> None:
    ex = next(build_examples(_events([("u", "a")]), 3))
    assert isinstance(ex, TrainingExample) and ex.history == ()


def test_a_bounded_vocabulary_is_scored_by_item_not_by_reused_row() -> None:
    """Rows freed by expiry are reused by new items: the evaluator must not take a new item
    for the expired one that held its row (a target "in the past" it never was)."""
    from trainer.learner import TrainConfig

    examples, histories = [], {f"u{u}": [] for u in range(24)}
    for phase, start in (("a", 0), ("b", 3_600_000)):  # b an hour after a: a* expire
        if phase == "b":  # one batch of someone else's clicks: its end frees the a* rows,
            z: list[str] = []  # which the b* items then take in the order a* took them
            for n in range(32):
                examples.append(TrainingExample("z", tuple(z), f"c{n}", start - 60_000))
                z.append(f"c{n}")
        for n in range(12 * 24):  # every user clicks each item of the phase once
            user, item = f"u{n % 24}", f"{phase}{n // 24}"
            past = histories[user]
            examples.append(TrainingExample(user, tuple(past[-20:]), item, start + 1000 * n))
            past.append(item)
    runs = {ttl: run_prequential(examples, "none", batch_size=32, model_cfg=TINY,
                                 train_cfg=TrainConfig(mode="none", item_ttl_s=ttl))
            for ttl in (0.0, 600.0)}
    for run in runs.values():
        assert run.metrics["n_target_in_past"] == 0  # nobody clicks an item twice
        assert not (run.ranks == OUT_OF_LIST).any()
    curves = runs[600.0].curves
    assert sum(row["expired_items"] for row in curves) == 12  # every a* item
    assert max(row["vocab_size"] for row in curves) == 12 + 32  # the b* items took a*'s rows
