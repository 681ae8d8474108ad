"""Adversarial update modes: each learns the planted structure; IRGAN's reward really acts."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from tests.unit.trainer.planted import SMALL, planted_stream, popularity_hit_rates
from trainer import adversarial
from trainer.adversarial import (
    MODES,
    AdversarialConfig,
    AdversarialState,
    Batch,
    Players,
    get_update,
)
from trainer.learner import OnlineLearner, TrainConfig
from trainer.model import Discriminator, Generator

N_BATCHES = 40  # the bound: 40 batches of 64 examples (2,560 clicks) ...
LAST = 10  # ... judged on the prequential HR@10 of the last 10 of them


def _run(batches: list, mode: str, adv: AdversarialConfig,
         **train: object) -> tuple[list[float], list[dict[str, float]]]:
    settings: dict = {"lr": 3e-3, "seed": 0, **train}
    learner = OnlineLearner(SMALL, TrainConfig(mode=mode, **settings), adv)
    hr, stats = [], []
    for batch in batches:
        # leave-one-out (re-clicks rankable), as popularity_hit_rates ranks them
        hr.append(learner.evaluate_batch(batch, variants=("loo",))["hr@10"])
        stats.append(learner.train_batch(batch))
    return hr, stats


@pytest.fixture(scope="module")
def stream() -> list:
    return planted_stream(N_BATCHES)


@pytest.mark.parametrize(("mode", "loss"), [
    *((mode, "full") for mode in MODES),
    ("none", "sampled"),  # sampled softmax + logQ, with and without D sampling from it
    ("irgan", "sampled"),
    ("apr", "sampled"),  # APR's perturbation on top of it (sparse table gradients)
    ("irgan+apr", "sampled"),
])
def test_mode_beats_popularity_on_planted_stream(stream: list, mode: str, loss: str) -> None:
    hr, stats = _run(stream, mode, AdversarialConfig(loss=loss, n_negatives=64))
    model_hr = float(np.mean(hr[-LAST:]))
    popular_hr = float(np.mean(popularity_hit_rates(stream)[-LAST:]))
    assert popular_hr < 0.15
    assert model_hr > 0.5 and model_hr > 4 * popular_hr, (model_hr, popular_hr)
    for s in stats:
        assert all(math.isfinite(v) for v in s.values()), s
    expected = {"loss_ml", "loss_g"} | ({"loss_d", "d_acc", "pg_term", "g_reward"}
                                        if "irgan" in mode else set())
    expected |= {"apr_loss"} if "apr" in mode else set()
    assert expected <= set(stats[-1])


def test_irgan_discriminator_separates_real_from_generated(stream: list) -> None:
    # G nearly frozen: its samples stay spread over all clusters, so D has a fixed target
    # (a trained G samples inside the right cluster and D rightly drifts back to ~0.5)
    _, stats = _run(stream, "irgan", AdversarialConfig(), d_lr=1e-2, lr=1e-9)
    assert np.mean([s["d_acc"] for s in stats[:3]]) < 0.6
    assert np.mean([s["d_acc"] for s in stats[-LAST:]]) > 0.7
    assert np.mean([s["loss_d"] for s in stats[-LAST:]]) < np.mean(
        [s["loss_d"] for s in stats[:LAST]])


def _players(seed: int = 0) -> tuple[Players, Batch]:
    torch.manual_seed(seed)
    gen, disc = Generator(SMALL), Discriminator(SMALL)
    gen.grow(50)
    disc.grow(50)
    players = Players(gen, disc, torch.optim.Adam(gen.parameters(), lr=1e-2),
                      torch.optim.Adam(disc.parameters(), lr=1e-2))
    history = torch.randint(0, 51, (32, SMALL.max_len))  # (B, L)
    return players, Batch(history, torch.randint(1, 51, (32,)))


def _g_after_update(cfg: AdversarialConfig, seed: int = 0) -> tuple[torch.Tensor, dict]:
    players, batch = _players(seed)
    torch.manual_seed(123)  # same samples in every run
    stats = get_update("irgan")(players, batch, cfg, AdversarialState())
    params = torch.cat([p.detach().flatten() for p in players.generator.parameters()])
    return params, stats


def _g_initial(seed: int = 0) -> torch.Tensor:
    players, _ = _players(seed)
    return torch.cat([p.detach().flatten() for p in players.generator.parameters()])


def test_policy_gradient_alone_moves_the_generator() -> None:
    cfg = AdversarialConfig(irgan_ml_weight=0.0, pg_weight=1.0)
    after, stats = _g_after_update(cfg)
    assert stats["pg_term"] != 0.0
    assert not torch.equal(after, _g_initial())


def test_zero_reward_leaves_the_generator_unchanged_without_ml(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adversarial, "discriminator_reward",
                        lambda logits, kind: torch.zeros_like(logits))
    after, stats = _g_after_update(AdversarialConfig(irgan_ml_weight=0.0, pg_weight=1.0))
    assert stats["pg_term"] == 0.0
    assert torch.equal(after, _g_initial())


def test_zeroing_the_reward_changes_the_update(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = AdversarialConfig()  # ML term on, as in production
    with_reward, _ = _g_after_update(cfg)
    monkeypatch.setattr(adversarial, "discriminator_reward",
                        lambda logits, kind: torch.zeros_like(logits))
    without_reward, _ = _g_after_update(cfg)
    assert not torch.equal(with_reward, without_reward)


def test_apr_perturbation_increases_the_loss() -> None:
    players, batch = _players()
    cfg = AdversarialConfig(apr_eps=1.0)
    small = dataclasses.replace(SMALL, dropout=0.0)
    torch.manual_seed(0)
    players.generator = Generator(small)
    players.generator.grow(50)
    players.g_optimizer = torch.optim.Adam(players.generator.parameters(), lr=1e-9)
    stats = get_update("apr")(players, batch, cfg, AdversarialState())
    assert stats["apr_loss"] > stats["loss_ml"]  # worst case, not a random direction
    stats = get_update("apr")(players, batch, dataclasses.replace(cfg, apr_eps=0.0),
                              AdversarialState())
    assert stats["apr_loss"] == pytest.approx(stats["loss_ml"], rel=1e-5)


def test_get_update_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="irgan"):
        get_update("gan")


def test_mask_seen_hides_history_but_not_the_target() -> None:
    logits = torch.zeros(2, 6)  # (B, V+1)
    history = torch.tensor([[0, 2, 3], [0, 0, 4]])  # (B, L), 0 = padding
    target = torch.tensor([3, 5])  # row 0 re-clicks item 3
    masked = adversarial.mask_seen(logits, history, target)
    hidden = masked <= adversarial.NEG / 2
    assert hidden.tolist() == [[True, False, True, False, False, False],
                               [True, False, False, False, True, False]]


@pytest.mark.parametrize(("loss", "n_items", "sampled"), [
    ("auto", 100, False), ("auto", 101, True), ("full", 10**7, False), ("sampled", 1, True)])
def test_auto_loss_turns_sampled_above_its_catalogue_size(loss: str, n_items: int,
                                                          sampled: bool) -> None:
    cfg = AdversarialConfig(loss=loss, sampled_above=100)
    assert adversarial.uses_sampled(cfg, n_items) is sampled


@pytest.mark.parametrize("mask", [True, False])
def test_sampled_negatives_mask_only_the_target_whatever_the_history_mask(mask: bool) -> None:
    from trainer.model import NEG

    players, _ = _players()
    gen = players.generator
    history = torch.tensor([[0, 4, 9, 12], [3, 5, 6, 7]])  # (B, L)
    batch = Batch(history, torch.tensor([9, 8]))  # the first re-clicks 9
    negatives = torch.tensor([4, 8, 20, 9])  # (N,)
    cfg = AdversarialConfig(loss="sampled", n_negatives=4, mask_history=mask)
    cand = adversarial._candidates(gen, gen.last_hidden(history), batch, cfg, negatives)
    masked = (cand.logits == NEG).tolist()  # (B, 1+N): target, then the negatives
    # a negative equal to the target; the history's items stay negatives (chosen on the
    # validation prefix: docs/results.md)
    assert masked[0] == [False, False, False, False, True]
    assert masked[1] == [False, False, True, False, False]
