"""A lean closed-loop HTTP/1.1 load generator for the serving benchmarks.

Each of ``concurrency`` keep-alive connections sends a GET, reads the whole answer (status
line, headers, then ``Content-Length`` bytes of body), records the latency and sends the
next request, until the time is up. It runs on asyncio protocols, without a client library:
on the 2-core machines these benchmarks run on, the client shares the cores with the server
it measures, and aiohttp's client spent ~180 us of CPU per request there, more than the
no-op endpoint costs the server. Both sides of every ratio use this same client.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["Tally", "load"]


@dataclass
class Tally:
    """What a load run saw: one latency (s) per answered request, and the failures."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0  # answers other than 200, and requests lost with their connection
    statuses: dict[int, int] = field(default_factory=dict)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request in flight at a time."""

    def __init__(self, requests: list[bytes], first: int, step: int, stop_at: float,
                 tally: Tally, closed: asyncio.Future) -> None:
        self.requests, self.n, self.step = requests, first, step
        self.stop_at, self.tally, self.closed = stop_at, tally, closed
        self.buffer = bytearray()
        self.need = -1  # bytes of the whole answer once its head is parsed, else -1
        self.status = 0
        self.sent_at = 0.0
        self.in_flight = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if time.perf_counter() >= self.stop_at:
            self.transport.close()
            return
        self.transport.write(self.requests[self.n % len(self.requests)])
        self.n += self.step
        self.in_flight = True
        self.sent_at = time.perf_counter()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        if self.need < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if not head.startswith(b"http/1.1 ") or at < 0:  # chunked or not HTTP/1.1
                self.transport.close()  # counted as lost in connection_lost
                return
            eol = head.find(b"\r\n", at + 2)
            self.need = end + 4 + int(head[at + 17:eol if eol > 0 else len(head)])
            self.status = int(head[9:12])
        if len(self.buffer) < self.need:
            return
        del self.buffer[:self.need]
        self.need = -1
        self.in_flight = False
        tally = self.tally
        tally.latencies.append(time.perf_counter() - self.sent_at)
        tally.statuses[self.status] = tally.statuses.get(self.status, 0) + 1
        if self.status != 200:
            tally.errors += 1
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.in_flight:  # the server closed with our request unanswered
            self.tally.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


async def load(url: str, paths: list[str], concurrency: int, seconds: float) -> tuple[Tally, float]:
    """Load ``url`` + ``paths`` (round robin) from ``concurrency`` connections for
    ``seconds``; return the tally and the elapsed time."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
                for path in paths]
    loop = asyncio.get_running_loop()
    tally = Tally()
    started = time.perf_counter()
    stop_at = started + seconds

    async def connection(i: int) -> None:
        first = i
        while time.perf_counter() < stop_at:
            closed = loop.create_future()
            protocol = _Connection(requests, first, concurrency, stop_at, tally, closed)
            try:
                await loop.create_connection(lambda p=protocol: p, host, port)
            except OSError:
                tally.errors += 1
                await asyncio.sleep(0.05)
                continue
            await closed
            first = protocol.n  # a reconnect goes on where the lost connection stopped

    await asyncio.gather(*(connection(i) for i in range(concurrency)))
    return tally, time.perf_counter() - started
