"""Key routing: the partition a read looks in is the one every producer writes to."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner

from advrec.contract import encode_key
from stream_app.routing import KeyRouter


@pytest.mark.parametrize("partitions", [1, 4, 7, 32])
def test_partition_matches_the_kafka_default_partitioner(partitions: int) -> None:
    router = KeyRouter(app=None, table=None, partitions=partitions)  # type: ignore[arg-type]
    rng = random.Random(0)
    keys = [encode_key(f"user{n}") for n in range(500)]
    keys += [encode_key("".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(
        1, 128)))) for _ in range(500)]  # non-ASCII ids of every length up to the limit
    all_partitions = list(range(partitions))
    for key in keys:
        assert router.partition(key) == DefaultPartitioner()(key, all_partitions, all_partitions)
