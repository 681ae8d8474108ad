"""Which worker owns a user: the key's partition, this worker's share, the local read.

Faust's ``table_route`` answers the same question, but on every request it re-serializes the
key, asks the producer's partitioner (murmur2 in Python), looks the owner up by URL and
raises ``SameNode`` to say "here"; then ``table.get`` probes the store of every local
partition for the key. On the /recommendations path that was about a quarter of the event
loop's time per request. Here the partition of a key is hashed once (the Kafka default
partitioner, as every producer of ``clicks`` uses), ownership is a set lookup, and the read
goes to the one RocksDB store of that partition. A request asks for its key's partition up to
three times (ownership, the restore check, the read): a small cache of recent keys hashes it
once.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.types import TP

from advrec.contract import partition_for
from stream_app.rocks import local_stores

__all__ = ["KeyRouter"]


class KeyRouter:
    """Partition, ownership and local reads of one table's keys."""

    def __init__(self, app: faust.App, table: faust.Table, partitions: int) -> None:
        assert partitions >= 1, partitions
        self.app = app
        self.table = table
        self.partitions = partitions

    def partition(self, key: bytes) -> int:
        """The Kafka default partitioner (``advrec.contract.partition_for``, cached)."""
        return partition_for(key, self.partitions)

    def topic_partition(self, key: bytes) -> TP:
        """The changelog partition that holds ``key`` (recovery is tracked per changelog TP)."""
        return TP(self.table.changelog_topic.get_topic_name(), self.partition(key))

    def is_local(self, key: bytes) -> bool:
        """Whether this worker is the active owner of ``key``."""
        # the assignment's own topic -> partitions map: ``assigned_actives()`` builds a set
        # of every assigned TP on each call (~10 us with the changelogs and the clicks topic)
        actives = self.app.assignor._assignment.actives
        return self.partition(key) in actives.get(self.table.changelog_topic.get_topic_name(), ())

    def read(self, key: bytes) -> bytes | None:
        """Read ``key`` from the local store of its partition (call only when local)."""
        db = local_stores(self.table).get(self.partition(key))
        return None if db is None else db.get(key)

    async def route(self, key: bytes, web: Any, request: Any) -> Any:
        """Proxy ``request`` to the worker owning ``key`` (Faust's router does the HTTP)."""
        return await self.app.router.route_req(self.table.name, key, web, request)
