"""The online learner: test-then-train on mini-batches of ``TrainingExample``s.

``evaluate_batch`` ranks each example's next item before the model has seen it
(prequential); ``train_batch`` then grows the vocabulary, mixes the batch with a replay
buffer of older examples, and runs the configured adversarial update. All randomness
(initialisation, dropout, sampling, replay) comes from the learner's own generators, saved
in ``state_dict``, so a resumed learner continues exactly as the original would have.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from advrec.contract import TrainingExample
from advrec.encoding import model_input
from advrec.links import SparseRows
from advrec.types import ItemId
from trainer.adversarial import (
    AdversarialConfig,
    AdversarialState,
    Batch,
    Players,
    get_update,
    uses_sampled,
)
from trainer.content import ColdScorer, ContentConfig, ContentTable, WithCold
from trainer.metrics import rank_targets, ranking_metrics
from trainer.model import (
    NEG,
    Discriminator,
    Generator,
    LazyAdam,
    ModelConfig,
    replace_param,
    trim_padding,
)
from trainer.prior import Cooccurrence, HybridScorer, PriorConfig, PriorScorer
from trainer.vocab import Vocabulary

__all__ = ["OnlineLearner", "ReplayBuffer", "TrainConfig"]

# 2: the vocabulary as one JSON string (``Vocabulary.state_dict``); 1 (a list) still loads.
# A trainer that knows only 1 refuses a 2 with "unknown state format", not a KeyError
STATE_FORMAT = 2
STATE_FORMATS_READ = (1, 2)
MAX_CALIB_MESSAGES = 20  # a joined batch calibrates the content score as this many at most


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and stream settings of the online learner."""

    mode: str = "none"  # none | irgan | apr | irgan+apr (trainer.adversarial.MODES)
    lr: float = 3e-3  # G's Adam step (SASRec: 1e-3; online 3e-3 learned faster, docs/results.md)
    # G's per-item tables (input rows, output rows, item bias) step at lr * item_lr_mult
    item_lr_mult: float = 1.0
    d_lr: float = 3e-3  # D sees one real item per example: at 1e-3 it stayed near chance longer
    # updates per arriving batch, each with a fresh replay sample: 1 left the generator far
    # behind item-kNN; 4 costs 4x the training compute (docs/results.md, "what we tried")
    steps_per_batch: int = 4
    # optional warm-up: the first ``warmup_batches`` batches get at least
    # ``warmup_steps_per_batch`` updates each; off, as it did not help (docs/results.md)
    warmup_batches: int = 0
    warmup_steps_per_batch: int = 1
    replay_size: int = 20000  # examples kept (20k x L=20 int64 rows is 3.2 MB)
    replay_ratio: float = 1.0  # replayed examples per new example in each update
    replay_policy: str = "reservoir"  # reservoir: uniform over the past; fifo: the most recent
    skip_flags: tuple[str, ...] = ("suspect",)  # examples carrying these flags are not trained on
    # a bounded vocabulary: an item with no click (and no catalogue refresh) for this long, in
    # event time, leaves it and its row is reused (``expire``); 0 keeps every item for ever
    item_ttl_s: float = 0.0
    eval_chunk: int = 512  # histories scored at once when ranking (bounds B x V memory)
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 0  # torch intra-op threads; 0 leaves torch's default

    def __post_init__(self) -> None:
        get_update(self.mode)  # raises on an unknown mode
        assert self.lr > 0 and self.d_lr > 0 and self.item_lr_mult > 0, "learning rates must be > 0"
        assert self.steps_per_batch >= 1, f"steps_per_batch {self.steps_per_batch} < 1"
        assert self.warmup_batches >= 0 and self.warmup_steps_per_batch >= 1, "warmup settings"
        assert self.replay_size >= 0 and self.replay_ratio >= 0, "replay settings must be >= 0"
        assert self.replay_policy in ("reservoir", "fifo"), f"policy {self.replay_policy!r}"
        assert self.eval_chunk >= 1 and self.num_threads >= 0
        assert self.item_ttl_s >= 0, f"item_ttl_s {self.item_ttl_s} < 0"


class ReplayBuffer:
    """Bounded store of encoded examples (history rows, target row): reservoir or FIFO."""

    def __init__(self, capacity: int, max_len: int, policy: str = "reservoir") -> None:
        self.capacity = capacity
        self.policy = policy
        self.history = np.zeros((capacity, max_len), dtype=np.int64)  # (N, L)
        self.target = np.zeros(capacity, dtype=np.int64)  # (N,)
        self.size = 0
        self.seen = 0  # examples ever offered (reservoir) / next slot counter (fifo)

    def __len__(self) -> int:
        return self.size

    def add(self, history: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> None:
        """Offer examples [n, L], [n] to the buffer."""
        for h, t in zip(history, target, strict=True):
            self.seen += 1
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            elif self.capacity == 0:
                continue
            elif self.policy == "fifo":
                slot = (self.seen - 1) % self.capacity
            else:  # Vitter's algorithm R: keep each of the `seen` examples with equal chance
                slot = int(rng.integers(0, self.seen))
                if slot >= self.capacity:
                    continue
            self.history[slot] = h
            self.target[slot] = t

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw up to ``n`` distinct examples: history [n, L], target [n]."""
        n = min(n, self.size)
        idx = rng.choice(self.size, size=n, replace=False) if n else np.zeros(0, np.int64)
        return self.history[idx], self.target[idx]

    def forget(self, rows: np.ndarray) -> int:
        """Drop the examples whose target is one of ``rows`` (freed vocabulary rows) and take
        those rows out of the others' histories, which close up to the right as a history
        of fewer known items would; return how many examples were dropped."""
        if self.size == 0 or rows.size == 0:
            return 0
        hist, target = self.history[: self.size], self.target[: self.size]
        keep = ~np.isin(target, rows)  # (N,)
        hist, target = hist[keep], target[keep]
        hit = np.isin(hist, rows)  # (N, L)
        for i in np.flatnonzero(hit.any(axis=1)):
            known = hist[i][(hist[i] != 0) & ~hit[i]]
            hist[i] = 0
            if known.size:
                hist[i, -known.size:] = known
        n = int(keep.sum())
        self.history[:n], self.target[:n] = hist, target
        self.history[n : self.size] = 0
        self.target[n : self.size] = 0
        dropped, self.size = self.size - n, n
        return dropped

    def state_dict(self) -> dict[str, Any]:
        return {"history": torch.from_numpy(self.history[: self.size].copy()),
                "target": torch.from_numpy(self.target[: self.size].copy()),
                "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = state["target"].shape[0]
        assert n <= self.capacity, f"saved replay holds {n} > capacity {self.capacity}"
        self.history[:n] = state["history"].numpy()
        self.target[:n] = state["target"].numpy()
        self.size = n
        self.seen = int(state["seen"])


class OnlineLearner:
    """Generator + discriminator trained online, prequentially, on ``TrainingExample``s."""

    _fixed_prior: PriorScorer | None = None  # a frozen copy's prior (``frozen``)

    def __init__(self, model_cfg: ModelConfig | None = None, train_cfg: TrainConfig | None = None,
                 adv_cfg: AdversarialConfig | None = None,
                 prior_cfg: PriorConfig | None = None,
                 content_cfg: ContentConfig | None = None) -> None:
        self.model_cfg = model_cfg or ModelConfig()
        self.train_cfg = train_cfg or TrainConfig()
        self.adv_cfg = adv_cfg or AdversarialConfig()
        self.prior_cfg = prior_cfg or PriorConfig()
        # counted whatever the weight, so that a weight set later has the whole past
        self.cooc = Cooccurrence.from_config(self.prior_cfg)
        self._update = get_update(self.train_cfg.mode)
        if self.train_cfg.num_threads:
            torch.set_num_threads(self.train_cfg.num_threads)
        self.device = torch.device(self.train_cfg.device)
        seed = self.train_cfg.seed
        self._torch_rng = torch.Generator().manual_seed(seed).get_state()
        self._cuda_rng: torch.Tensor | None = None
        with self._rng():
            self.generator = Generator(self.model_cfg).to(self.device)
            self.discriminator = Discriminator(self.model_cfg).to(self.device)
        self._np_rng = np.random.default_rng(seed)
        self.vocab = Vocabulary()
        self.item_counts = np.zeros(self.model_cfg.n_items + 1, dtype=np.int64)  # (cap+1,)
        # event time (ms) of each row's latest click or catalogue refresh; 0: not yet noted
        self.item_last_ms = np.zeros(self.model_cfg.n_items + 1, dtype=np.int64)  # (cap+1,)
        self.expired: list[tuple[int, ItemId]] = []  # (row, id) the last batch freed
        self._holes_key: tuple[int, int] | None = None  # what G's hole mask was made for
        self.replay = ReplayBuffer(self.train_cfg.replay_size, self.model_cfg.max_len,
                                   self.train_cfg.replay_policy)
        self.adv_state = AdversarialState()
        self._build_optimizers()
        # catalogue content (trainer/content.py): made by the first add_catalogue
        self.content_cfg = content_cfg or ContentConfig()
        self.content: ContentTable | None = None
        self.examples_seen = 0
        self.batches_seen = 0
        self.last_event_ms: int | None = None

    # ------------------------------------------------------------------ plumbing

    def _build_optimizers(self) -> None:
        lr, mult = self.train_cfg.lr, self.train_cfg.item_lr_mult
        if mult == 1.0:  # one group, as checkpoints written before item_lr_mult hold
            self.g_optimizer = LazyAdam(self.generator.parameters(), lr=lr)
        else:  # two groups: the item tables (stepping at lr * mult) and everything else
            tables = [t.emb.weight for t in self.generator.item_tables()]
            table_ids = {id(p) for p in tables}
            rest = [p for p in self.generator.parameters() if id(p) not in table_ids]
            self.g_optimizer = LazyAdam(
                [{"params": rest}, {"params": tables, "lr": lr * mult}], lr=lr)
        self.d_optimizer = LazyAdam(self.discriminator.parameters(), lr=self.train_cfg.d_lr)

    @contextlib.contextmanager
    def _rng(self) -> Iterator[None]:
        """Run with the learner's own torch RNG state, leaving the process's untouched."""
        cuda = self.device.type == "cuda"
        devices = [self.device.index or 0] if cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self._torch_rng)
            if cuda and self._cuda_rng is None:
                torch.cuda.manual_seed(self.train_cfg.seed)
            elif cuda:
                torch.cuda.set_rng_state(self._cuda_rng, self.device)
            yield
            self._torch_rng = torch.get_rng_state()
            if cuda:
                self._cuda_rng = torch.cuda.get_rng_state(self.device)

    def _grow(self, n_new: int) -> None:
        """Give ``n_new`` new vocabulary items rows in G, D and their optimizers."""
        for old, new in self.generator.grow(n_new):
            replace_param(self.g_optimizer, old, new)
        for old, new in self.discriminator.grow(n_new):
            replace_param(self.d_optimizer, old, new)
        if len(self.item_counts) < len(self.vocab) + 1:
            size = self.generator.items.capacity + 1
            for name in ("item_counts", "item_last_ms"):
                old = getattr(self, name)
                grown = np.zeros(size, dtype=np.int64)
                grown[: len(old)] = old
                setattr(self, name, grown)
        self._sync_holes()

    def _sync_holes(self) -> None:
        """Give G the vocabulary's holes again if they changed or its tables reallocated."""
        key = (self.vocab.hole_epoch, self.generator.items.capacity)
        if key != self._holes_key:
            self.generator.set_holes(self.vocab.holes())
            self._holes_key = key

    def add_items(self, items: Iterable[ItemId], ts_ms: int | None = None) -> None:
        """Give ``items`` vocabulary rows (untrained) without training on them: the fake-user
        detector keeps statistics of every clicked item, flagged users' ones too. ``ts_ms``
        (default: the newest event seen) is when they were last active."""
        before = len(self.vocab)
        rows = self.vocab.add_many(items)
        with self._rng():
            self._grow(len(self.vocab) - before)
        self.touch(rows, self.last_event_ms if ts_ms is None else ts_ms)

    # ------------------------------------------------------------------ bounded vocabulary

    @property
    def bounded(self) -> bool:
        """Whether items leave the vocabulary after ``item_ttl_s`` without a click."""
        return self.train_cfg.item_ttl_s > 0

    def touch(self, rows: Sequence[int] | np.ndarray, ts_ms: int | None) -> None:
        """Note activity (a click, a catalogue refresh) of ``rows`` at event time ``ts_ms``."""
        rows = np.asarray(rows, dtype=np.int64)
        if ts_ms is not None and rows.size:
            np.maximum.at(self.item_last_ms, rows, int(ts_ms))

    def expire(self, now_ms: int | None = None) -> list[tuple[int, ItemId]]:
        """Free the rows of items with no activity for ``item_ttl_s`` before ``now_ms``
        (default: the newest event seen); return the (row, id) pairs freed.

        A freed row leaves everything that knows it: the vocabulary (the next new item takes
        the row), G and D (the rows start afresh, with Adam's moments at zero, and G scores
        them ``NEG`` until reused), the click counts, the co-occurrence links from and to
        it, its content, and the replay buffer (examples that target it are dropped; in the
        others' histories it is skipped as an unknown item would be). A row nobody noted
        (saved before the vocabulary was bounded) counts as active at the first call.
        """
        now_ms = self.last_event_ms if now_ms is None else now_ms
        if not self.bounded or now_ms is None:
            return []
        n = len(self.vocab) + 1
        last = self.item_last_ms[:n]
        last[1:][last[1:] == 0] = now_ms
        stale = np.flatnonzero(last < now_ms - round(1000 * self.train_cfg.item_ttl_s))
        stale = stale[stale > 0]
        live = [int(r) for r in stale if self.vocab.at(int(r)) is not None]
        if not live:
            return []
        rows = np.asarray(live, dtype=np.int64)
        items = self.vocab.free(live)
        with self._rng():
            self.generator.reset_rows(rows, self.g_optimizer)
            self.discriminator.reset_rows(rows, self.d_optimizer)
        self._sync_holes()
        self.item_counts[rows] = 0
        self.item_last_ms[rows] = 0
        self.cooc.forget(live)
        if self.content is not None:
            self.content.drop(rows)
            for item in items:
                self.content.digests.pop(item, None)
        self.replay.forget(rows)
        return list(zip(live, items, strict=True))

    # ------------------------------------------------------------------ catalogue content

    def add_catalogue(self, items: Sequence[ItemId], vectors: np.ndarray,
                      digests: Sequence[str] | None = None) -> None:
        """Give catalogue ``items`` rows (if new) and their content ``vectors`` [N, C]: those
        with no click yet are ranked by their content from now on (``ColdScorer``)."""
        if not items:
            return
        self.add_items(items)
        if self.content is None:
            self.content = ContentTable(self.content_cfg, vectors.shape[1])
        rows = np.array([self.vocab.index(i) for i in items], dtype=np.int64)
        self.content.set(rows, vectors)
        if digests is not None:
            self.content.digests.update(zip(items, digests, strict=True))

    def drop_catalogue(self, items: Sequence[ItemId]) -> None:
        """The catalogue deleted ``items``: their content is forgotten; one that never had a
        click keeps its untrained row, which ranks no better than any fresh row."""
        if self.content is None:
            return
        rows = np.array([r for r in map(self.vocab.index, items) if r is not None],
                        dtype=np.int64)
        for item in items:
            self.content.digests.pop(item, None)
        self.content.drop(rows)

    def cold_rows(self, n_rows: int | None = None) -> np.ndarray:
        """Rows below ``n_rows`` (default: every live row) of catalogue items with no click."""
        if self.content is None:
            return np.zeros(0, dtype=np.int64)
        rows = self.content.rows(self.generator.n_items + 1 if n_rows is None else n_rows)
        return rows[self.item_counts[rows] == 0]

    def content_rows(self) -> tuple[int, int]:
        """(items with content, of those with no click yet: the ones ranked by content)."""
        if self.content is None:
            return 0, 0
        rows = self.content.rows(self.generator.n_items + 1)
        return int(rows.size), int(np.count_nonzero(self.item_counts[rows] == 0))

    def cold_scorer(self, n_cols: int | None = None) -> ColdScorer | None:
        """The content score of the rows that need it, as things stand (None: no row does,
        or the catalogue is too small to have axes yet)."""
        content = self.content
        if content is None or content.axes.shape[0] == 0:
            return None
        n_cols = self.generator.n_items + 1 if n_cols is None else n_cols
        rows = content.rows(n_cols)
        counts = self.item_counts[rows].astype(np.float64)
        k = self.content_cfg.blend_clicks
        weight = np.where(counts == 0, 1.0, k / (counts + k) if k > 0 else 0.0)
        if not np.any(weight > 0):
            return None
        mix = np.zeros(n_cols, dtype=np.float32)  # (V+1,)
        mix[rows] = weight
        return ColdScorer(content.projected(n_cols), mix, self.content_cfg.position_weights(),
                          content.scale.item(), content.shift.item()).to(self.device)

    def _calibrate_cold(self, examples: Sequence[TrainingExample],
                        messages: int = 1) -> dict[str, float]:
        """Fit the content score's scale and shift (a, b) a few steps further by maximum
        likelihood of this batch's targets under the served scores, before training on it.

        Without it, the score of thousands of items nobody clicks yet would be on a scale
        of its own: too high, and they crowd the lists; too low, and no new item is ever
        shown. The likelihood puts the content rows' probability where the stream's clicks
        on new items are: their share of the lists follows their share of the clicks. A batch
        that joins several messages (a trainer shedding load) gets the steps of each, up to
        ``MAX_CALIB_MESSAGES`` of them.
        """
        cold = self.cold_scorer()
        content = self.content
        if cold is None or content is None or self.content_cfg.calib_steps == 0:
            return {}
        n_cols = self.generator.n_items + 1
        rows = np.array([r if r is not None and r < n_cols else -1
                         for r in map(self.vocab.index, (e.item for e in examples))])
        keep = np.flatnonzero(rows > 0)
        if keep.size == 0:
            return {}
        history = self._encode([examples[i].history for i in keep])  # (B, L)
        with torch.no_grad():
            base = torch.from_numpy(self._score_rows(history, cold=False)).to(self.device)
            base[:, 0] = NEG  # (B, V+1)
            sim = cold.similarity(trim_padding(torch.from_numpy(history).to(self.device)))
        target = torch.from_numpy(rows[keep]).to(self.device)  # (B,)
        mix = cold.mix  # (V+1,)
        for _ in range(self.content_cfg.calib_steps * min(messages, MAX_CALIB_MESSAGES)):
            final = base + mix * (content.scale * sim + content.shift - base)  # (B, V+1)
            loss = torch.nn.functional.cross_entropy(final, target)
            content.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            content.optimizer.step()
        share = float((mix[target] == 1.0).float().mean())
        return {"cold_share": share, "content_scale": content.scale.item(),
                "content_shift": content.shift.item(), "content_loss": float(loss.detach())}

    def _encode(self, histories: Sequence[Sequence[ItemId]]) -> np.ndarray:
        return model_input([self.vocab.known_rows(h) for h in histories],
                           self.model_cfg.max_len)  # (B, L)

    def prior_scorer(self) -> PriorScorer:
        """Return the co-occurrence prior over the live rows, as it stands now: on the CPU a
        view of the counts' table (no copy: at 1M items a copy was ~0.25 s of every
        evaluation and export), valid until the learner trains again; ``frozen`` keeps a
        copy of its own."""
        if self._fixed_prior is not None:  # a frozen copy's (``frozen``)
            return self._fixed_prior
        n_rows = self.generator.n_items + 1
        idx, val = self.cooc.table(n_rows)  # (V+1, K) each
        return PriorScorer(idx, val, self.prior_cfg,
                           held=self.cooc.held_rows(n_rows)).to(self.device)

    def frozen(self, generator: Generator | None = None,
               links: SparseRows | None = None) -> OnlineLearner:
        """A copy that ranks (``evaluate_batch``, ``scorer``) as this learner does now and
        never trains: what the trainer's quality gate compares each candidate with.
        ``generator``: a copy of G to rank with instead of a fresh ``live_copy`` (the
        export's, which it no longer changes: one 256 MB copy less at 1M items).
        ``links``: the prior's table as it stands now, as rows of links (the two-stage
        bundle's own, ``advrec.links.SparseRows``), when the caller has them.

        Only what ranking reads is copied: G, the vocabulary, the content, the counts; the
        prior as its links (``PriorScorer.from_links``). Not D, the optimizers, the replay
        buffer or the co-occurrence counts, which ``copy.deepcopy`` took ~23 s to copy at
        1M items (a dict per item).
        """
        skip = (self.discriminator, self.g_optimizer, self.d_optimizer, self.replay,
                self.cooc, self.vocab, self.adv_state)
        prior = None
        if self.prior_cfg.weight > 0:
            idx, val = self.cooc.table(self.generator.n_items + 1)  # (V+1, K) each
            if links is None or links.rows is not None or links.n_rows != len(idx):
                links = SparseRows.from_dense(idx, val, rows=self.cooc.held_rows(len(idx)))
            prior = PriorScorer.from_links(links, idx.shape[1], self.prior_cfg).to(self.device)
        memo: dict[int, Any] = {id(x): None for x in skip}
        memo[id(self.generator)] = (self.generator.live_copy() if generator is None
                                    else generator)
        twin = copy.deepcopy(self, memo=memo)
        twin.vocab = self.vocab.copy()
        twin._fixed_prior = prior
        return twin

    def scorer(self, generator: torch.nn.Module | None = None) -> torch.nn.Module:
        """Return what ranks: G, plus the weighted prior when its weight is > 0, followed by
        the content score of catalogue items with no click when there are any (the module
        the export turns into ONNX; ``generator`` defaults to the learner's own G)."""
        generator = self.generator if generator is None else generator
        model: torch.nn.Module = generator
        if self.prior_cfg.weight > 0:
            model = HybridScorer(generator, self.prior_scorer(), self.prior_cfg.weight)
        cold = self.cold_scorer()
        return model if cold is None else WithCold(model, cold)

    @torch.no_grad()
    def _score_rows(self, history: np.ndarray, weight: float | None = None,
                    cold: bool = True) -> np.ndarray:
        """Score encoded histories [B, L] -> [B, V+1] in eval mode, in chunks (``weight``:
        the prior's weight, default the configured one; 0 scores with G alone; ``cold``:
        catalogue items with no click by their content)."""
        self.generator.eval()
        weight = self.prior_cfg.weight if weight is None else weight
        model: torch.nn.Module = (self.generator if weight <= 0
                                  else HybridScorer(self.generator, self.prior_scorer(), weight,
                                                    in_place=True))
        content = self.cold_scorer() if cold else None
        if content is not None:
            model = WithCold(model, content)
        chunk = self.train_cfg.eval_chunk
        out = [model(trim_padding(torch.from_numpy(history[i : i + chunk])
                                  .to(self.device))).float().cpu().numpy()
               for i in range(0, len(history), chunk)]
        if not out:
            return np.zeros((0, self.generator.n_items + 1), dtype=np.float32)
        return np.concatenate(out)  # (B, V+1)

    @torch.no_grad()
    def score_parts(self, histories: Sequence[Sequence[ItemId]]
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Return G's logits and ``log(1 + prior)`` [B, V+1] each, for choosing the prior's
        weight: the hybrid's scores are ``logits + weight * prior``."""
        history = self._encode(histories)  # (B, L)
        logits = self._score_rows(history, weight=0.0)  # (B, V+1)
        h = torch.from_numpy(history).to(self.device)
        prior = self.prior_scorer()(h, torch.from_numpy(logits).to(self.device))
        return logits, prior.float().cpu().numpy()

    def _log_q(self) -> torch.Tensor | None:
        """Return log popularity of each live row [V+1] for sampled softmax, else None."""
        if not uses_sampled(self.adv_cfg, self.generator.n_items):
            return None
        counts = self.item_counts[1 : len(self.vocab) + 1].astype(np.float64) + 1.0  # (V,)
        holes = np.asarray(self.vocab.holes(), dtype=np.int64)
        counts[holes - 1] = 0.0  # freed rows are never drawn
        with np.errstate(divide="ignore"):
            log_q = np.concatenate([[0.0], np.log(counts / counts.sum())])  # (V+1,)
        log_q[holes] = -1e4  # exp(-1e4) is 0 in float32; finite, so no NaN meets a 0
        return torch.from_numpy(log_q).float().to(self.device)

    # ------------------------------------------------------------------ prequential

    def target_ranks(self, batch: Sequence[TrainingExample],
                     variants: Sequence[str] = ("A",)) -> dict[str, np.ndarray]:
        """Rank each example's next item under each variant (``trainer.metrics.rank_targets``:
        pessimistic ties; 0 for an item the model does not know; ``OUT_OF_LIST`` for a target
        variant A removes because the example's history holds it), scoring the batch once."""
        if not batch:
            return {v: np.zeros(0, dtype=np.int64) for v in variants}
        known = [self.vocab.known_rows(e.history) for e in batch]
        history = model_input(known, self.model_cfg.max_len)  # (B, L)
        target = np.array([self.vocab.index(e.item) or -1 for e in batch], dtype=np.int64)
        # float32 as scored: widening them would change no comparison, and cost a pass over
        # B x (V+1) (160 MB a batch at 1M items)
        scores = self._score_rows(history)  # (B, V+1)
        seen = [np.asarray(rows, dtype=np.int64) for rows in known]
        return {v: rank_targets(scores if n == len(variants) - 1 else scores.copy(), target,
                                seen, variant=v, never=0)
                for n, v in enumerate(variants)}

    def evaluate_batch(self, batch: Sequence[TrainingExample], ks: Sequence[int] = (10, 20),
                       variants: Sequence[str] = ("A",)) -> dict[str, float]:
        """Rank each example's next item before training on it: ``hr@k``, ``ndcg@k`` and
        ``mrr@k`` over the targets the model knows, under the first of ``variants``; the same
        prefixed ``B:`` (etc.) for the others; ``n_eval`` and ``n_unknown_target``."""
        ranks = self.target_ranks(batch, variants)
        out: dict[str, float] = {}
        for n, variant in enumerate(variants):
            known = ranks[variant][ranks[variant] > 0]
            prefix = "" if n == 0 else f"{variant}:"
            out.update({prefix + key: value
                        for key, value in ranking_metrics(known, ks).items()})
            if n == 0:
                out["n_eval"] = float(known.size)
                out["n_unknown_target"] = float(len(ranks[variant]) - known.size)
        return out

    # ------------------------------------------------------------------ training

    def steps_for_next_batch(self) -> int:
        """Return how many updates the next batch gets (more during the warm-up)."""
        cfg = self.train_cfg
        if self.batches_seen < cfg.warmup_batches:
            return max(cfg.steps_per_batch, cfg.warmup_steps_per_batch)
        return cfg.steps_per_batch

    def train_batch(self, batch: Sequence[TrainingExample], fraction: float = 1.0,
                    messages: int = 1) -> dict[str, float]:
        """Grow the vocabulary, update on the batch mixed with replay, then store the batch.

        With ``fraction`` < 1 (the trainer shedding load) the update uses a random sample of
        that share of the batch; every example still grows the vocabulary and enters the
        replay buffer, so the rest may be trained on later. ``messages`` is how many
        ``train-batches`` messages the batch joins (several while shedding): ``batches_seen``
        counts messages, so a checkpoint says how much of the topic the model has seen.
        """
        assert 0.0 < fraction <= 1.0, f"fraction {fraction} outside (0, 1]"
        self.expired = []
        skip = set(self.train_cfg.skip_flags)
        examples = [e for e in batch if not skip.intersection(e.flags)]
        if batch:
            newest = max(e.ts for e in batch)
            self.last_event_ms = max(newest, self.last_event_ms or newest)
        out: dict[str, float] = {"examples": 0.0, "shed": 0.0,
                                 "skipped": float(len(batch) - len(examples))}
        if not examples:
            self.batches_seen += messages
            return out
        if self.content is not None:  # before the batch's clicks make its cold items warm
            out.update(self._calibrate_cold(examples, messages))
        before = len(self.vocab)
        n_recent = self.prior_cfg.n_recent
        for e in examples:
            if not self.bounded:  # bounded, only a click brings an item (back) in
                self.vocab.add_many(e.history)
            j = self.vocab.add(e.item)
            recent = self.vocab.known_rows(e.history[-n_recent:])[::-1]  # latest first
            self.cooc.learn(recent, j)
        history = self._encode([e.history for e in examples])  # (N, L)
        target = np.array([self.vocab.index(e.item) for e in examples], dtype=np.int64)  # (N,)
        if fraction < 1.0:
            n = max(1, round(fraction * len(examples)))
            pick = np.sort(self._np_rng.choice(len(examples), size=n, replace=False))
            train_h, train_t = history[pick], target[pick]  # (B, L), (B,)
        else:
            train_h, train_t = history, target
        out["examples"] = float(len(train_t))
        out["shed"] = float(len(target) - len(train_t))
        n_replay = round(self.train_cfg.replay_ratio * len(train_t))
        sums: dict[str, float] = {}
        with self._rng():
            self._grow(len(self.vocab) - before)
            np.add.at(self.item_counts, target, 1)
            np.maximum.at(self.item_last_ms, target,
                          np.array([e.ts for e in examples], dtype=np.int64))
            log_q = self._log_q()
            sparse = uses_sampled(self.adv_cfg, self.generator.n_items)
            self.generator.set_sparse(sparse)  # only the rows a sampled batch touches step
            self.discriminator.set_sparse(sparse)
            cold = self.cold_rows()
            blocked = None
            if cold.size:
                blocked = torch.zeros(self.generator.n_items + 1, dtype=torch.bool,
                                      device=self.device)  # (V+1,)
                blocked[torch.from_numpy(cold).to(self.device)] = True
            players = Players(self.generator, self.discriminator,
                              self.g_optimizer, self.d_optimizer)
            steps = self.steps_for_next_batch()
            for _ in range(steps):
                old_h, old_t = self.replay.sample(n_replay, self._np_rng)
                step_batch = Batch(
                    trim_padding(torch.from_numpy(np.concatenate([train_h, old_h]))
                                 .to(self.device)),
                    torch.from_numpy(np.concatenate([train_t, old_t])).to(self.device),
                    log_q, blocked)
                stats = self._update(players, step_batch, self.adv_cfg, self.adv_state)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value / steps
                out["replay_examples"] = float(len(old_t))
        self.replay.add(history, target, self._np_rng)
        self.examples_seen += len(examples)
        self.batches_seen += messages
        out.update(sums)
        out["new_items"] = float(len(self.vocab) - before)
        self.expired = self.expire()
        out["expired_items"] = float(len(self.expired))
        out["vocab_size"] = float(len(self.vocab))
        out["live_items"] = float(self.vocab.n_live)
        return out

    # ------------------------------------------------------------------ serving-side helpers

    def scores(self, histories: Sequence[Sequence[ItemId]]) -> np.ndarray:
        """Score every known item for each history: [B, V+1] (column 0 is padding)."""
        return self._score_rows(self._encode(histories))

    def recommend(self, history: Sequence[ItemId], k: int,
                  exclude_seen: bool = True) -> list[ItemId]:
        """Return the top ``k`` item ids for one history."""
        scores = self.scores([history])[0].astype(np.float64)  # (V+1,)
        scores[0] = -np.inf
        scores[self.vocab.holes()] = -np.inf
        if exclude_seen:
            seen = [r for r in map(self.vocab.index, history) if r is not None]
            scores[seen] = -np.inf
        k = min(k, int(np.isfinite(scores).sum()))
        top = np.argsort(-scores, kind="stable")[:k]
        return [self.vocab.item(int(r)) for r in top]

    # ------------------------------------------------------------------ state

    def state_dict(self, *, keep: bool = True) -> dict[str, Any]:
        """Return everything needed to resume exactly: a deep copy, safe to keep, or with
        ``keep=False`` the learner's own tensors, for a caller that serializes them before
        the learner trains again (a checkpoint's save: at 1M items the copy was ~1 GB and
        ~4 s)."""
        state = {
            "format": STATE_FORMAT,
            "model_config": dataclasses.asdict(self.model_cfg),
            "train_config": dataclasses.asdict(self.train_cfg),
            "adversarial_config": dataclasses.asdict(self.adv_cfg),
            "prior_config": dataclasses.asdict(self.prior_cfg),
            "cooccurrence": self.cooc.state_dict(),
            "g_capacity": self.generator.items.capacity,
            "d_capacity": self.discriminator.items.capacity,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "g_optimizer": self.g_optimizer.state_dict(),
            "d_optimizer": self.d_optimizer.state_dict(),
            "vocab": self.vocab.state_dict(),
            "item_counts": torch.from_numpy(self.item_counts),
            "item_last_ms": torch.from_numpy(self.item_last_ms),
            "replay": self.replay.state_dict(),
            "adversarial_state": self.adv_state.state_dict(),
            "examples_seen": self.examples_seen,
            "batches_seen": self.batches_seen,
            "last_event_ms": self.last_event_ms,
            "torch_rng": self._torch_rng,
            "cuda_rng": self._cuda_rng,
            "np_rng": self._np_rng.bit_generator.state,
            "content_config": dataclasses.asdict(self.content_cfg),
            "content": None if self.content is None else self.content.state_dict(),
        }
        return copy.deepcopy(state) if keep else state

    def load_state_dict(self, state: dict[str, Any], *, keep: bool = True) -> None:
        """Restore a state saved by ``state_dict`` (configs included). ``keep=False``: the
        learner may take the state's tensors as its own (a state just read from a file,
        which no one else holds), instead of a deep copy of them."""
        assert state.get("format") in STATE_FORMATS_READ, \
            f"unknown state format {state.get('format')}"
        if keep:
            state = copy.deepcopy(state)
        self.model_cfg = ModelConfig(**state["model_config"])
        train = dict(state["train_config"], skip_flags=tuple(state["train_config"]["skip_flags"]))
        self.train_cfg = TrainConfig(**train)
        self.adv_cfg = AdversarialConfig(**state["adversarial_config"])
        # states saved before the prior: no prior, counts start empty
        self.prior_cfg = PriorConfig(**state.get("prior_config", {}))
        self.cooc = (Cooccurrence.from_state_dict(state["cooccurrence"])
                     if "cooccurrence" in state else Cooccurrence.from_config(self.prior_cfg))
        self._update = get_update(self.train_cfg.mode)
        self.device = torch.device(self.train_cfg.device)
        self.vocab = Vocabulary.from_state(state["vocab"])
        if self.train_cfg.num_threads:
            torch.set_num_threads(self.train_cfg.num_threads)
        with torch.random.fork_rng(devices=[]):  # fresh modules draw init values; discard them
            self.generator = Generator(self.model_cfg)
            self.discriminator = Discriminator(self.model_cfg)
            self.generator.resize(state["g_capacity"], len(self.vocab))
            self.discriminator.resize(state["d_capacity"], len(self.vocab))
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.generator.to(self.device)
        self.discriminator.to(self.device)
        self._build_optimizers()
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.item_counts = state["item_counts"].numpy().copy()
        # states saved before the bounded vocabulary: no row noted yet
        self.item_last_ms = (state["item_last_ms"].numpy().copy() if "item_last_ms" in state
                             else np.zeros_like(self.item_counts))
        self.expired = []
        self._holes_key = None
        self._sync_holes()
        self.replay = ReplayBuffer(self.train_cfg.replay_size, self.model_cfg.max_len,
                                   self.train_cfg.replay_policy)
        self.replay.load_state_dict(state["replay"])
        self.adv_state = AdversarialState()
        self.adv_state.load_state_dict(state["adversarial_state"])
        self.examples_seen = int(state["examples_seen"])
        self.batches_seen = int(state["batches_seen"])
        self.last_event_ms = state["last_event_ms"]
        self._torch_rng = state["torch_rng"]
        self._cuda_rng = state["cuda_rng"]
        self._np_rng = np.random.default_rng()
        self._np_rng.bit_generator.state = state["np_rng"]
        # states saved before catalogue content: none
        self.content_cfg = ContentConfig(**state.get("content_config", {}))
        saved = state.get("content")
        self.content = None if saved is None else ContentTable.from_state_dict(saved)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, keep: bool = True) -> OnlineLearner:
        """Build a learner from a saved state (``keep`` as for ``load_state_dict``)."""
        learner = cls.__new__(cls)
        learner.load_state_dict(state, keep=keep)
        return learner

