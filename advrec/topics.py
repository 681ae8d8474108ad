"""The topics every pod shares: their names (one settings object, read by the command-line
tools as the worker and the trainer read theirs), and creating them explicitly with the
configured partition counts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from advrec.config import ConfigError, bootstrap_servers, from_env

__all__ = ["ITEMS_CONFIG", "KafkaSettings", "TopicMismatch", "TopicSpec", "channel_topics",
           "default_topics", "ensure_topics", "load_kafka_settings"]

# A channel topic (advrec.channel: bundles, checkpoints) is compacted down to the last few
# versions. Compaction only rewrites closed segments, so segments roll every 10 minutes or
# 64 MiB; a tombstone stays a day for readers that lag; records up to 2 MiB (chunks are
# 512 KiB). Together these bound what a new reader reads at start-up.
CHANNEL_CONFIG = {
    "cleanup.policy": "compact",
    "min.cleanable.dirty.ratio": "0.1",
    "segment.ms": str(10 * 60 * 1000),
    "segment.bytes": str(64 * 1024 * 1024),
    "delete.retention.ms": str(24 * 3600 * 1000),
    "max.message.bytes": str(2 * 1024 * 1024),
}

# The catalogue (advrec.catalogue): one record per item id, compacted to the newest. One
# partition: a catalogue changes at items a second, not clicks, so one worker validating it
# is plenty, and every reader (the trainer follows all of it) gets one total order of the
# changes, as the channel topics give. A tombstone stays a day for readers that lag.
ITEMS_CONFIG = {"cleanup.policy": "compact", "delete.retention.ms": str(24 * 3600 * 1000)}
DLQ_RETENTION_MS = 14 * 24 * 3600 * 1000  # dead letters are kept two weeks for inspection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaSettings:
    """The broker and topic names, from the same ``ADVREC_*`` variables (and defaults) as the
    worker's and the trainer's settings: what ``advrec topics`` and ``advrec replay`` need."""

    broker: str = "kafka://127.0.0.1:9092"
    app_id: str = "advrec"
    partitions: int = 4
    replication: int = 1
    topic_clicks: str = "clicks"
    topic_dlq: str = "clicks-dlq"
    topic_train: str = "train-batches"
    topic_bundles: str = "model-bundles"
    topic_checkpoints: str = "trainer-checkpoints"
    topic_flags: str = "user-flags"
    topic_items: str = "items"
    topic_items_dlq: str = "items-dlq"

    def __post_init__(self) -> None:
        if self.partitions < 1 or self.replication < 1:
            raise ConfigError("settings ADVREC_PARTITIONS and ADVREC_REPLICATION must be >= 1, "
                              f"got {self.partitions} and {self.replication}")

    @property
    def bootstrap(self) -> str:
        """The broker list as host:port pairs for plain aiokafka clients."""
        return bootstrap_servers(self.broker)

    def topics(self) -> list[TopicSpec]:
        """Every topic advrec uses, with the table changelogs."""
        shared = default_topics(
            clicks=self.topic_clicks, dlq=self.topic_dlq, train=self.topic_train,
            bundles=self.topic_bundles, flags=self.topic_flags, items=self.topic_items,
            items_dlq=self.topic_items_dlq, partitions=self.partitions,
            replication=self.replication, app_id=self.app_id)
        return [*shared, TopicSpec(self.topic_checkpoints, 1, self.replication,
                                   dict(CHANNEL_CONFIG))]


def load_kafka_settings(environ: Mapping[str, str] | None = None,
                        **overrides: object) -> KafkaSettings:
    """Read ``KafkaSettings`` from ``ADVREC_*`` variables; ``overrides`` (flags) win."""
    return from_env(KafkaSettings, "ADVREC_", environ, **overrides)


class TopicMismatch(RuntimeError):
    """An existing topic has a different partition count than the configuration wants."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int = 1
    config: dict[str, str] = field(default_factory=dict)


def channel_topics(*, train: str = "train-batches", bundles: str = "model-bundles",
                   checkpoints: str | None = "trainer-checkpoints",
                   flags: str = "user-flags", replication: int = 1) -> list[TopicSpec]:
    """Return the trainer's topics: `train-batches` and the compacted channel topics, all of
    one partition (one active trainer; one total order of each channel's records), and the
    compacted flags topic (advrec.flags: the latest record per user)."""
    specs = [TopicSpec(train, 1, replication),
             TopicSpec(bundles, 1, replication, dict(CHANNEL_CONFIG)),
             TopicSpec(flags, 1, replication, {"cleanup.policy": "compact"})]
    if checkpoints is not None:
        specs.append(TopicSpec(checkpoints, 1, replication, dict(CHANNEL_CONFIG)))
    return specs


def default_topics(*, clicks: str = "clicks", dlq: str = "clicks-dlq",
                   train: str = "train-batches", bundles: str = "model-bundles",
                   flags: str = "user-flags", items: str = "items",
                   items_dlq: str = "items-dlq", partitions: int = 4, replication: int = 1,
                   app_id: str | None = None,
                   tables: tuple[str, ...] = ("user_state", "trending")) -> list[TopicSpec]:
    """Return the topics advrec reads and writes, and with ``app_id`` the table changelogs.

    Faust would create the changelogs itself, but two workers starting together can then
    see a changelog missing from cluster metadata during their first assignment, and the
    agent crash-loops on a partition-count check (seen here with 2 workers); creating
    them up front, compacted and co-partitioned with `clicks`, removes the race.
    """
    specs = [
        TopicSpec(clicks, partitions, replication),
        TopicSpec(dlq, partitions, replication, {"retention.ms": str(DLQ_RETENTION_MS)}),
        # one partition: one consumer-group member (the active trainer) owns it
        *channel_topics(train=train, bundles=bundles, checkpoints=None, flags=flags,
                        replication=replication),
        TopicSpec(items, 1, replication, dict(ITEMS_CONFIG)),
        TopicSpec(items_dlq, 1, replication, {"retention.ms": str(DLQ_RETENTION_MS)}),
    ]
    if app_id is not None:
        specs += [TopicSpec(f"{app_id}-{table}-changelog", partitions, replication,
                            {"cleanup.policy": "compact"}) for table in tables]
    return specs


async def ensure_topics(bootstrap: str, specs: list[TopicSpec], *,
                        strict: bool = True, timeout_s: float = 30.0) -> None:
    """Create missing topics; raise ``TopicMismatch`` if one exists with other partitions.

    A partition-count mismatch between `clicks` and a table changelog crash-loops Faust
    agents, so it is refused here with the names and counts, before the worker starts.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await admin.start()
            break
        except Exception as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise ConnectionError(f"Kafka at {bootstrap} did not answer: {exc}") from exc
            await asyncio.sleep(1.0)
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in specs if t.name not in existing]
        if missing:
            try:
                await admin.create_topics([
                    NewTopic(t.name, t.partitions, t.replication, topic_configs=t.config)
                    for t in missing])
            except TopicAlreadyExistsError:
                pass  # created concurrently by another worker
            log.info("created topics %s", ", ".join(f"{t.name}[{t.partitions}]" for t in missing))
        if strict:
            names = [t.name for t in specs]
            for _ in range(50):  # fresh topics may show 0 partitions for a moment
                described = await admin.describe_topics(names)
                counts = {d["topic"]: len(d["partitions"]) for d in described}
                if all(counts.get(n, 0) > 0 for n in names):
                    break
                await asyncio.sleep(0.2)
            for t in specs:
                if counts.get(t.name, t.partitions) != t.partitions:
                    raise TopicMismatch(
                        f"topic {t.name!r} has {counts[t.name]} partitions but "
                        f"{t.partitions} are configured; set ADVREC_PARTITIONS to match "
                        f"or recreate the topic")
    finally:
        await admin.close()
