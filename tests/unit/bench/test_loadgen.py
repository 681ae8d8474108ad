"""The benchmarks' load generator: every answer counted, failures seen, bodies read whole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from bench import _loadgen as loadgen
from tests.unit.bench.servers import start_catch_all

BIG = b"x" * 300_000  # arrives in several reads


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[str]]]:
    seen: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        if request.path == "/missing":
            return web.json_response({"error": "no"}, status=404)
        if request.path == "/hang-up":
            assert request.transport is not None
            request.transport.close()  # the connection dies with the request unanswered
            await asyncio.sleep(1)
        return web.Response(body=BIG if request.path == "/big" else b'{"ok":true}',
                            content_type="application/json")

    runner, url = await start_catch_all(handle)
    try:
        yield url, seen
    finally:
        await runner.cleanup()


async def test_every_answer_is_counted_and_paths_go_round_robin(server) -> None:
    url, seen = server
    tally, elapsed = await loadgen.load(url, ["/a", "/b", "/big"], 3, 0.3)
    assert tally.errors == 0 and tally.statuses == {200: len(tally.latencies)}
    assert len(tally.latencies) == len(seen) > 30  # no request unanswered, none counted twice
    assert 0.3 <= elapsed < 5 and all(0 < lat < elapsed for lat in tally.latencies)
    assert {"/a", "/b", "/big"} == set(seen)


async def test_answers_other_than_200_count_as_errors(server) -> None:
    url, _ = server
    tally, _ = await loadgen.load(url, ["/missing", "/a"], 1, 0.2)
    assert tally.statuses[404] == tally.errors > 0 and tally.statuses[200] > 0


async def test_a_connection_lost_mid_request_is_an_error_and_the_client_reconnects(
        server) -> None:
    url, seen = server
    tally, _ = await loadgen.load(url, ["/hang-up", "/a"], 1, 0.3)
    assert tally.errors >= 1 and seen.count("/hang-up") == tally.errors
    assert tally.statuses.get(200, 0) >= 1  # the next request went out on a new connection
