"""The generated attack's sampler: a generator trained on the stream before the attack."""

from __future__ import annotations

from collections import Counter

import numpy as np

from advrec.attacks import AttackConfig, plan_attack
from advrec.synthetic import SyntheticConfig, synthetic_events
from trainer.attack_model import train_sampler


def test_generated_attack_samples_known_items_that_are_new_to_the_session() -> None:
    stream = list(synthetic_events(SyntheticConfig(n_users=100, n_items=150, seed=5), 3000))
    cut = stream[len(stream) // 2].ts
    sampler = train_sampler(stream, cut, batch_size=256, steps_per_batch=1, progress=False)
    known = {e.item for e in stream if e.ts < cut}
    rng = np.random.default_rng(0)
    prefix = [stream[0].item, stream[1].item]
    drawn = sampler.sample(prefix, 5, rng)
    assert len(drawn) == 5 and set(drawn) <= known
    assert not set(drawn) & set(prefix) and len(set(drawn)) == 5

    fake, labels = plan_attack(stream, AttackConfig(kind="generated", budget=0.05, filler=6,
                                                    target_clicks=2, start=0.5, end=0.6),
                               sampler)
    assert len(labels.fake_users) == 5
    assert set(Counter(e.user for e in fake).values()) == {8}
    assert {e.item for e in fake} - set(labels.targets) <= known


def test_advrec_attack_needs_a_kind_and_refuses_a_bad_window_before_sending(
        capsys, tmp_path) -> None:
    from trainer.attack_model import main

    assert main(["synthetic", "--limit", "500"]) == 2
    assert "--attack KIND is required" in capsys.readouterr().err
    assert main(["synthetic", "--limit", "500", "--attack", "random", "--attack-window",
                 "0.9,0.1", "--labels", str(tmp_path / "l.json"), "--no-progress"]) == 2
    assert "attack window" in capsys.readouterr().err
    assert not (tmp_path / "l.json").exists()
