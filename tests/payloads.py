"""A seeded generator of hostile ``clicks`` messages, for fuzzing the decoder and the worker.

Every message is (key, value). About a third are valid events with unique ids and the right
key; the rest are each kind of damage a producer could send: random bytes, msgpack of the
wrong shape, event maps with one field broken (wrong types, empty and huge strings, NaN and
infinite or negative or far-future timestamps, unknown event types), deep nesting, truncated
messages, oversize messages and keys that disagree with the user.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import msgpack

from advrec.contract import MAX_EVENT_BYTES, MAX_ID_CHARS, MIN_TS_MS, encode_key

DAY_MS = 24 * 3600 * 1000
KINDS = ("valid", "random_bytes", "wrong_shape", "broken_field", "deep_nesting", "truncated",
         "oversize", "wrong_key")
WEIGHTS = (30, 10, 10, 30, 5, 8, 2, 5)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class HostilePayloads:
    """``HostilePayloads(seed).take(n)``: n (kind, key, value) triples, reproducibly."""

    def __init__(self, seed: int = 0, now_ms: int | None = None, n_users: int = 500) -> None:
        self.rng = random.Random(seed)
        # timestamps stay a day away from the decoder's bounds, so the verdict does not
        # depend on when the message is decoded
        self.now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        self.n_users = n_users
        self.serial = 0

    def take(self, n: int) -> Iterator[tuple[str, bytes | None, bytes]]:
        for _ in range(n):
            kind = self.rng.choices(KINDS, WEIGHTS)[0]
            key, value = getattr(self, f"_{kind}")()
            yield kind, key, value

    # ---------------------------------------------------------------- building blocks

    def _event(self) -> dict[str, Any]:
        r = self.rng
        self.serial += 1
        event: dict[str, Any] = {
            "user": f"fz{r.randrange(self.n_users)}",
            "item": r.choice([f"it{r.randrange(3000)}", "é-ñ/%20?x", "a" * MAX_ID_CHARS]),
            "ts": r.randrange(self.now_ms - 30 * DAY_MS, self.now_ms - DAY_MS),
            "id": f"fuzz-{self.serial}",
        }
        if r.random() < 0.5:
            event["type"] = r.choice(["click", "view", "cart", "purchase"])
        if r.random() < 0.3:
            event["session"] = f"s{r.randrange(10**6)}"
        return event

    def _junk(self, depth: int = 0) -> Any:
        r = self.rng
        pick = r.randrange(9 if depth < 3 else 7)
        if pick == 7:
            return [self._junk(depth + 1) for _ in range(r.randrange(4))]
        if pick == 8:
            return {str(i): self._junk(depth + 1) for i in range(r.randrange(4))}
        return [None, r.random() < 0.5, r.randrange(-(2**63), 2**64), float("nan"),
                float("inf") * r.choice([1, -1]), "x" * r.randrange(0, 300),
                r.randbytes(r.randrange(0, 50))][pick]

    # ---------------------------------------------------------------- the kinds

    def _valid(self) -> tuple[bytes | None, bytes]:
        event = self._event()
        return encode_key(event["user"]), _pack(event)

    def _random_bytes(self) -> tuple[bytes | None, bytes]:
        r = self.rng
        return r.choice([None, b"k"]), r.randbytes(r.randrange(0, 2000))

    def _wrong_shape(self) -> tuple[bytes | None, bytes]:
        junk = self._junk()
        while isinstance(junk, dict):
            junk = self._junk()
        return None, _pack(junk)

    def _broken_field(self) -> tuple[bytes | None, bytes]:
        r = self.rng
        event = self._event()
        name = r.choice(["user", "item", "ts", "ts", "type", "session", "id", "missing"])
        bad: list[Any]
        if name == "missing":
            del event[r.choice(["user", "item", "ts"])]
        elif name == "ts":
            bad = [float(event["ts"]), float("nan"), float("inf"), -float("inf"), -1,
                   -(2**63), 2**64 - 1, MIN_TS_MS - 1, self.now_ms + 10 * 365 * DAY_MS,
                   str(event["ts"]), True, None, [event["ts"]]]
            event["ts"] = r.choice(bad)
        elif name == "type":
            event["type"] = r.choice(["CLICK", "", "x" * 5000, 1, None, ["click"]])
            if event["type"] is None:
                event["type"] = 0
        else:
            bad = ["", "u" * (MAX_ID_CHARS + 1), "u" * 3000, 42, 1.5, b"bytes", ["u"],
                   {"u": 1}, True]
            if name in ("user", "item"):
                bad.append(None)
            event[name] = r.choice(bad)
        user = event.get("user")
        key = encode_key(user) if isinstance(user, str) and user else None
        return key, _pack(event)

    def _deep_nesting(self) -> tuple[bytes | None, bytes]:
        r = self.rng
        if r.random() < 0.5:  # never terminated: thousands of one-element arrays
            return None, b"\x91" * r.randrange(100, 5000)
        nested: Any = "x"
        for _ in range(r.randrange(50, 500)):
            nested = [nested] if r.random() < 0.5 else {"k": nested}
        event = self._event()
        event["extra"] = nested
        return encode_key(event["user"]), _pack(event)

    def _truncated(self) -> tuple[bytes | None, bytes]:
        event = self._event()
        whole = _pack(event)
        return encode_key(event["user"]), whole[: self.rng.randrange(1, len(whole))]

    def _oversize(self) -> tuple[bytes | None, bytes]:
        event = self._event()
        event["extra"] = "p" * self.rng.randrange(MAX_EVENT_BYTES, 4 * MAX_EVENT_BYTES)
        return encode_key(event["user"]), _pack(event)

    def _wrong_key(self) -> tuple[bytes | None, bytes]:
        event = self._event()
        return self.rng.choice([b"someone-else", b"", b"\xff\xfe"]), _pack(event)
