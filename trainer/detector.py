"""The fake-user detector: a suspicion score per user, trained online against an attacker.

What it reads (``advrec.suspicion.FEATURES``): the user's behaviour counters (kept with the
user's state: clicks, account age, gaps between clicks) and the user's recent items, from
which the graph computes how popular they are, how concentrated on one item, how likely the
generator G finds each next click and how real the discriminator D finds it. A small MLP
over the standardized features gives P(fake); per feature, how much the logit falls when
that feature is reset to a typical user's value says why a user was flagged. The whole
thing (G and D included) is one torch module, ``DetectorGraph``, that exports to ONNX
beside the scorer, so the worker scores without torch.

How it learns (``OnlineDetector.train_round``): positives are fake users it makes itself
with the attacks of advrec/attacks.py, from the catalogue as it stands (random, average,
bandwagon, segment fillers with unpopular targets, and sessions sampled from G: the
attacker who copies the model), some clicking like bots, some at gaps drawn from the
stream's, some with a real user's counters copied (so that timing alone never separates
those); negatives are recent real users. The stream's users are unlabelled, so a real
attack in progress sits among the negatives for a while: positives are resampled every
round and the classifier trains on, warm-started, from the features as they stand.
Adversarially, the attacker best-responds: of the generated sessions at several sampling
temperatures, the ones the current detector scores lowest are added again.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from advrec.attacks import AttackConfig, Catalogue, fake_session
from advrec.suspicion import BEHAVIOUR_FEATURES, FEATURES, Behaviour, behaviour_features
from advrec.types import ItemId, UserId
from trainer.learner import OnlineLearner
from trainer.model import static_dim

__all__ = ["Classifier", "DetectorConfig", "DetectorGraph", "OnlineDetector", "UserRecord"]

SYNTH_KINDS = ("random", "average", "bandwagon", "segment", "generated")
GAP_SAMPLE = 4096  # gaps kept for fakes that click at the stream's own pace


@dataclass(frozen=True)
class DetectorConfig:
    """How the detector scores, when it flags and how it trains."""

    threshold: float = 0.5  # flag a user when P(fake) >= threshold...
    # ...and when the user's logit stands this many median absolute deviations above the
    # median logit of recent users: after each round the threshold in force rises to it.
    # Robust statistics, so that an attack in progress (fakes among the recent users, up
    # to nearly half of them) cannot lift the bar over itself, as a quantile would
    outlier_mads: float = 6.0
    min_clicks: int = 5  # users with fewer clicks are not scored (nothing to go on)
    min_users: int = 100  # no training round (and no flag) before this many such users
    fakes_per_round: int = 160  # synthesized fake users per training round
    reals_per_round: int = 320  # recent real users per round
    steps_per_round: int = 150  # steps of the classifier per round (warm-started)
    lr: float = 0.01
    l2: float = 1e-3  # AdamW weight decay of the classifier
    feature_dropout: float = 0.3  # share of features reset to typical per training row
    filler: tuple[int, int] = (8, 40)  # fillers per synthesized fake user (uniform)
    target_clicks: tuple[int, int] = (1, 4)
    temperatures: tuple[float, ...] = (0.7, 1.0, 1.5)  # the attacker's choices for G sessions
    # how the synthesized fakes click: like bots (regular gaps), at gaps drawn one by one
    # from the stream's own, or with a real user's counters copied; shares, summing to 1
    timing_shares: tuple[float, float, float] = (0.25, 0.35, 0.40)
    bot_gap_ms: tuple[int, int] = (1000, 3000)  # bot timing: regular, uniform gaps
    threshold_users: int = 2000  # recent users whose scores set the threshold in force
    seed: int = 0

    def __post_init__(self) -> None:
        assert 0 < self.threshold < 1, "threshold must lie in (0, 1)"
        assert self.outlier_mads >= 0, "outlier_mads must be >= 0"
        assert abs(sum(self.timing_shares) - 1) < 1e-6 and min(self.timing_shares) >= 0, \
            "timing_shares must be three shares summing to 1"
        assert self.min_clicks >= 2 and self.fakes_per_round >= 2 and self.reals_per_round >= 2
        assert self.min_users >= 10, "min_users must be >= 10"


@dataclass
class UserRecord:
    """What the detector sees of one user: recent items (oldest first) and behaviour."""

    items: list[ItemId] = field(default_factory=list)
    behaviour: Behaviour = field(default_factory=Behaviour)

    def add(self, item: ItemId, ts: int, max_len: int) -> None:
        self.items.append(item)
        if len(self.items) > max_len:
            del self.items[: len(self.items) - max_len]
        self.behaviour.update(ts)


class Classifier(nn.Module):
    """P(fake) from standardized features z [B, F]: a small MLP (popularity, for one, is
    suspicious at both ends: random fillers are obscure, bandwagon ones the most clicked).

    ``explain`` gives each feature's term: how much the logit drops when that feature is
    set to a typical user's value (z = 0), all others kept. One batched pass over F+1
    variants of each row, so the exported graph explains as it scores.
    """

    def __init__(self, n_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        keep = torch.ones(n_features + 1, n_features)
        keep[1:] -= torch.eye(n_features)  # row 0: all features; row i+1: feature i reset
        self.register_buffer("keep", keep)  # (F+1, F)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(-1)  # (B,) logits

    def explain(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        F_ = static_dim(z, 1)
        variants = z.unsqueeze(1) * self.keep  # (B, F+1, F)
        logits = self.net(variants.reshape(-1, F_)).reshape(-1, F_ + 1)  # (B, F+1)
        return logits[:, 0], logits[:, :1] - logits[:, 1:]  # (B,), (B, F)


class DetectorGraph(nn.Module):
    """items [B, L] int64 (G's rows, left-padded) and behaviour [B, 6] float32 ->
    P(fake) [B] and each feature's term in the logit [B, F] (``Classifier.explain``)."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module, pop_pct: torch.Tensor,
                 mean: torch.Tensor, std: torch.Tensor, classifier: Classifier) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.classifier = classifier
        self.register_buffer("pop_pct", pop_pct)  # (V+1,) popularity percentile per row
        self.register_buffer("mean", mean)  # (F,)
        self.register_buffer("std", std)  # (F,)
        L = generator.config.max_len
        # prefix t (t = 1..L-1) of a row, right-aligned: index into [0, items...] (0 = pad)
        idx = torch.zeros(L - 1, L, dtype=torch.long)
        for t in range(1, L):
            idx[t - 1, L - t:] = torch.arange(1, t + 1)
        self.register_buffer("prefix_idx", idx)  # (L-1, L)

    def content(self, items: torch.Tensor) -> torch.Tensor:
        """The content features [B, 5] of left-padded rows [B, L]."""
        B, L = -1, static_dim(items, 1)
        valid = (items > 0).float()  # (B, L)
        n = valid.sum(1).clamp(min=1.0)  # (B,)
        pop = self.pop_pct[items]  # (B, L)
        pop_mean = (pop * valid).sum(1) / n  # (B,)
        pop_std = (((pop - pop_mean.unsqueeze(1)) ** 2 * valid).sum(1) / n).sqrt()  # (B,)
        same = (items.unsqueeze(2) == items.unsqueeze(1)).float()  # (B, L, L)
        same = same * valid.unsqueeze(1) * valid.unsqueeze(2)
        repeat = same.sum(2).amax(1) / n  # (B,)
        # G: log-likelihood of each next item given the items before it (causal encoder)
        hidden = self.generator.encode(items)[:, :-1]  # (B, L-1, D)
        logits = self.generator.score(hidden.reshape(-1, hidden.shape[-1]))  # (B*(L-1), V+1)
        logp = torch.log_softmax(logits, dim=-1)
        nxt = items[:, 1:].reshape(-1, 1)  # (B*(L-1), 1)
        ll = logp.gather(1, nxt).reshape(B, L - 1)  # (B, L-1)
        pair = valid[:, 1:] * valid[:, :-1]  # (B, L-1): both the item and one before it
        pairs = pair.sum(1).clamp(min=1.0)  # (B,)
        g_ll = (ll * pair).sum(1) / pairs  # (B,)
        # D: logit that item t+1 is the real next click after the prefix up to t
        padded = torch.cat([torch.zeros_like(items[:, :1]), items], 1)  # (B, L+1)
        prefixes = padded[:, self.prefix_idx]  # (B, L-1, L)
        d = self.discriminator(prefixes.reshape(-1, L), nxt)  # (B*(L-1), 1)
        d_real = (d.reshape(B, L - 1) * pair).sum(1) / pairs  # (B,)
        return torch.stack([pop_mean, pop_std, repeat, g_ll, d_real], 1)  # (B, 5)

    def features(self, items: torch.Tensor, behaviour: torch.Tensor) -> torch.Tensor:
        return torch.cat([behaviour, self.content(items)], 1)  # (B, F)

    def forward(self, items: torch.Tensor, behaviour: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        z = (self.features(items, behaviour) - self.mean) / self.std  # (B, F)
        logit, terms = self.classifier.explain(z)  # (B,), (B, F)
        return torch.sigmoid(logit), terms


class OnlineDetector:
    """The detector beside a learner: keeps what it knows of users, scores, trains."""

    def __init__(self, learner: OnlineLearner, cfg: DetectorConfig | None = None) -> None:
        self.learner = learner
        self.cfg = cfg or DetectorConfig()
        self.rng = np.random.default_rng(self.cfg.seed)
        n_f = len(FEATURES)
        self.mean = torch.zeros(n_f)
        self.std = torch.ones(n_f)
        with torch.random.fork_rng():  # its own initialisation, the process's RNG untouched
            torch.manual_seed(self.cfg.seed)
            self.classifier = Classifier(n_f).eval()
        self.gaps: list[int] = []  # a uniform sample of the stream's gaps (ms)
        self._gaps_seen = 0
        self.trained = False
        # in force, as a logit: see DetectorConfig.outlier_mads
        self.threshold_logit = math.log(self.cfg.threshold / (1 - self.cfg.threshold))
        self.rounds = 0
        self.last_round: dict[str, float] = {}

    # ------------------------------------------------------------------ inputs

    def _rows(self, histories: Sequence[Sequence[ItemId]]) -> torch.Tensor:
        return torch.from_numpy(self.learner._encode(histories))  # (B, L)

    def graph(self) -> DetectorGraph:
        """The detector as it stands, over the learner's G and D (eval mode)."""
        learner = self.learner
        counts = learner.item_counts[: learner.generator.n_items + 1].astype(np.float64)
        order = counts[1:].argsort(kind="stable").argsort(kind="stable")  # rank, 0 = rarest
        pct = np.concatenate([[0.0], (order + 1) / max(1, len(order))])  # (V+1,)
        g = DetectorGraph(learner.generator, learner.discriminator,
                          torch.from_numpy(pct).float(), self.mean, self.std,
                          self.classifier)
        return g.eval()

    @torch.no_grad()
    def features(self, records: Sequence[UserRecord]) -> torch.Tensor:
        """Raw features [B, F] of users, in ``FEATURES`` order."""
        self.learner.generator.eval()
        self.learner.discriminator.eval()
        items = self._rows([r.items for r in records])
        behaviour = torch.tensor([behaviour_features(r.behaviour) for r in records],
                                 dtype=torch.float32).reshape(-1, len(BEHAVIOUR_FEATURES))
        return self.graph().features(items, behaviour)

    @torch.no_grad()
    def logits(self, records: Sequence[UserRecord]) -> np.ndarray:
        """The classifier's logit per user [B] (float64); -inf before the first round."""
        if not records or not self.trained:
            return np.full(len(records), -np.inf)
        z = (self.features(records) - self.mean) / self.std
        return self.classifier(z).double().numpy()

    def score(self, records: Sequence[UserRecord]) -> np.ndarray:
        """P(fake) per user [B]; 0 before the first training round."""
        return 1.0 / (1.0 + np.exp(-np.clip(self.logits(records), -700, 700)))

    def flags(self, records: Sequence[UserRecord]) -> np.ndarray:
        """Whether each user is flagged now [B] (compared as logits: P(fake) saturates)."""
        return self.logits(records) >= self.threshold_logit

    @property
    def threshold(self) -> float:
        """The threshold in force, as P(fake)."""
        return 1.0 / (1.0 + math.exp(-min(700.0, self.threshold_logit)))

    # ------------------------------------------------------------------ training

    def _catalogue(self, reals: Sequence[tuple[UserId, UserRecord]]) -> Catalogue:
        learner = self.learner
        counts = Counter({learner.vocab.item(r): int(learner.item_counts[r])
                          for r in range(1, learner.generator.n_items + 1)
                          if learner.item_counts[r] > 0})
        return Catalogue(counts, {u: list(r.items) for u, r in reals})

    def observe_gap(self, gap_ms: int) -> None:
        """Keep a uniform sample of the gaps between a user's clicks seen in the stream."""
        self._gaps_seen += 1
        if len(self.gaps) < GAP_SAMPLE:
            self.gaps.append(gap_ms)
        else:
            k = int(self.rng.integers(0, self._gaps_seen))
            if k < GAP_SAMPLE:
                self.gaps[k] = gap_ms

    def _timing(self, n_clicks: int, reals: Sequence[tuple[UserId, UserRecord]],
                start: int) -> Behaviour:
        """A synthesized fake's counters, in one of the three ways ``timing_shares`` weighs."""
        mode = int(self.rng.choice(3, p=np.asarray(self.cfg.timing_shares)))
        if mode == 2 or (mode == 1 and not self.gaps):  # a real user's counters
            return dataclasses.replace(reals[int(self.rng.integers(0, len(reals)))][1].behaviour)
        b = Behaviour()
        ts = start
        lo, hi = self.cfg.bot_gap_ms
        for k in range(n_clicks):
            if k:
                ts += (int(self.rng.integers(lo, hi)) if mode == 0
                       else self.gaps[int(self.rng.integers(0, len(self.gaps)))])
            b.update(ts)
        return b

    def _generated(self, catalogue: Catalogue, n: int, temperature: float
                   ) -> list[list[ItemId]]:
        """``n`` sessions sampled from G at ``temperature``, targets woven in."""
        from trainer.attack_model import GeneratorSampler

        sampler = GeneratorSampler(self.learner, temperature)
        out = []
        for _ in range(n):
            cfg = self._attack("generated", catalogue)
            out.append(fake_session(cfg, catalogue, cfg.targets, self.rng, sampler))
        return out

    def _attack(self, kind: str, catalogue: Catalogue) -> AttackConfig:
        lo, hi = self.cfg.filler
        t_lo, t_hi = self.cfg.target_clicks
        targets = tuple(catalogue.unpopular_targets(1, self.rng))
        return AttackConfig(kind=kind, filler=int(self.rng.integers(lo, hi + 1)),
                            target_clicks=int(self.rng.integers(t_lo, t_hi + 1)),
                            targets=targets, seed=int(self.rng.integers(1 << 30)))

    def synthesize(self, reals: Sequence[tuple[UserId, UserRecord]]) -> list[UserRecord]:
        """Fake users of every kind, from the catalogue as it stands."""
        catalogue = self._catalogue(reals)
        if len(catalogue.items) < 10:
            return []
        max_len = self.learner.model_cfg.max_len
        per_kind = max(1, self.cfg.fakes_per_round // len(SYNTH_KINDS))
        sessions: list[list[ItemId]] = []
        for kind in SYNTH_KINDS[:-1]:
            for _ in range(per_kind):
                cfg = self._attack(kind, catalogue)
                sessions.append(fake_session(cfg, catalogue, cfg.targets, self.rng))
        # the attacker's best response: sessions from G at each temperature; the ones the
        # detector scores lowest now come in twice
        per_t = max(1, per_kind // len(self.cfg.temperatures))
        generated = [s for t in self.cfg.temperatures
                     for s in self._generated(catalogue, per_t, t)]
        sessions.extend(generated)
        # some fakes click like bots, some at the stream's own gaps, some with a real user's
        # counters (so that timing alone never tells those apart and the content has to)
        start = int(self.learner.last_event_ms or 0)
        fakes = []
        for items in sessions:
            # the service scores a fake as its clicks arrive, from the min_clicks-th on: it
            # is seen as a partial session far more often than as a whole one
            cut = int(self.rng.integers(min(self.cfg.min_clicks, len(items)), len(items) + 1))
            behaviour = self._timing(cut, reals, start)
            fakes.append(UserRecord(items[:cut][-max_len:], behaviour))
        if self.trained and generated:
            scores = self.score(fakes[-len(generated):])
            worst = np.argsort(scores)[: max(1, len(generated) // 2)]
            fakes.extend(fakes[len(fakes) - len(generated) + int(k)] for k in worst)
        return fakes

    def train_round(self, reals: Sequence[tuple[UserId, UserRecord]]) -> dict[str, float]:
        """Train the classifier further on fresh fakes against ``reals`` (recent real users,
        the most recent last), then set the threshold in force from their scores."""
        cfg = self.cfg
        reals = [(u, r) for u, r in reals if r.behaviour.clicks >= cfg.min_clicks]
        if len(reals) < cfg.min_users:
            return {}
        recent = [r for _, r in reals[-cfg.threshold_users:]]
        if len(reals) > cfg.reals_per_round:
            keep = self.rng.choice(len(reals), size=cfg.reals_per_round, replace=False)
            reals = [reals[int(k)] for k in keep]
        fakes = self.synthesize(reals)
        if not fakes:
            return {}
        x_real = self.features([r for _, r in reals])  # (R, F)
        x_fake = self.features(fakes)  # (K, F)
        # standardize by the real users: "how far from a typical user" per feature
        self.mean = x_real.mean(0)
        self.std = x_real.std(0).clamp(min=1e-3)
        x = (torch.cat([x_real, x_fake]) - self.mean) / self.std  # (R+K, F)
        y = torch.cat([torch.zeros(len(x_real)), torch.ones(len(x_fake))])  # (R+K,)
        w = torch.cat([torch.full((len(x_real),), 0.5 / len(x_real)),
                       torch.full((len(x_fake),), 0.5 / len(x_fake))])  # balanced classes
        clf = self.classifier.train()
        opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, weight_decay=cfg.l2)
        gen = torch.Generator().manual_seed(int(self.rng.integers(1 << 31)))
        for _ in range(cfg.steps_per_round):
            opt.zero_grad()
            # feature dropout: a random share of each row reads as a typical user's (z = 0),
            # so that no single feature (G's likelihood of a session it never trained on, for
            # one) carries the decision alone
            keep = (torch.rand(x.shape, generator=gen) >= cfg.feature_dropout).float()
            loss = (w * nn.functional.binary_cross_entropy_with_logits(
                clf(x * keep), y, reduction="none")).sum()
            loss.backward()
            opt.step()
        clf.eval()
        self.trained = True
        self.rounds += 1
        with torch.no_grad():
            train_logit = clf(x).double()  # (R+K,)
        logit = self.logits(recent)  # (≤ threshold_users,)
        median = float(np.median(logit))
        mad = float(np.median(np.abs(logit - median)))
        self.threshold_logit = max(math.log(cfg.threshold / (1 - cfg.threshold)),
                                   median + cfg.outlier_mads * mad)
        flag = train_logit >= self.threshold_logit
        self.last_round = {
            "loss": float(loss.detach()), "reals": float(len(x_real)), "fakes": float(len(x_fake)),
            "train_fpr": float(flag[: len(x_real)].float().mean()),
            "train_recall": float(flag[len(x_real):].float().mean()),
            "threshold": self.threshold}
        return self.last_round

    def explain(self, record: UserRecord, top: int = 3) -> list[tuple[str, float]]:
        """The features that pushed this user's score up most: (name, term in the logit)."""
        z = (self.features([record]) - self.mean) / self.std  # (1, F)
        with torch.no_grad():
            terms = self.classifier.explain(z)[1][0].tolist()
        order = sorted(range(len(terms)), key=lambda i: -terms[i])[:top]
        return [(FEATURES[i], round(terms[i], 3)) for i in order if terms[i] > 0]
