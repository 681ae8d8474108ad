"""The shared package stands alone, and its topic names agree with the worker's and trainer's."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import advrec
from advrec.config import ConfigError
from advrec.topics import load_kafka_settings

PACKAGE = Path(advrec.__file__).parent


def test_advrec_imports_neither_the_worker_nor_the_trainer() -> None:
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names
                      if n.split(".")[0] in ("stream_app", "trainer")]
    assert found == []


def test_kafka_settings_default_to_what_worker_and_trainer_use() -> None:
    from stream_app.settings import load_settings
    from trainer.settings import load_trainer_settings

    shared, worker, trainer = (load_kafka_settings({}), load_settings({}),
                               load_trainer_settings({}))
    for name in ("broker", "app_id", "partitions", "replication", "topic_clicks", "topic_dlq",
                 "topic_train", "topic_bundles", "topic_flags", "topic_items", "topic_items_dlq"):
        assert getattr(shared, name) == getattr(worker, name), name
    for name in ("broker", "topic_train", "topic_bundles", "topic_checkpoints", "topic_flags"):
        assert getattr(shared, name) == getattr(trainer, name), name


def test_kafka_settings_read_the_same_variables() -> None:
    s = load_kafka_settings({"ADVREC_TOPIC_CHECKPOINTS": "ckpt", "ADVREC_PARTITIONS": "8",
                             "ADVREC_BROKER": "kafka://a:1;kafka://b:2"}, partitions=None)
    assert s.topic_checkpoints == "ckpt" and s.partitions == 8 and s.bootstrap == "a:1,b:2"
    names = [t.name for t in s.topics()]
    assert names[:2] == ["clicks", "clicks-dlq"] and "ckpt" in names
    assert "advrec-user_state-changelog" in names
    with pytest.raises(ConfigError, match="ADVREC_PARTITIONS"):
        load_kafka_settings({"ADVREC_PARTITIONS": "0"})


def test_the_catalogue_topic_is_compacted_by_item_and_its_dead_letters_kept() -> None:
    s = load_kafka_settings({"ADVREC_TOPIC_ITEMS": "shop-items"})
    specs = {t.name: t for t in s.topics()}
    items, dlq = specs["shop-items"], specs["items-dlq"]
    assert items.partitions == 1 and items.config["cleanup.policy"] == "compact"
    assert dlq.partitions == 1 and "cleanup.policy" not in dlq.config
    assert dlq.config["retention.ms"] == specs["clicks-dlq"].config["retention.ms"]
