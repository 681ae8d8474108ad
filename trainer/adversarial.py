"""Per-mini-batch updates of G (and D), one signature, chosen by name: ``get_update(mode)``.

``none``       maximum likelihood (softmax cross-entropy) only;
``irgan``      D learns real next clicks vs. items sampled from G; G gets REINFORCE from D's
               reward minus a moving baseline, plus the ML term for stability;
``apr``        ML plus the loss on input embeddings perturbed in the worst-case direction;
``irgan+apr``  both.

Every update returns a dict of finite floats (the keys that apply to its mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trainer.model import NEG, Discriminator, Generator

__all__ = [
    "LOSSES",
    "MODES",
    "AdversarialConfig",
    "AdversarialState",
    "Batch",
    "Players",
    "UpdateFn",
    "discriminator_reward",
    "get_update",
    "mask_seen",
    "update_apr",
    "update_irgan",
    "update_irgan_apr",
    "update_none",
    "uses_sampled",
]


LOSSES = ("auto", "full", "sampled")


@dataclass(frozen=True)
class AdversarialConfig:
    """Loss and adversarial settings shared by all update modes."""

    # "full" softmax CE over every item; "sampled": the target against n_negatives items
    # drawn by popularity, logits corrected by log Q (Yi et al., RecSys 2019), the item
    # tables stepped only where a batch touches them (LazyAdam); "auto": sampled once the
    # vocabulary holds more than sampled_above items, full below
    loss: str = "auto"
    sampled_above: int = 100_000
    # negatives a sampled batch shares: 1024 came within 0.5 % of the full softmax's HR@10
    # on the ml-latest-small validation prefix, 256 3.2 % below (docs/results.md)
    n_negatives: int = 1024
    grad_clip: float = 5.0  # max global grad norm per step (0 = off); guards the PG spikes
    # the history's items (but the target) leave the softmax, as they leave the served and
    # evaluated list: G learns to rank what it will be asked to rank. Full softmax only: as
    # negatives of the sampled one they did better (HR@10 +0.8 % and +1.1 % at 256 and 1024
    # negatives, ml-latest-small validation prefix: docs/results.md, "Large catalogues")
    mask_history: bool = True
    # IRGAN (Wang et al., SIGIR 2017)
    irgan_ml_weight: float = 1.0  # ML term kept next to the policy gradient, for stability
    pg_weight: float = 0.2  # policy-gradient term weight (0.1..0.5 kept G close to ML)
    pg_samples: int = 4  # items G samples per example for REINFORCE
    pg_uniform_mix: float = 0.1  # G samples from (1-m)*p_G + m*uniform, importance weighted
    reward: str = "sigmoid"  # "sigmoid": 2*(sigmoid(D)-0.5) in (-1, 1); "log_odds": D's logit
    baseline_decay: float = 0.9  # moving average of the reward, subtracted from it
    d_temperature: float = 0.2  # D's negatives come from softmax(G / 0.2), as in the paper
    d_samples: int = 4  # negatives per real example for D; real and fake losses are averaged apart
    d_steps: int = 1  # D updates per batch
    g_steps: int = 1  # G updates per batch
    # APR (He et al., SIGIR 2018)
    apr_eps: float = 1.0  # L2 radius of the perturbation per example (~1 for sequence inputs)
    apr_lambda: float = 1.0  # weight of the adversarial loss

    def __post_init__(self) -> None:
        assert self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}"
        assert self.sampled_above >= 0, f"sampled_above must be >= 0, got {self.sampled_above}"
        assert self.reward in ("sigmoid", "log_odds"), f"unknown reward {self.reward!r}"
        assert self.n_negatives >= 1 and self.pg_samples >= 1 and self.d_samples >= 1
        assert self.d_steps >= 1 and self.g_steps >= 1, "need at least one D and one G step"
        assert self.d_temperature > 0, f"d_temperature must be > 0, got {self.d_temperature}"
        assert 0.0 <= self.pg_uniform_mix < 1.0, f"pg_uniform_mix {self.pg_uniform_mix}"
        assert 0.0 <= self.baseline_decay < 1.0, f"baseline_decay {self.baseline_decay}"
        assert self.apr_eps >= 0 and self.apr_lambda >= 0 and self.grad_clip >= 0


@dataclass
class AdversarialState:
    """What an update carries from batch to batch: the REINFORCE baseline."""

    baseline: float | None = None  # None until the first reward is seen
    updates: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline = state["baseline"]
        self.updates = int(state["updates"])


@dataclass
class Players:
    """The two networks and their optimizers."""

    generator: Generator
    discriminator: Discriminator
    g_optimizer: torch.optim.Optimizer
    d_optimizer: torch.optim.Optimizer


@dataclass
class Batch:
    """One training mini-batch as rows."""

    history: torch.Tensor  # (B, L) int64, left-padded with 0
    target: torch.Tensor  # (B,) int64, rows >= 1
    log_q: torch.Tensor | None = None  # (V+1,) log sampling prob per row ("sampled" loss only)
    # (V+1,) bool: rows that are no candidate in training (catalogue items with no click yet,
    # ranked by their content: pushing their untrained rows down as negatives would only
    # teach G to avoid whatever resembles them)
    blocked: torch.Tensor | None = None


UpdateFn = Callable[[Players, Batch, AdversarialConfig, AdversarialState], dict[str, float]]


def uses_sampled(cfg: AdversarialConfig, n_items: int) -> bool:
    """Whether a batch over ``n_items`` live items trains with the sampled softmax."""
    return cfg.loss == "sampled" or (cfg.loss == "auto" and n_items > cfg.sampled_above)


def discriminator_reward(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Turn D's logits [B, K] into G's reward [B, K]."""
    if kind == "log_odds":
        return logits.clamp(-10.0, 10.0)  # D's logit is the log-odds; clamp outliers
    return 2.0 * (torch.sigmoid(logits) - 0.5)


@dataclass
class _Candidates:
    """The items a loss ranks: all of them (full) or target + shared negatives (sampled)."""

    logits: torch.Tensor  # (B, C)
    target_pos: torch.Tensor  # (B,) column of the target in ``logits``
    ids: torch.Tensor | None  # (B, C) rows; None when column == row (full softmax)
    first: int  # first real candidate column (1 in the full softmax: 0 is padding)

    def rows(self, pos: torch.Tensor) -> torch.Tensor:
        """Map candidate columns [B, K] to item rows [B, K]."""
        return pos if self.ids is None else self.ids.gather(1, pos)


def mask_seen(logits: torch.Tensor, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Set the columns of each row's history items to ``NEG``, except its target.

    logits [B, V+1], history [B, L] rows (0 = padding, already ``NEG``), target [B].
    """
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, history, True)  # (B, V+1)
    seen.scatter_(1, target.unsqueeze(1), False)  # a re-clicked target stays a target
    return logits.masked_fill(seen, NEG)  # (B, V+1)


def _sample_negatives(batch: Batch, n_items: int, n: int) -> torch.Tensor:
    """Draw ``n`` shared negative rows [n] from q (popularity) or uniformly."""
    device = batch.history.device
    if batch.log_q is None:
        return torch.randint(1, n_items + 1, (n,), device=device)  # (N,)
    q = batch.log_q[1 : n_items + 1].exp()  # (V,)
    return torch.multinomial(q, n, replacement=True) + 1  # (N,)


def _candidates(gen: Generator, hidden: torch.Tensor, batch: Batch, cfg: AdversarialConfig,
                negatives: torch.Tensor | None) -> _Candidates:
    """Score the candidates of ``cfg.loss`` from G's hidden states [B, D]."""
    if negatives is None:
        logits = gen.score(hidden)  # (B, V+1)
        if cfg.mask_history:
            logits = mask_seen(logits, batch.history, batch.target)
        if batch.blocked is not None:
            logits = logits.masked_fill(batch.blocked, NEG)  # (B, V+1)
        return _Candidates(logits, batch.target, None, 1)
    B = hidden.shape[0]
    negs = negatives.unsqueeze(0).expand(B, -1)  # (B, N)
    ids = torch.cat([batch.target.unsqueeze(1), negs], dim=1)  # (B, 1+N)
    pos_logit = (hidden * gen.candidate_rows(batch.target)).sum(-1, keepdim=True)  # (B, 1)
    neg_logit = hidden @ gen.candidate_rows(negatives).t()  # (B, N)
    logits = torch.cat([pos_logit, neg_logit], dim=1)  # (B, 1+N)
    if batch.log_q is not None:
        logits = logits - batch.log_q[ids]  # logQ correction (Yi et al., RecSys 2019)
    hit = ids == batch.target.unsqueeze(1)  # (B, 1+N); a negative equal to the target
    if batch.blocked is not None:
        hit |= batch.blocked[ids]
    hit[:, 0] = False
    logits = logits.masked_fill(hit, NEG)
    return _Candidates(logits, torch.zeros_like(batch.target), ids, 0)


def _clip_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], clip: float) -> None:
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()


def _train_discriminator(players: Players, batch: Batch, cand: _Candidates,
                         cfg: AdversarialConfig, out: dict[str, float]) -> None:
    """Fit D on real next items vs. items sampled from G at a low temperature."""
    disc, opt = players.discriminator, players.d_optimizer
    with torch.no_grad():
        probs = F.softmax(cand.logits / cfg.d_temperature, dim=1)  # (B, C)
        probs.scatter_(1, cand.target_pos.unsqueeze(1), 0.0)  # never the real item
        fake_pos = torch.multinomial(probs, cfg.d_samples, replacement=True)  # (B, S)
        fake = cand.rows(fake_pos)  # (B, S)
    real = batch.target.unsqueeze(1)  # (B, 1)
    params = list(disc.parameters())
    for _ in range(cfg.d_steps):
        opt.zero_grad(set_to_none=True)
        real_logit = disc(batch.history, real)  # (B, 1)
        fake_logit = disc(batch.history, fake)  # (B, S)
        loss_d = (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                  + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))
        loss_d.backward()
        _clip_step(opt, params, cfg.grad_clip)
    out["loss_d"] = loss_d.item()
    out["d_acc_real"] = (real_logit > 0).float().mean().item()
    out["d_acc_fake"] = (fake_logit < 0).float().mean().item()
    out["d_acc"] = 0.5 * (out["d_acc_real"] + out["d_acc_fake"])


def _policy_gradient(players: Players, batch: Batch, cand: _Candidates, log_p: torch.Tensor,
                     cfg: AdversarialConfig, state: AdversarialState,
                     out: dict[str, float]) -> torch.Tensor:
    """Return the REINFORCE term: -(w * (reward - baseline) * log p_G(sampled item))."""
    with torch.no_grad():
        # sample the mixture q = (1-m) p + m uniform by picking a component per draw: only
        # [B, K] gathers, no second [B, C] distribution to build
        B, C = cand.logits.shape
        K, mix = cfg.pg_samples, cfg.pg_uniform_mix
        from_p = torch.multinomial(log_p.detach().exp(), K, replacement=True)  # (B, K)
        uniform = torch.randint(cand.first, C, (B, K), device=from_p.device)  # (B, K)
        pos = torch.where(torch.rand(B, K, device=from_p.device) < mix, uniform, from_p)
        p = log_p.detach().gather(1, pos).exp()  # (B, K)
        q = (1.0 - mix) * p + mix / (C - cand.first)  # (B, K)
        weight = (p / q).clamp(max=10.0)  # (B, K) importance weights; 1 when mix = 0
        reward = discriminator_reward(
            players.discriminator(batch.history, cand.rows(pos)), cfg.reward)  # (B, K)
        mean_reward = reward.mean().item()
        baseline = mean_reward if state.baseline is None else state.baseline
        state.baseline = cfg.baseline_decay * baseline + (1 - cfg.baseline_decay) * mean_reward
        advantage = weight * (reward - baseline)  # (B, K)
    pg = -(advantage * log_p.gather(1, pos)).mean()
    out["g_reward"] = mean_reward
    out["pg_term"] = pg.item()
    return pg


def _adversarial_loss(gen: Generator, emb: torch.Tensor, loss_ml: torch.Tensor, batch: Batch,
                      cfg: AdversarialConfig, negatives: torch.Tensor | None) -> torch.Tensor:
    """Return the ML loss at emb + delta, delta = eps * grad / ||grad|| per example (FGSM)."""
    (grad,) = torch.autograd.grad(loss_ml, emb, retain_graph=True)  # (B, L, D)
    with torch.no_grad():
        norm = grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1)  # (B, 1, 1)
        delta = cfg.apr_eps * grad / norm  # (B, L, D)
        delta = delta * (batch.history > 0).unsqueeze(-1)  # padding stays zero
    hidden = gen.last_hidden(batch.history, emb + delta)  # (B, D)
    cand = _candidates(gen, hidden, batch, cfg, negatives)
    return F.cross_entropy(cand.logits, cand.target_pos)


def _update(players: Players, batch: Batch, cfg: AdversarialConfig, state: AdversarialState,
            *, irgan: bool, apr: bool) -> dict[str, float]:
    gen = players.generator
    gen.train()
    players.discriminator.train()
    negatives = (_sample_negatives(batch, gen.n_items, cfg.n_negatives)
                 if uses_sampled(cfg, gen.n_items) else None)  # (N,), shared by every term
    ml_weight = cfg.irgan_ml_weight if irgan else 1.0
    params = list(gen.parameters())
    out: dict[str, float] = {}
    totals: dict[str, float] = {}
    for g_step in range(cfg.g_steps):
        players.g_optimizer.zero_grad(set_to_none=True)
        emb = gen.embed(batch.history)  # (B, L, D)
        cand = _candidates(gen, gen.last_hidden(batch.history, emb), batch, cfg, negatives)
        log_p = F.log_softmax(cand.logits, dim=1)  # (B, C); shared by ML and REINFORCE
        loss_ml = F.nll_loss(log_p, cand.target_pos)
        loss_g = ml_weight * loss_ml
        if irgan:
            if g_step == 0:  # D learns once per batch, on G's current samples
                _train_discriminator(players, batch, cand, cfg, out)
            loss_g = loss_g + cfg.pg_weight * _policy_gradient(players, batch, cand, log_p,
                                                               cfg, state, out)
        if apr:
            apr_loss = _adversarial_loss(gen, emb, loss_ml, batch, cfg, negatives)
            loss_g = loss_g + cfg.apr_lambda * apr_loss
            out["apr_loss"] = apr_loss.item()
        if loss_g.requires_grad:
            loss_g.backward()
            _clip_step(players.g_optimizer, params, cfg.grad_clip)
        out["loss_ml"] = loss_ml.item()
        out["loss_g"] = loss_g.item()
        for key in ("loss_ml", "loss_g", "pg_term", "g_reward", "apr_loss"):
            if key in out:
                totals[key] = totals.get(key, 0.0) + out[key] / cfg.g_steps
    state.updates += 1
    out.update(totals)
    return out


def update_none(players: Players, batch: Batch, cfg: AdversarialConfig,
                state: AdversarialState) -> dict[str, float]:
    """Take one maximum-likelihood step on G (softmax cross-entropy; D untouched).

    Parameters
    ----------
    players
        G, D and their optimizers; only G and its optimizer are used here.
    batch
        Histories [B, L] and target rows [B].
    cfg
        ``loss`` picks the full softmax or sampled softmax with logQ correction.
    state
        Carried between batches (unused by this mode, kept for the shared signature).

    Returns
    -------
    dict
        ``loss_ml``, ``loss_g``.

    References
    ----------
    Kang and McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018; full softmax
    CE per Klenitskiy and Vasilev, "Turning Dross Into Gold Loss: is BERT4Rec really better
    than SASRec?", RecSys 2023.
    """
    return _update(players, batch, cfg, state, irgan=False, apr=False)


def update_irgan(players: Players, batch: Batch, cfg: AdversarialConfig,
                 state: AdversarialState) -> dict[str, float]:
    """Take one IRGAN step: D on real vs. G-sampled items, then G by REINFORCE + ML.

    D's negatives are drawn from softmax(G / ``d_temperature``) without the real item. G
    samples ``pg_samples`` items per example from a mixture of its softmax and a uniform
    distribution (importance weighted), is rewarded by D, minus a moving-average baseline,
    and keeps ``irgan_ml_weight`` times the ML loss.

    Parameters
    ----------
    players
        G, D and their optimizers.
    batch
        Histories [B, L] and target rows [B].
    cfg
        Temperature, sample counts, reward kind, weights and step counts.
    state
        Holds the reward baseline; updated in place.

    Returns
    -------
    dict
        ``loss_ml``, ``loss_g``, ``loss_d``, ``d_acc_real``, ``d_acc_fake``, ``d_acc``,
        ``g_reward``, ``pg_term``.

    References
    ----------
    Wang et al., "IRGAN: A Minimax Game for Unifying Generative and Discriminative
    Information Retrieval Models", SIGIR 2017.
    """
    return _update(players, batch, cfg, state, irgan=True, apr=False)


def update_apr(players: Players, batch: Batch, cfg: AdversarialConfig,
               state: AdversarialState) -> dict[str, float]:
    """Take one APR step: ML loss plus ML loss on worst-case perturbed input embeddings.

    The perturbation is one FGSM step, ``apr_eps * g / ||g||`` with ``g`` the gradient of
    the ML loss w.r.t. the history's item embeddings, normalised per example and zero on
    padding; it is held constant while G descends on ``ml + apr_lambda * adversarial``.

    Parameters
    ----------
    players
        G, D and their optimizers; only G and its optimizer are used here.
    batch
        Histories [B, L] and target rows [B].
    cfg
        ``apr_eps`` and ``apr_lambda``.
    state
        Carried between batches (unused by this mode, kept for the shared signature).

    Returns
    -------
    dict
        ``loss_ml``, ``loss_g``, ``apr_loss``.

    References
    ----------
    He et al., "Adversarial Personalized Ranking for Recommendation", SIGIR 2018.
    """
    return _update(players, batch, cfg, state, irgan=False, apr=True)


def update_irgan_apr(players: Players, batch: Batch, cfg: AdversarialConfig,
                     state: AdversarialState) -> dict[str, float]:
    """Take one IRGAN step whose G loss also carries the APR term.

    Parameters
    ----------
    players
        G, D and their optimizers.
    batch
        Histories [B, L] and target rows [B].
    cfg
        IRGAN and APR settings together.
    state
        Holds the reward baseline; updated in place.

    Returns
    -------
    dict
        The keys of ``update_irgan`` plus ``apr_loss``.

    References
    ----------
    Wang et al., SIGIR 2017 (IRGAN); He et al., SIGIR 2018 (APR).
    """
    return _update(players, batch, cfg, state, irgan=True, apr=True)


_UPDATES: dict[str, UpdateFn] = {
    "none": update_none,
    "irgan": update_irgan,
    "apr": update_apr,
    "irgan+apr": update_irgan_apr,
}
MODES = tuple(_UPDATES)


def get_update(mode: str) -> UpdateFn:
    """Return the update function named ``mode`` (one of ``MODES``)."""
    try:
        return _UPDATES[mode]
    except KeyError:
        raise ValueError(f"unknown adversarial mode {mode!r}; choose one of {MODES}") from None
