"""Load shedding: the trained share follows the backlog, and a shed batch loses nothing."""

from __future__ import annotations

import numpy as np

from tests.unit.trainer.planted import SMALL, planted_stream
from trainer.learner import OnlineLearner, TrainConfig
from trainer.shedding import LoadShedder


def test_the_fraction_shrinks_while_behind_holds_near_the_target_and_recovers() -> None:
    shedder = LoadShedder(target_lag_s=10, min_fraction=0.05, decrease=0.5, increase=0.25)
    assert [shedder.update(15, now=t) for t in (0, 1, 2)] == [0.5, 0.25, 0.125]
    assert shedder.level == 4  # 1/8: three halvings below "trains on everything"
    assert shedder.update(8, now=3) == 0.125 and shedder.update(6, now=4) == 0.125  # hold
    assert [shedder.update(1, now=t) for t in (5, 6, 7, 8)] == [0.375, 0.625, 0.875, 1.0]
    assert shedder.level == 0
    for t in range(9, 40):
        shedder.update(50, now=t)
    assert shedder.fraction == 0.05  # never below the floor: a sample is always trained on


def test_at_most_one_change_per_interval() -> None:
    shedder = LoadShedder(target_lag_s=10, decrease=0.5, interval_s=1.0)
    assert [shedder.update(15, now=t) for t in (0, 0.1, 0.5, 0.99, 1.0)] == [
        0.5, 0.5, 0.5, 0.5, 0.25]  # a burst of small batches is one signal, not five


def test_far_behind_the_fraction_falls_at_once() -> None:
    # a standby that took over finds batches a minute old: 10/60 of a batch, not 70 %
    shedder = LoadShedder(target_lag_s=10, min_fraction=0.05)
    assert abs(shedder.update(60, now=0) - 10 / 60) < 1e-9
    assert shedder.update(600, now=1) == 0.05


def test_only_a_lag_beyond_the_skip_threshold_jumps_ahead() -> None:
    shedder = LoadShedder(target_lag_s=10, skip_lag_s=300)
    assert not shedder.should_skip(300) and shedder.should_skip(301)
    assert not LoadShedder(skip_lag_s=0).should_skip(10**9)


def test_a_simulated_overload_settles_where_the_trainer_keeps_up() -> None:
    """A batch arrives every second; training all of one takes 5 s plus 0.1 s, so the
    trainer keeps up only below about 18 % of each batch. The batches trained on stay
    near the target age, and the share trained on settles below the break-even."""
    shedder = LoadShedder(target_lag_s=10)
    clock, next_batch, queue, lags, fractions = 0.0, 0.0, [], [], []
    while clock < 600:
        while next_batch <= clock:  # batches written by the workers until now
            queue.append(next_batch)
            next_batch += 1.0
        if not queue:
            clock = next_batch
            continue
        written = queue.pop(0)
        lags.append(clock - written)
        fraction = shedder.update(clock - written, clock)
        fractions.append(fraction)
        clock += 0.1 + 5.0 * fraction
    late = lags[len(lags) // 2:]
    assert max(late) <= 20 and sum(late) / len(late) <= 12
    assert 0.05 <= min(fractions[-100:]) and max(fractions[-100:]) <= 0.3


def test_a_shed_batch_trains_on_a_sample_and_keeps_every_example_for_replay() -> None:
    batch = planted_stream(1, 200, seed=4)[0]
    learner = OnlineLearner(SMALL, TrainConfig(replay_size=1000, steps_per_batch=1))
    stats = learner.train_batch(batch, fraction=0.25)
    assert stats["examples"] == 50 and stats["shed"] == 150
    assert len(learner.replay) == 200 and learner.examples_seen == 200
    assert all(learner.vocab.index(e.item) for e in batch)  # every item has its row
    full = OnlineLearner(SMALL, TrainConfig(replay_size=1000, steps_per_batch=1))
    stats = full.train_batch(batch)
    assert stats["examples"] == 200 and stats["shed"] == 0
    np.testing.assert_array_equal(full.replay.target[:200], learner.replay.target[:200])


def test_while_shedding_several_fetched_batches_are_one_step(tmp_path) -> None:
    from advrec.contract import encode_batch
    from trainer.settings import load_trainer_settings
    from trainer.sidecar import Sidecar

    s = load_trainer_settings({"ADVREC_BUNDLE_DIR": str(tmp_path / "b"),
                               "ADVREC_CHECKPOINT_DIR": str(tmp_path / "c"),
                               "ADVREC_TRAINER_DIM": "16", "ADVREC_TRAINER_LAYERS": "1",
                               "ADVREC_TRAINER_STEPS_PER_BATCH": "1"})
    sidecar = Sidecar(s)
    sidecar.build()
    batches = planted_stream(3, 40, seed=5)
    stats = sidecar.step([encode_batch(b) for b in batches], offset=12, fraction=0.5)
    assert sidecar.next_offset == 13  # after the last of the three
    assert stats["examples"] == 60 and stats["shed"] == 60  # half of the 120, in one update
    # batches_seen counts the messages, so a checkpoint says how much of the topic it saw
    assert sidecar.learner.batches_seen == 3 and sidecar.learner.examples_seen == 120
    assert sidecar.batches_since_export == 3 and sidecar.batches_since_checkpoint == 3
    assert sidecar.m.registry.get_sample_value("advrec_trainer_batches_total") == 3
    assert sidecar.m.registry.get_sample_value("advrec_trainer_shed_examples_total") == 60


def test_a_large_catalogue_scores_a_sample_of_each_batch_within_the_score_budget(
        tmp_path) -> None:
    from advrec.contract import encode_batch
    from trainer.settings import load_trainer_settings
    from trainer.sidecar import Sidecar

    def scored(budget: int) -> tuple[float, int]:
        s = load_trainer_settings({"ADVREC_BUNDLE_DIR": str(tmp_path / "b"),
                                   "ADVREC_CHECKPOINT_DIR": str(tmp_path / "c"),
                                   "ADVREC_TRAINER_DIM": "16", "ADVREC_TRAINER_LAYERS": "1",
                                   "ADVREC_TRAINER_STEPS_PER_BATCH": "1",
                                   "ADVREC_EVAL_MAX_SCORES": str(budget)})
        sidecar = Sidecar(s)
        sidecar.build()
        first, second = planted_stream(2, 40, seed=5)
        sidecar.step(encode_batch(first), offset=0)
        rows = len(sidecar.learner.vocab) + 1
        stats = sidecar.step(encode_batch(second), offset=1)
        assert stats["examples"] == 40  # training is not sampled
        return (stats["n_eval"] + stats["n_unknown_target"], rows)

    n, rows = scored(10 * 60)  # room for 10 examples' scores over ~60 rows
    assert n == 600 // rows
    assert scored(20_000_000)[0] == 40  # a small catalogue: every example
