"""Online learner: prequential ranks, exact resume, seeding, vocabulary growth, replay."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from advrec.contract import TrainingExample
from tests.unit.trainer.planted import SMALL, planted_stream
from trainer.adversarial import MODES
from trainer.learner import OnlineLearner, ReplayBuffer, TrainConfig
from trainer.metrics import OUT_OF_LIST


def _learner(mode: str = "none", seed: int = 0, **train: object) -> OnlineLearner:
    settings: dict = {"lr": 3e-3, "replay_size": 500, **train}
    return OnlineLearner(SMALL, TrainConfig(mode=mode, seed=seed, **settings))


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip_resumes_exactly(mode: str) -> None:
    batches = planted_stream(5, 32, seed=3)
    learner = _learner(mode)
    for batch in batches[:3]:
        learner.train_batch(batch)
    state = learner.state_dict()
    expected = [learner.train_batch(b) for b in batches[3:]]
    resumed = OnlineLearner()  # default configs: the state brings its own
    resumed.load_state_dict(state)
    assert resumed.train_cfg.mode == mode
    assert [resumed.train_batch(b) for b in batches[3:]] == expected
    assert resumed.examples_seen == learner.examples_seen == 5 * 32
    assert resumed.batches_seen == 5
    assert resumed.last_event_ms == batches[-1][-1].ts


def test_same_seed_and_batches_give_identical_results() -> None:
    batches = planted_stream(4, 32, seed=4)

    def run(seed: int) -> list[dict[str, float]]:
        learner = _learner("irgan+apr", seed=seed)
        out = []
        for batch in batches:
            out.append(learner.evaluate_batch(batch))
            out.append(learner.train_batch(batch))
        return out

    first = run(0)
    assert run(0) == first
    assert run(1) != first


def test_learner_leaves_the_global_torch_rng_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    learner = _learner("irgan")
    learner.train_batch(planted_stream(1, 16)[0])
    torch.testing.assert_close(torch.rand(3), expected)


def test_evaluate_batch_ranks_before_training_and_counts_unknown_targets() -> None:
    learner = _learner()
    first, second = planted_stream(2, 32)
    stats = learner.evaluate_batch(first)
    assert stats["n_eval"] == 0 and stats["n_unknown_target"] == 32
    assert stats["hr@10"] == 0.0 and "ndcg@20" in stats and "mrr@10" in stats
    learner.train_batch(first)
    known = sum(learner.vocab.index(e.item) is not None for e in second)
    stats = learner.evaluate_batch(second)
    assert stats["n_eval"] == known and stats["n_unknown_target"] == 32 - known


def test_target_ranks_are_pessimistic_and_follow_the_variant(
        monkeypatch: pytest.MonkeyPatch) -> None:
    learner = _learner()
    items = [f"i{i}" for i in range(10)]
    learner.train_batch([TrainingExample("u", (), item, 1) for item in items])
    # every item scores the same: a tie must rank the target last among the candidates
    monkeypatch.setattr(learner, "_score_rows",
                        lambda history: np.zeros((len(history), 11), dtype=np.float32))
    batch = [
        TrainingExample("u", ("i1", "i2", "i3"), "i0", 2),  # 10 items - 3 seen = 7 candidates
        TrainingExample("u", ("i0", "i1", "i2"), "i0", 2),  # a re-click
        TrainingExample("u", ("i1",), "new-item", 2),  # unknown target
    ]
    ranks = learner.target_ranks(batch, variants=("A", "B", "loo"))
    assert ranks["A"].tolist() == [7, OUT_OF_LIST, 0]  # the re-click is out of the list
    assert ranks["B"].tolist() == [10, 10, 0]  # nothing removed, padding never ranked
    assert ranks["loo"].tolist() == [7, 8, 0]  # the re-click ranked among unseen items
    stats = learner.evaluate_batch(batch, ks=(10,), variants=("A", "B"))
    assert stats["n_eval"] == 2 and stats["hr@10"] == 0.5 and stats["B:hr@10"] == 1.0


def test_new_items_mid_stream_get_rows_and_become_recommendable() -> None:
    learner = _learner()
    for batch in planted_stream(15, 64):
        learner.train_batch(batch)
    assert learner.vocab.index("fresh") is None
    n_before = len(learner.vocab)
    # a new item that always follows i0 (cluster 0)
    pattern = [TrainingExample(f"u{n}", ("i10", "i20", "i0"), "fresh", 10**12 + n)
               for n in range(64)]
    assert learner.evaluate_batch(pattern)["n_unknown_target"] == 64
    for _ in range(8):
        stats = learner.train_batch(pattern)
    assert learner.vocab.index("fresh") == n_before + 1
    assert learner.scores([["i0"]]).shape == (1, n_before + 2)
    assert stats["vocab_size"] == n_before + 1
    assert "fresh" in learner.recommend(["i10", "i20", "i0"], k=10)
    assert learner.evaluate_batch(pattern)["hr@10"] == 1.0


def test_recommend_excludes_seen_items_and_padding() -> None:
    learner = _learner()
    for batch in planted_stream(3, 64):
        learner.train_batch(batch)
    history = learner.vocab.items()[:3]
    recs = learner.recommend(history, k=len(learner.vocab))
    assert len(recs) == len(learner.vocab) - 3
    assert not set(recs) & set(history)
    assert len(learner.recommend(history, k=5, exclude_seen=False)) == 5
    assert learner.recommend([], k=3) == learner.recommend(["never-seen"], k=3)


def test_train_batch_skips_flagged_examples() -> None:
    learner = _learner()
    batch = [TrainingExample("u", ("a",), "b", 5), TrainingExample("v", ("c",), "d", 9,
                                                                 flags=("suspect",))]
    stats = learner.train_batch(batch)
    assert stats["examples"] == 1 and stats["skipped"] == 1
    assert learner.vocab.index("d") is None
    assert learner.last_event_ms == 9


def test_train_batch_mixes_in_replay() -> None:
    learner = _learner(replay_ratio=0.5)
    first, second = planted_stream(2, 32)
    assert learner.train_batch(first)["replay_examples"] == 0
    assert learner.train_batch(second)["replay_examples"] == 16
    assert len(learner.replay) == 64


@pytest.mark.parametrize("policy", ["reservoir", "fifo"])
def test_replay_buffer_is_bounded(policy: str) -> None:
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(capacity=50, max_len=3, policy=policy)
    for start in range(0, 200, 20):
        rows = np.arange(start, start + 20)
        buf.add(np.stack([rows] * 3, axis=1), rows, rng)
    assert len(buf) == 50
    history, target = buf.sample(80, rng)
    assert history.shape == (50, 3) and len(set(target.tolist())) == 50
    if policy == "fifo":
        assert set(buf.target.tolist()) == set(range(150, 200))
    else:  # reservoir: a uniform sample of all 200, so not just the newest
        assert buf.target.min() < 150


def test_config_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown adversarial mode"):
        TrainConfig(mode="gan")
    with pytest.raises(AssertionError):
        dataclasses.replace(TrainConfig(), replay_policy="lifo")


def test_warmup_batches_get_more_updates() -> None:
    learner = _learner(steps_per_batch=2, warmup_batches=2, warmup_steps_per_batch=5)
    calls: list[int] = []
    update = learner._update

    def counting(*args: object) -> dict[str, float]:
        calls.append(learner.batches_seen)
        return update(*args)  # type: ignore[arg-type]

    learner._update = counting  # type: ignore[assignment]
    for batch in planted_stream(4, 16):
        learner.train_batch(batch)
    # batches 0 and 1 are warm-up batches (5 updates), then steps_per_batch (2)
    assert [calls.count(b) for b in range(4)] == [5, 5, 2, 2]


def test_trainer_settings_defaults_match_the_learner_defaults() -> None:
    from trainer.adversarial import AdversarialConfig
    from trainer.model import ModelConfig
    from trainer.settings import TrainerSettings

    s, train, model = TrainerSettings(), TrainConfig(), ModelConfig()
    assert s.trainer_mask_history == AdversarialConfig().mask_history
    adv = AdversarialConfig()
    assert (s.trainer_loss, s.trainer_sampled_above, s.trainer_negatives) == (
        adv.loss, adv.sampled_above, adv.n_negatives)
    assert (s.trainer_lr, s.trainer_steps_per_batch) == (train.lr, train.steps_per_batch)
    assert (s.trainer_replay_size, s.trainer_replay_ratio, s.trainer_replay_policy) == (
        train.replay_size, train.replay_ratio, train.replay_policy)
    assert (s.trainer_max_len, s.trainer_dim, s.trainer_layers, s.trainer_dropout) == (
        model.max_len, model.d_model, model.n_layers, model.dropout)
    from trainer.prior import PriorConfig

    assert (s.trainer_prior_weight, s.trainer_prior_top_k) == (PriorConfig().weight,
                                                               PriorConfig().top_k)


def test_evaluate_cli_defaults_are_the_learner_defaults() -> None:
    from trainer.adversarial import AdversarialConfig
    from trainer.evaluate import _configs, build_parser

    args = build_parser().parse_args(["--dataset", "movielens", "x.csv"])
    model_cfg, train_cfg, adv_cfg = _configs(args, TrainConfig.replay_ratio)
    from trainer.model import ModelConfig

    assert model_cfg == ModelConfig()
    assert dataclasses.replace(train_cfg, num_threads=0) == TrainConfig()
    assert adv_cfg == AdversarialConfig()


def test_item_lr_mult_puts_the_item_tables_in_their_own_group() -> None:
    model_cfg = dataclasses.replace(SMALL, item_bias=True, tied_output=False)
    learner = OnlineLearner(model_cfg, TrainConfig(lr=2e-3, item_lr_mult=5.0, replay_size=500))
    rest, tables = learner.g_optimizer.param_groups
    assert tables["lr"] == pytest.approx(1e-2) and rest["lr"] == pytest.approx(2e-3)
    assert [id(p) for p in tables["params"]] == [
        id(t.emb.weight) for t in learner.generator.item_tables()]
    assert len(tables["params"]) + len(rest["params"]) == len(
        list(learner.generator.parameters()))
    assert len(_learner().g_optimizer.param_groups) == 1  # the default: one group, as before


def test_output_parts_and_item_lr_resume_exactly() -> None:
    batches = planted_stream(5, 64, seed=3)  # 64 items a batch: the tables reallocate
    model_cfg = dataclasses.replace(SMALL, item_bias=True, tied_output=False)
    learner = OnlineLearner(model_cfg, TrainConfig(mode="apr", item_lr_mult=3.0,
                                                   replay_size=500))
    for batch in batches[:3]:
        learner.train_batch(batch)
    state = learner.state_dict()
    expected = [(learner.evaluate_batch(b), learner.train_batch(b)) for b in batches[3:]]
    resumed = OnlineLearner.from_state_dict(state)
    assert resumed.model_cfg == model_cfg and resumed.train_cfg.item_lr_mult == 3.0
    assert [(resumed.evaluate_batch(b), resumed.train_batch(b)) for b in batches[3:]] == expected
    # each replaced table must have reached the optimizer: every table has Adam state
    for table in resumed.generator.item_tables():
        assert resumed.g_optimizer.state[table.emb.weight]["exp_avg"].shape == \
            table.emb.weight.shape


def test_trainer_mask_history_is_a_setting() -> None:
    from trainer.settings import load_trainer_settings

    assert load_trainer_settings({}).trainer_mask_history is True
    off = load_trainer_settings({"ADVREC_TRAINER_MASK_HISTORY": "false"})
    assert off.trainer_mask_history is False


def test_the_training_loss_is_a_setting_the_sidecar_builds_its_learner_with(
        tmp_path: Path) -> None:
    from trainer.settings import ConfigError, load_trainer_settings
    from trainer.sidecar import Sidecar

    s = load_trainer_settings({"ADVREC_TRAINER_LOSS": "sampled",
                               "ADVREC_TRAINER_SAMPLED_ABOVE": "5000",
                               "ADVREC_TRAINER_NEGATIVES": "64",
                               "ADVREC_BUNDLE_DIR": str(tmp_path / "b"),
                               "ADVREC_CHECKPOINT_DIR": str(tmp_path / "c")})
    adv = Sidecar(s).fresh_learner().adv_cfg
    assert (adv.loss, adv.sampled_above, adv.n_negatives) == ("sampled", 5000, 64)
    assert load_trainer_settings({}).trainer_loss == "auto"
    with pytest.raises(ConfigError, match="TRAINER_LOSS"):
        load_trainer_settings({"ADVREC_TRAINER_LOSS": "partial"})


def test_trainer_replay_policy_and_dropout_are_settings() -> None:
    from advrec.config import ConfigError
    from trainer.settings import load_trainer_settings

    s = load_trainer_settings({"ADVREC_TRAINER_REPLAY_POLICY": "fifo",
                               "ADVREC_TRAINER_DROPOUT": "0.2"})
    assert (s.trainer_replay_policy, s.trainer_dropout) == ("fifo", 0.2)
    with pytest.raises(ConfigError, match="TRAINER_REPLAY_POLICY='newest'"):
        load_trainer_settings({"ADVREC_TRAINER_REPLAY_POLICY": "newest"})
    with pytest.raises(ConfigError, match=r"TRAINER_DROPOUT=1\.0"):
        load_trainer_settings({"ADVREC_TRAINER_DROPOUT": "1"})


def test_sidecar_builds_its_learner_from_the_settings(tmp_path: Path) -> None:
    from trainer.settings import load_trainer_settings
    from trainer.sidecar import Sidecar

    s = load_trainer_settings({"ADVREC_TRAINER_REPLAY_POLICY": "fifo",
                               "ADVREC_TRAINER_DROPOUT": "0.2",
                               "ADVREC_TRAINER_STEPS_PER_BATCH": "6",
                               "ADVREC_BUNDLE_DIR": str(tmp_path / "bundles"),
                               "ADVREC_CHECKPOINT_DIR": str(tmp_path / "checkpoints")})
    sidecar = Sidecar(s)
    sidecar.build()
    learner = sidecar.learner
    assert learner.train_cfg.replay_policy == "fifo" and learner.replay.policy == "fifo"
    assert learner.model_cfg.dropout == 0.2 and learner.generator.config.dropout == 0.2
    assert learner.train_cfg.steps_per_batch == 6
    assert learner.adv_cfg.mask_history and sidecar.variants == ("A", "B")
    assert learner.prior_cfg.weight == s.trainer_prior_weight


def test_under_exclude_none_the_trainer_trains_and_gates_for_lists_with_reclicks(
        tmp_path: Path) -> None:
    from trainer.settings import load_trainer_settings
    from trainer.sidecar import Sidecar

    s = load_trainer_settings({"ADVREC_EXCLUDE": "none", "ADVREC_TRAINER_PRIOR_WEIGHT": "0",
                               "ADVREC_BUNDLE_DIR": str(tmp_path / "bundles"),
                               "ADVREC_CHECKPOINT_DIR": str(tmp_path / "checkpoints")})
    sidecar = Sidecar(s)
    sidecar.build()
    # the history stays in the training softmax; the gate decides on variant B
    assert not sidecar.learner.adv_cfg.mask_history and sidecar.variants == ("B", "A")
    assert sidecar.learner.prior_cfg.weight == 0.0


@pytest.mark.parametrize("mode", ["none", "irgan+apr"])
def test_above_its_catalogue_size_the_learner_trains_sampled_and_steps_only_touched_rows(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.adversarial import AdversarialConfig

    batches = planted_stream(6, 32, seed=3)
    adv = AdversarialConfig(loss="auto", sampled_above=10, n_negatives=8)
    learner = OnlineLearner(SMALL, TrainConfig(mode=mode, lr=3e-3, seed=0, replay_size=500,
                                               replay_ratio=0.0), adv)
    for batch in batches[:3]:
        learner.train_batch(batch)
    assert learner.generator.items.sparse and learner.discriminator.items.sparse
    assert learner._log_q() is not None
    # a batch of one example touches its history, its target and the sampled negatives
    from trainer import adversarial

    drawn: list[torch.Tensor] = []
    draw = adversarial._sample_negatives

    def recorded(*args: object) -> torch.Tensor:
        drawn.append(draw(*args))  # type: ignore[arg-type]
        return drawn[-1]

    before = learner.generator.items.emb.weight.detach().clone()
    example = batches[3][0]
    with monkeypatch.context() as m:
        m.setattr(adversarial, "_sample_negatives", recorded)
        learner.train_batch([example])
    touched = set(learner.vocab.known_rows([*example.history, example.item]))
    touched |= {int(r) for d in drawn for r in d}
    moved = (learner.generator.items.emb.weight.detach() - before).abs().sum(1) > 0
    assert drawn and set(moved.nonzero().flatten().tolist()) <= touched
    assert 2 <= moved.sum() < len(learner.vocab) // 2
    # it resumes exactly from a checkpoint (LazyAdam's state is Adam's)
    saved = learner.state_dict()
    expected = [learner.train_batch(b) for b in batches[4:]]
    resumed = OnlineLearner.from_state_dict(saved)
    assert [resumed.train_batch(b) for b in batches[4:]] == expected


def test_below_its_catalogue_size_the_learner_keeps_the_full_softmax() -> None:
    learner = _learner("none")
    learner.train_batch(planted_stream(1, 32, seed=3)[0])
    assert learner.adv_cfg.loss == "auto" and learner._log_q() is None
    assert not learner.generator.items.sparse


def test_a_frozen_copy_ranks_as_the_learner_did_and_stays_put_while_it_trains() -> None:
    from trainer.prior import PriorConfig

    learner = OnlineLearner(SMALL, TrainConfig(mode="none", lr=3e-3, replay_size=300),
                            prior_cfg=PriorConfig(weight=4.0))
    batches = planted_stream(6, 48)
    for batch in batches[:4]:
        learner.train_batch(batch)
    frozen = learner.frozen()
    idx, val = learner.cooc.table(len(learner.vocab) + 1)  # (V+1, K): kept as rows of links
    links = frozen.prior_scorer().sparse
    assert links is not None and links.n_rows == len(idx)
    got = links.gather(np.arange(len(idx)), idx.shape[1])  # (V+1, K) each
    assert np.array_equal(got[0], idx) and np.array_equal(got[1], val)
    probe = batches[4] + batches[5]
    before = learner.target_ranks(probe)["A"]
    assert np.array_equal(frozen.target_ranks(probe)["A"], before)
    # what only training needs is not copied
    assert frozen.cooc is None and frozen.replay is None and frozen.g_optimizer is None
    for batch in batches[4:]:
        learner.train_batch(batch)
    learner.add_items(["brand-new"])
    assert not np.array_equal(learner.target_ranks(probe)["A"], before)
    assert np.array_equal(frozen.target_ranks(probe)["A"], before)
    assert "brand-new" not in frozen.vocab
