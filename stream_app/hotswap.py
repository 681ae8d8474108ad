"""Hot swap: notice a new bundle, verify and warm it off the request path, swap one reference."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from advrec.bundle import BundleError, list_versions, read_current, set_current
from stream_app.serving import LoadedModel, ModelServer, load_model, release_freed_memory

__all__ = ["BundleWatcher"]

log = logging.getLogger(__name__)


class BundleWatcher:
    """Polls the bundle root's ``CURRENT`` pointer and swaps models into a ``ModelServer``.

    A bundle that fails verification, loading or warm-up is rejected once (counted by
    reason, logged) and remembered, and the live model keeps serving. Nothing raised here
    escapes ``check``: a crashing timer would take the worker down.
    """

    def __init__(self, root: Path | str, server: ModelServer, *, providers: str = "auto",
                 threads: int = 0, metrics: Any = None) -> None:
        self.root = Path(root)
        self.server = server
        self.providers = providers
        self.threads = threads
        self.metrics = metrics
        self.rejected: dict[str, str] = {}  # version -> reason
        self.swaps = 0
        self._lock = asyncio.Lock()

    async def check(self) -> bool:
        """Swap in the version ``CURRENT`` names if it is new and good; return True if swapped."""
        try:
            version = read_current(self.root)
            live = self.server.current
            if version is None or (live is not None and live.version == version):
                self._update_age()
                return False
            if version in self.rejected:
                return False
            return await self.activate(version)
        except Exception:  # an unexpected bug must not kill the worker's timer
            log.exception("bundle watcher failed; the live model keeps serving")
            return False

    async def activate(self, version: str) -> bool:
        """Load ``version`` in a thread, then swap it in; False (and counted) if rejected."""
        async with self._lock:
            live = self.server.current
            if live is not None and live.version == version:
                return False
            try:
                model = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: load_model(self.root, version, providers=self.providers,
                                             threads=self.threads))
            except BundleError as exc:
                self.rejected[version] = exc.reason
                if self.metrics is not None:
                    self.metrics.bundles_rejected.labels(reason=exc.reason).inc()
                log.error("rejected bundle %s (%s): %s; still serving %s", version, exc.reason,
                          exc.detail, live.version if live else "the trending fallback")
                return False
            del live  # the server holds the old model only until in-flight batches finish
            self.server.swap(model)
            self.swaps += 1
            release_freed_memory()
            self._report(model)
            log.info("now serving bundle %s (vocabulary %d, providers %s, loaded in %.2fs)",
                     model.version, len(model.bundle.vocab), ",".join(model.providers),
                     model.load_seconds)
            return True

    async def rollback(self, version: str | None = None) -> str:
        """Serve ``version`` (default: the newest good one older than live); repoint CURRENT."""
        live = self.server.current
        versions = [v for v in list_versions(self.root) if v not in self.rejected]
        if version is None:
            older = [v for v in versions if live is None or v < live.version]
            if not older:
                raise BundleError("missing", "no older bundle to roll back to")
            version = older[-1]
        if not await self.activate(version):
            current = self.server.current
            if current is None or current.version != version:
                reason = self.rejected.get(version, "missing")
                raise BundleError(reason, f"cannot roll back to {version}")
        set_current(self.root, version)
        return version

    def _report(self, model: LoadedModel) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        m.model_swaps.inc()
        m.model_ready.set(1)
        m.model_load_seconds.observe(model.load_seconds)
        m.model_info.info({"version": model.version,
                           "vocab_size": str(len(model.bundle.vocab)),
                           "mode": str(model.bundle.meta.get("mode", ""))})
        m.model_version_timestamp.set(float(model.bundle.meta.get("created", 0.0)))
        m.provider_info.info({"providers": ",".join(model.providers)})
        self._update_age()

    def _update_age(self) -> None:
        live = self.server.current
        if self.metrics is None or live is None:
            return
        last_ms = live.bundle.meta.get("last_event_ms")
        if last_ms:
            self.metrics.model_age_seconds.set(max(0.0, time.time() - float(last_ms) / 1000))
