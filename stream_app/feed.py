"""The bundle feed: each worker's own reader of `model-bundles`, outside Faust's group.

Every worker reads the whole bundle topic from its beginning (``advrec.channel``): it
rebuilds each version into its local bundle directory, which is only a cache, follows the
pointer and the pin, and has the watcher (``stream_app.hotswap``) verify, warm up and swap
to the version they name. A worker that starts late is ready only after it has read what
the topic held at its start and tried the version named there, so `/readyz` says 200 with
the fleet's current model loaded.

The feed runs on a thread of its own, with its own event loop and Kafka consumer: reading
and hashing megabytes of chunks (at start-up, the last few bundles at once) never holds up
the loop that ingests clicks and answers requests, and the thread's CPU time is the feed's
cost (``advrec_bundle_feed_cpu_seconds_total``). Swaps happen on the worker's loop.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from advrec.bundle import BundleError, apply_delta, list_versions
from advrec.channel import (
    Assembled,
    Assembler,
    ChannelError,
    Manifest,
    Pin,
    Pointer,
    Rejected,
    TopicView,
)
from advrec.channel_io import ChannelPublisher, follow_topic
from advrec.memory import release_freed_memory

if TYPE_CHECKING:
    from stream_app.hotswap import BundleWatcher
    from stream_app.metrics import StreamMetrics
    from stream_app.settings import Settings

__all__ = ["BundleFeed", "FeedSnapshot", "PinError"]

log = logging.getLogger(__name__)


class PinError(Exception):
    """A pin or rollback cannot be done; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FeedSnapshot:
    """What the feed knows, as one immutable value the worker's loop may read at any time."""

    pointer: str | None = None  # the version the trainer last made current
    pin: Pin | None = None
    local: tuple[str, ...] = ()  # versions rebuilt into the cache, in publish order
    topic: tuple[str, ...] = ()  # whole versions on the topic, in publish order
    position: int = 0  # next offset of the topic to read
    caught_up: bool = False

    @property
    def target(self) -> str | None:
        """The version to serve: the pinned one, else the pointer's."""
        return self.pin.version if self.pin is not None else self.pointer


class BundleFeed:
    """Follows the bundle topic into the local cache and keeps the watcher on its target."""

    def __init__(self, settings: Settings, watcher: BundleWatcher,
                 metrics: StreamMetrics | None = None) -> None:
        self.s = settings
        self.watcher = watcher
        self.metrics = metrics
        self.view = TopicView()  # feed thread only
        self.manifests: dict[str, Manifest] = {}  # rebuilt versions (feed thread only)
        self.snapshot = FeedSnapshot()
        self.ready = asyncio.Event()  # set on the worker's loop once caught up and settled
        self._main: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the feed thread's
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._publisher: ChannelPublisher | None = None
        self._assembler: Assembler | None = None
        self._settling: asyncio.Task | None = None
        self._cpu_reported = 0.0
        self._pin_logged: str | None = None

    # ------------------------------------------------------------------ worker's loop

    async def start(self) -> None:
        """Start the feed thread (on the worker's loop; returns at once)."""
        if self._thread is not None:
            return
        self._main = asyncio.get_running_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, args=(started,),
                                        name="advrec-bundle-feed", daemon=True)
        self._thread.start()
        await asyncio.to_thread(started.wait, 10.0)

    async def stop(self) -> None:
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is None or stop is None or thread is None:
            return
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:  # its loop has ended already
            pass
        await asyncio.to_thread(thread.join, 15.0)
        self._thread = None

    async def settle(self) -> None:
        """Swap to the version the feed's target calls for, until live is what it wants."""
        if self._settling is not None and not self._settling.done():
            await asyncio.shield(self._settling)
            return
        self._settling = asyncio.ensure_future(self._settle())
        await asyncio.shield(self._settling)

    async def _settle(self) -> None:
        for _ in range(32):  # each round swaps or rejects a version: a bound, not a loop
            wanted = self.wanted()
            live = self.watcher.server.current
            if wanted is None or (live is not None and live.version == wanted):
                break
            await self.watcher.activate(wanted)
        self._report_pin()

    def wanted(self) -> str | None:
        """The version to serve now, or None to keep what is live.

        The target (pin, else pointer) if it was rebuilt here and not refused; if it cannot
        be served and nothing is live yet, the newest good version published before it.
        """
        snap = self.snapshot
        target = snap.target
        rejected = self.watcher.rejected
        if target is None:
            return None
        if target in snap.local and target not in rejected:
            return target
        if self.watcher.server.current is not None:
            return None
        older = snap.local[: snap.local.index(target)] if target in snap.local else snap.local
        good = [v for v in older if v not in rejected]
        return good[-1] if good else None

    async def pin(self, version: str | None, *, by: str, reason: str,
                  timeout_s: float = 30.0) -> int:
        """Write a pin (None: release it) on the topic; return once this worker has read it
        back and serves the version it calls for."""
        loop = self._loop
        if loop is None or self._publisher is None:
            raise PinError(503, "the bundle feed is not running yet, retry later")
        future = asyncio.run_coroutine_threadsafe(
            self._publisher.pin(version, by=by, reason=reason), loop)
        try:
            offset = await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except Exception as exc:
            raise PinError(503, f"could not write the pin to the bundle topic: {exc}") from None
        deadline = time.monotonic() + timeout_s
        while self.snapshot.position <= offset:
            if time.monotonic() > deadline:
                raise PinError(503, "the pin was written but not read back in time")
            await asyncio.sleep(0.02)
        await self.settle()
        return offset

    async def rollback(self, version: str | None, *, by: str) -> str:
        """Pin ``version`` (default: the newest good version published before the live one)
        fleet-wide, after checking that it loads here."""
        snap = self.snapshot
        live = self.watcher.server.current
        if version is None:
            before = (snap.local[: snap.local.index(live.version)]
                      if live is not None and live.version in snap.local else snap.local[:-1])
            older = [v for v in before if v not in self.watcher.rejected]
            if not older:
                raise PinError(409, "no older bundle to roll back to")
            version = older[-1]
        elif version not in snap.local:
            raise PinError(409, f"no published bundle version {version[:80]!r}")
        if version in self.watcher.rejected:
            raise PinError(409, f"bundle {version} was rejected "
                                f"({self.watcher.rejected[version]})")
        if not await self.watcher.activate(version):
            current = self.watcher.server.current
            if current is None or current.version != version:
                raise PinError(409, f"bundle {version} cannot be served "
                                    f"({self.watcher.rejected.get(version, 'missing')})")
        await self.pin(version, by=by, reason="rollback")
        return version

    def _report_pin(self) -> None:
        pin = self.snapshot.pin
        if self.metrics is not None:
            self.metrics.model_pinned.set(1 if pin else 0)
            pinned = (pin.version or "", pin.by) if pin is not None else ("", "")
            self.metrics.pin_info.info({"version": pinned[0], "by": pinned[1]})
        label = pin.version if pin else None
        if label != self._pin_logged and self.snapshot.caught_up:
            if pin is not None:
                log.warning("the fleet is pinned to bundle %s (by %s, %s); new bundles wait "
                            "until the pin is released", pin.version, pin.by, pin.reason)
            elif self._pin_logged is not None:
                log.info("the pin on bundle %s was released", self._pin_logged)
            self._pin_logged = label

    # ------------------------------------------------------------------ feed thread

    def _thread_main(self, started: threading.Event) -> None:
        try:
            asyncio.run(self._run(started))
        except Exception:
            log.exception("the bundle feed stopped; the live model keeps serving")

    async def _run(self, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        s = self.s
        # a cache of the topic, rebuilt from it at every start and checked on every load:
        # no fsyncs (advrec/bundle.py)
        self._assembler = Assembler(s.bundle_dir, max_bytes=s.bundle_max_mb * 1024 * 1024,
                                    sync=False)
        self._publisher = ChannelPublisher(s.bootstrap, s.topic_bundles,
                                           producer_id=f"worker:{s.web_host}:{s.web_port}")
        started.set()
        try:
            await follow_topic(s.bootstrap, s.topic_bundles, self._handle, stop=self._stop,
                               on_caught_up=self._on_caught_up,
                               client_id=f"advrec-feed-{s.web_port}")
        finally:
            await self._publisher.stop()
            self._assembler.close()

    def _handle(self, record: Any) -> None:
        try:
            self._apply(record)
        except Exception:  # a bug must not stop the feed: the next records may be good
            log.exception("bundle topic record at offset %d could not be handled",
                          record.offset)
            self._publish_snapshot(record.offset + 1)

    def _apply(self, record: Any) -> None:
        m = self.metrics
        if m is not None:
            m.bundle_feed_records.inc()
            m.bundle_feed_bytes.inc(len(record.key or b"") + len(record.value or b""))
        try:
            rec = self.view.apply(record.key, record.value, record.offset)
        except ChannelError as exc:
            self._refused(Rejected(getattr(exc, "version", None), exc.reason, exc.detail))
            rec = None
        assert self._assembler is not None
        changed = isinstance(rec, (Pointer, Pin, tuple))
        for event in self._assembler.feed(rec):
            if isinstance(event, Assembled):
                if not self._rebuild_delta(event):
                    continue
                self.manifests.pop(event.version, None)
                self.manifests[event.version] = event.manifest
                changed = True
                if m is not None:
                    m.bundles_assembled.inc()
                log.info("rebuilt bundle %s from %d chunks (%d bytes)", event.version,
                         event.manifest.chunks, event.manifest.size)
                # the fetched chunks were freed in this thread's malloc arena: give them
                # back before the worker loads the version beside the live one
                release_freed_memory()
            else:
                self._refused(event)
        if isinstance(rec, tuple):  # a tombstone: the version left the topic
            self.manifests.pop(rec[1], None)
        self._publish_snapshot(record.offset + 1)
        if changed:
            self._prune()
            if self.snapshot.caught_up:
                self._call_main(self._kick)
        self._report_cpu()

    def _rebuild_delta(self, event: Assembled) -> bool:
        """Make a delta whole from its base in the cache (``advrec.bundle.apply_delta``);
        False (and the version refused) if it cannot be."""
        started = time.perf_counter()
        try:
            rebuilt = apply_delta(self.watcher.root, event.version, sync=False)
        except BundleError as exc:  # refused as a bad bundle is (advrec_bundles_rejected)
            self._call_main(self.watcher.reject, event.version, exc.reason, exc.detail)
            return False
        if rebuilt:
            if self.metrics is not None:
                self.metrics.bundle_deltas.inc()
            log.info("rebuilt bundle %s from the delta against %s in %.2fs", event.version,
                     event.manifest.meta.get("base"), time.perf_counter() - started)
            release_freed_memory()
        return True

    def _publish_snapshot(self, position: int, caught_up: bool | None = None) -> None:
        v = self.view
        self.snapshot = FeedSnapshot(
            pointer=v.pointer.version if v.pointer else None, pin=v.pin,
            local=tuple(self.manifests), topic=tuple(v.manifests), position=position,
            caught_up=self.snapshot.caught_up if caught_up is None else caught_up)

    async def _on_caught_up(self) -> None:
        # the target is tried (loaded, or refused) before the worker may say it is ready
        self._publish_snapshot(self.snapshot.position, caught_up=True)
        log.info("bundle topic read (%d records, %d bytes): %d versions, current %s%s",
                 self.view.records, self.view.bytes, len(self.manifests),
                 self.snapshot.pointer,
                 f", pinned to {self.snapshot.pin.version}" if self.snapshot.pin else "")
        assert self._main is not None
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.settle(), self._main))
        self._main.call_soon_threadsafe(self.ready.set)
        self._prune()

    def _refused(self, event: Rejected) -> None:
        if self.metrics is not None:
            self.metrics.bundle_chunks_rejected.labels(reason=event.reason).inc()
        if event.fatal and event.version:
            self._call_main(self.watcher.reject, event.version, event.reason, event.detail)
        else:
            log.warning("bundle topic: %s (%s)", event.detail, event.reason)

    def _call_main(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._main is not None:
            try:
                self._main.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the worker's loop is closing
                pass

    def _kick(self) -> None:
        """On the worker's loop: settle in the background if the target moved."""
        wanted = self.wanted()
        live = self.watcher.server.current
        if wanted is not None and (live is None or live.version != wanted):
            if self._settling is None or self._settling.done():
                self._settling = asyncio.ensure_future(self._settle())
        else:
            self._report_pin()

    def _prune(self) -> None:
        """Keep the newest ``bundles_keep`` rebuilt versions, the newest whole bundle (not a
        delta) not refused, and whatever is live, loading, current or pinned; remove every
        other version from the cache."""
        keep = set(list(self.manifests)[-self.s.bundles_keep:])
        live = self.watcher.server.current
        snap = self.snapshot
        keep |= {snap.pointer, snap.pin.version if snap.pin else None,
                 live.version if live else None, self.watcher.loading}
        # what a worker with nothing live falls back to when every delta after it is refused
        # (``wanted``): the newest version whose bytes came whole, not rebuilt from a chain
        rejected = self.watcher.rejected
        whole = [v for v, m in self.manifests.items()
                 if "base" not in m.meta and v not in rejected]
        if whole:
            keep.add(whole[-1])
        # a delta is rebuilt from its base: the base stays while a delta kept needs it
        keep |= {base for v in keep if v in self.manifests
                 and isinstance(base := self.manifests[v].meta.get("base"), str)}
        for version in [v for v in self.manifests if v not in keep]:
            del self.manifests[version]
        for version in list_versions(self.watcher.root):
            if version not in keep and version not in self.manifests:
                shutil.rmtree(self.watcher.root / version, ignore_errors=True)
        if tuple(self.manifests) != snap.local:
            self._publish_snapshot(snap.position)

    def _report_cpu(self) -> None:
        if self.metrics is not None:
            now = time.thread_time()  # this thread's CPU: the feed's whole cost
            self.metrics.bundle_feed_cpu.inc(max(0.0, now - self._cpu_reported))
            self._cpu_reported = now
