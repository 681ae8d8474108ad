"""Hot swap: verify and warm a bundle off the request path, then swap one reference.

Which version to serve is the bundle feed's call (``stream_app.feed``: the topic's pointer
or pin); the watcher loads it from the local cache, checks it, and swaps it in, or rejects
it with a reason while the live model keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from pathlib import Path
from typing import Any

from advrec.bundle import BundleError
from advrec.memory import release_freed_memory
from stream_app.retrieval import IndexConfig, ItemIndex
from stream_app.serving import LoadedModel, ModelServer, load_model

__all__ = ["BundleWatcher"]

log = logging.getLogger(__name__)


def _index_note(index: ItemIndex) -> str:
    """How a swapped-in bundle's index came to be, for the log."""
    if index.rebuilt:
        return (f", index built afresh in the background ({index.rebuild_seconds:.0f}s) "
                "and refreshed")
    note = (", index refreshed in place (the spare graph)" if index.reused
            else ", index refreshed" if index.refreshed else ", index built afresh")
    return note + (", a fresh one now building in the background" if index.rebuild_started
                   else "")


class BundleWatcher:
    """Loads versions from the bundle cache ``root`` into a ``ModelServer``.

    A bundle that fails verification, loading or warm-up is rejected once (counted by
    reason, logged) and remembered, and the live model keeps serving. Nothing raised while
    loading escapes ``activate``: the feed and the admin API call it from the worker's loop.
    """

    def __init__(self, root: Path | str, server: ModelServer, *, providers: str = "auto",
                 threads: int = 0, metrics: Any = None,
                 index: IndexConfig | None = None) -> None:
        self.root = Path(root)
        self.index = index  # when and how large catalogues are ranked in two stages
        self.server = server
        self.providers = providers
        self.threads = threads
        self.metrics = metrics
        self.rejected: dict[str, str] = {}  # version -> reason
        self.swaps = 0
        self.loading: str | None = None  # the version being loaded: never pruned meanwhile
        self._lock = asyncio.Lock()

    def reject(self, version: str, reason: str, detail: str) -> None:
        """Remember ``version`` as unusable (e.g. its chunks were refused), count and log it."""
        if version in self.rejected:
            return
        self.rejected[version] = reason
        self._count_rejected(reason)
        live = self.server.current
        log.error("rejected bundle %s (%s): %s; still serving %s", version, reason, detail,
                  live.version if live else "the trending fallback")

    def _count_rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.bundles_rejected.labels(reason=reason).inc()

    async def activate(self, version: str) -> bool:
        """Load ``version`` in a thread, then swap it in; False (and counted) if rejected."""
        async with self._lock:
            live = self.server.current
            if live is not None and live.version == version:
                return True
            if version in self.rejected:
                return False
            self.loading = version
            try:
                # the live model lends its index, to be refreshed rather than rebuilt
                load = functools.partial(load_model, self.root, version,
                                         providers=self.providers, threads=self.threads,
                                         index=self.index, previous=live)
                model = await asyncio.get_running_loop().run_in_executor(None, load)
                del load
            except BundleError as exc:
                if not (self.root / version).is_dir():
                    # removed from the cache while it loaded: nothing is wrong with the
                    # bundle, so it is counted but not remembered (it may be fetched again)
                    self._count_rejected("pruned")
                    log.warning("bundle %s left %s while it was loading (%s); still serving "
                                "%s", version, self.root, exc.reason,
                                live.version if live else "the trending fallback")
                    return False
                self.reject(version, exc.reason, exc.detail)
                return False
            except Exception as exc:  # an unexpected bug must not kill the caller
                log.exception("loading bundle %s failed", version)
                self.reject(version, "load_error", f"{type(exc).__name__}: {exc}"[:300])
                return False
            finally:
                self.loading = None
            del live  # the server holds the old model only until in-flight batches finish
            self.server.swap(model)
            self.swaps += 1
            release_freed_memory()
            self._report(model)
            log.info("now serving bundle %s (vocabulary %d, %s%s, providers %s, loaded in "
                     "%.2fs)", model.version, len(model.bundle.vocab), model.path,
                     "" if model.two_stage is None else _index_note(model.two_stage.index),
                     ",".join(model.providers), model.load_seconds)
            return True

    def _report(self, model: LoadedModel) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        m.model_swaps.inc()
        m.model_ready.set(1)
        m.model_load_seconds.observe(model.load_seconds)
        if model.two_stage is not None:
            m.index_build_seconds.observe(model.two_stage.index_seconds)
            if model.two_stage.index.rebuild_seconds is not None:
                m.index_rebuild_seconds.observe(model.two_stage.index.rebuild_seconds)
        m.model_info.info({"version": model.version,
                           "vocab_size": str(len(model.bundle.vocab)), "path": model.path,
                           "mode": str(model.bundle.meta.get("mode", ""))})
        m.model_version_timestamp.set(float(model.bundle.meta.get("created", 0.0)))
        m.provider_info.info({"providers": ",".join(model.providers)})
        self.update_age()

    def update_age(self) -> None:
        """Set the freshness gauge: now minus when the newest batch the live model trained on
        was written to `train-batches` (``trained_through_ms``, wall clock); bundles without
        it fall back to the newest event time they saw.

        Event times say when a click happened by the producer's clock: a replayed or
        synthetic stream carries times minutes or years away from now, which made the gauge
        read hundreds of seconds for a model trained seconds before.
        """
        live = self.server.current
        if self.metrics is None or live is None:
            return
        meta = live.bundle.meta
        last_ms = meta.get("trained_through_ms") or meta.get("last_event_ms")
        if last_ms:
            self.metrics.model_age_seconds.set(max(0.0, time.time() - float(last_ms) / 1000))
