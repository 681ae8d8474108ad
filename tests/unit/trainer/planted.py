"""A tiny click stream with planted structure, and its popularity baseline, for the tests."""

from __future__ import annotations

import random
from collections import Counter

from advrec.contract import TrainingExample
from trainer.model import ModelConfig

# Small enough that a 40-batch stream trains in about a second per mode on one core.
SMALL = ModelConfig(n_items=64, max_len=20, d_model=32, n_heads=2, n_layers=1, dropout=0.1,
                    d_disc=16)


def planted_stream(n_batches: int, batch_size: int = 64, *, n_items: int = 200,
                   n_clusters: int = 10, n_users: int = 100, max_history: int = 20,
                   seed: int = 0) -> list[list[TrainingExample]]:
    """Return batches of examples where each user clicks only inside one item cluster.

    Item ``i`` belongs to cluster ``i % n_clusters``; a user's next click is uniform over
    their cluster, so a model that reads the history ranks the target in its top 10 most
    of the time, while global popularity is right ~10/200 of the time.
    """
    rng = random.Random(seed)
    per = n_items // n_clusters
    cluster = {f"u{u}": u % n_clusters for u in range(n_users)}
    users = list(cluster)
    histories: dict[str, list[str]] = {u: [] for u in users}
    batches = []
    ts = 1_700_000_000_000
    for _ in range(n_batches):
        batch = []
        for _ in range(batch_size):
            user = rng.choice(users)
            item = f"i{cluster[user] + n_clusters * rng.randrange(per)}"
            ts += 1000
            batch.append(TrainingExample(user, tuple(histories[user][-max_history:]), item, ts))
            histories[user].append(item)
        batches.append(batch)
    return batches


def popularity_hit_rates(batches: list[list[TrainingExample]], k: int = 10) -> list[float]:
    """Return the prequential HR@k per batch of "most clicked so far, minus the history"."""
    counts: Counter[str] = Counter()
    rates = []
    for batch in batches:
        ranked = [item for item, _ in counts.most_common()]
        hits = 0
        for e in batch:
            seen = set(e.history) - {e.item}
            hits += e.item in [i for i in ranked if i not in seen][:k]
        rates.append(hits / len(batch))
        counts.update(e.item for e in batch)
    return rates
