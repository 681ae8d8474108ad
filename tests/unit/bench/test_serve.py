"""bench/serve's side-by-side measurement: one rate per slice, paired into per-slice ratios."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web

from bench.serve import round_ratios, side_by_side
from tests.unit.bench.servers import start_catch_all


@pytest.fixture
def server() -> Iterator[str]:
    """An aiohttp server on its own loop and thread (side_by_side runs its own loops)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, object] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/slow":
            await asyncio.sleep(0.005)
        return web.json_response({"ok": True})

    async def start() -> None:
        box["runner"], box["url"] = await start_catch_all(handle)
        ready.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10), "test server did not start"
    try:
        yield str(box["url"])
    finally:
        runner = box["runner"]
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)  # type: ignore[attr-defined]
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_each_slice_gets_its_rate_and_the_slices_pair_into_ratios(server: str) -> None:
    slow, fast = side_by_side(server, ["/slow"], ["/fast"], concurrency=2, seconds=1.2,
                              pid=os.getpid(), rounds=3)
    assert len(slow["rps_by_round"]) == len(fast["rps_by_round"]) == 3
    ratios = round_ratios(slow, fast)
    assert len(ratios) == 3
    # 2 clients against a 5 ms sleep make at most 400 requests/s; the instant path far more
    assert all(0.0 < r < 1.0 for r in ratios), ratios
    assert slow["errors"] == fast["errors"] == 0
    assert sum(slow["rps_by_round"]) / 3 < 400
