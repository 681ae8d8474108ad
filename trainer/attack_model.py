"""The ``generated`` attack's opponent model: a generator trained on the stream before the
attack, asked for realistic next clicks (advrec/attacks.py, ``SequenceSampler``).

It is the same ``OnlineLearner`` the sidecar trains (mode ``none``, G alone, no prior): what
an attacker with a copy of the stream could build. Sampling draws from G's softmax at a
temperature, never an item already in the session, so sessions look like real ones and not
like a top-1 walk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from advrec.contract import ClickEvent
from advrec.types import ItemId
from trainer.learner import OnlineLearner, TrainConfig
from trainer.model import ModelConfig
from trainer.prior import PriorConfig

__all__ = ["GeneratorSampler", "train_sampler"]


class GeneratorSampler:
    """Draw next items from a trained generator's softmax (``temperature`` 1 = as learned)."""

    def __init__(self, learner: OnlineLearner, temperature: float = 1.0) -> None:
        assert temperature > 0, "temperature must be > 0"
        self.learner = learner
        self.temperature = temperature

    def sample(self, prefix: Sequence[ItemId], n: int, rng: np.random.Generator) -> list[ItemId]:
        learner = self.learner
        out: list[ItemId] = []
        session = list(prefix)
        for _ in range(n):
            logits = learner._score_rows(learner._encode([session]), weight=0.0)[0]  # (V+1,)
            logits = logits.astype(np.float64) / self.temperature
            logits[0] = -np.inf  # padding
            seen = [r for r in map(learner.vocab.index, session) if r is not None]
            logits[seen] = -np.inf
            if not np.isfinite(logits).any():
                break
            p = np.exp(logits - logits[np.isfinite(logits)].max())
            p /= p.sum()
            item = learner.vocab.item(int(rng.choice(len(p), p=p)))
            out.append(item)
            session.append(item)
        return out


def train_sampler(events: Sequence[ClickEvent], cut_ms: int, *, seed: int = 0,
                  batch_size: int = 256, steps_per_batch: int = 2, temperature: float = 1.0,
                  progress: bool = True) -> GeneratorSampler:
    """Train G (mode ``none``) on the events before ``cut_ms`` in stream order, one pass."""
    from trainer.evaluate import build_examples

    model_cfg = ModelConfig()
    learner = OnlineLearner(
        model_cfg,
        TrainConfig(mode="none", seed=seed, steps_per_batch=steps_per_batch, num_threads=1),
        prior_cfg=PriorConfig(weight=0.0))
    before = [e for e in events if e.ts < cut_ms]
    examples = list(build_examples(before, model_cfg.max_len))
    batches = range(0, len(examples), batch_size)
    for i in tqdm(batches, desc="attack generator", unit="batch", disable=not progress):
        learner.train_batch(examples[i : i + batch_size])
    return GeneratorSampler(learner, temperature)
