"""``advrec attack``: replay a stream with fake users merged in; and the ``generated``
attack's opponent model, a generator trained on the stream before the attack and asked for
realistic next clicks (advrec/attacks.py, ``SequenceSampler``).

It is the same ``OnlineLearner`` the sidecar trains (mode ``none``, G alone, no prior): what
an attacker with a copy of the stream could build. Sampling draws from G's softmax at a
temperature, never an item already in the session, so sessions look like real ones and not
like a top-1 walk.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from advrec import replay
from advrec.attacks import AttackConfig, add_attack_arguments, attack_config, inject
from advrec.contract import ClickEvent
from advrec.types import ItemId
from trainer.learner import OnlineLearner, TrainConfig
from trainer.model import ModelConfig
from trainer.prior import PriorConfig

__all__ = ["GeneratorSampler", "attack_sampler", "main", "train_sampler"]


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


def attack_sampler(cfg: AttackConfig, events: Sequence[ClickEvent],
                   progress: bool = True) -> GeneratorSampler | None:
    """The generated attack's generator, trained on ``events`` before the attack window;
    None for the other kinds."""
    if cfg.kind != "generated":
        return None
    t0, t1 = events[0].ts, events[-1].ts
    return train_sampler(events, int(t0 + cfg.start * (t1 - t0)), seed=cfg.seed,
                         progress=progress)


def _attacked(args: argparse.Namespace, events: Iterable[ClickEvent]
              ) -> tuple[list[ClickEvent], int]:
    """Merge the requested attack into ``events``; write its labels aside."""
    cfg = attack_config(args)
    stream = list(events)
    if not stream:
        raise ValueError("the stream is empty: nothing to attack")
    merged, labels = inject(stream, cfg, attack_sampler(cfg, stream, not args.no_progress))
    labels.write(args.labels)
    logging.getLogger("advrec.attack").info(
        "attack %s: %d fake users (%d events) pushing %s; labels in %s", cfg.kind,
        len(labels.fake_users), labels.n_events, ", ".join(labels.targets), args.labels)
    return merged, len(merged)


def build_parser() -> argparse.ArgumentParser:
    p = replay.build_parser()
    p.prog = "advrec attack"
    p.description = (
        "Replay a stream into Kafka with a shilling attack merged in, as a producer of fake "
        "accounts would send it: fake users at a budget, with random, popular (average, "
        "bandwagon), segment or generated fillers around target items. Which users are "
        "fake is written to --labels and never reaches the service. Every replay option "
        "applies.")
    add_attack_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.attack is None:
        print("advrec attack: --attack KIND is required", file=sys.stderr)
        return 2
    args.prog = "advrec attack"
    return replay.run(args, _attacked)
