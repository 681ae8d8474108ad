"""``advrec evaluate --attack``: fake users are trained on, never scored; target exposure."""

from __future__ import annotations

import json
from pathlib import Path

from advrec.attacks import AttackConfig, inject
from advrec.datasets import load_events
from tests.datasets import MOVIELENS_SLICE
from trainer import evaluate
from trainer.evaluate import build_examples, run_prequential


def test_a_bandwagon_attack_pushes_its_target_into_real_users_lists_without_being_scored(
        ) -> None:
    events = load_events("movielens", MOVIELENS_SLICE).events[:3000]
    attacked, labels = inject(events, AttackConfig(kind="bandwagon", budget=0.1, filler=10,
                                                   target_clicks=6, start=0.3, end=0.4))
    clean = run_prequential(list(build_examples(events, 20)), "knn", attack=labels)
    hit = run_prequential(list(build_examples(attacked, 20)), "knn", attack=labels)
    # the same real users' clicks are scored on both streams: none of the fake users'
    assert hit.metrics["n_scored"] == clean.metrics["n_scored"]
    assert hit.metrics["target_lists"] == clean.metrics["target_lists"] > 0
    assert hit.metrics["target_hr@10"] > clean.metrics["target_hr@10"] + 0.02
    assert hit.curves[-1]["target_hits"] == round(
        hit.metrics["target_hr@10"] * hit.metrics["target_lists"])


def test_evaluate_attack_writes_clean_and_attacked_runs_with_the_attack_recorded(
        tmp_path: Path) -> None:
    out = tmp_path / "atk"
    rc = evaluate.main(["--dataset", "movielens", str(MOVIELENS_SLICE), "--methods", "pop",
                        "--limit", "1500", "--attack", "random", "--attack-budget", "0.05",
                        "--no-progress", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["summary"]) == {"pop", "pop|random"}
    assert result["attack"]["kind"] == "random" and result["attack"]["fake_users"] >= 1
    assert "target_hr@10" in result["summary"]["pop|random"]["mean"]


def test_evaluate_attacked_only_replays_the_attacked_stream_alone(tmp_path: Path,
                                                                   capsys) -> None:
    out = tmp_path / "atk"
    args = ["--dataset", "movielens", str(MOVIELENS_SLICE), "--methods", "pop", "--limit",
            "1500", "--attack-budget", "0.05", "--no-progress", "--attacked-only"]
    assert evaluate.main([*args, "--attack", "random", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["summary"]) == {"pop|random"}
    assert result["attack"]["kind"] == "random"
    assert evaluate.main(args) == 2  # no attack: nothing to replay
    assert "--attacked-only needs --attack" in capsys.readouterr().err


def test_evaluate_refuses_a_bad_attack_window_with_a_reason(capsys) -> None:
    rc = evaluate.main(["--dataset", "movielens", str(MOVIELENS_SLICE), "--methods", "pop",
                        "--attack", "random", "--attack-window", "0.7,0.2", "--no-progress"])
    assert rc == 2
    assert "attack window" in capsys.readouterr().err
