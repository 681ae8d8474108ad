"""HTTP API: recommendations and user state (routed to the owning worker), health, admin."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import TYPE_CHECKING, Any

import faust.web
from aiohttp import ClientError, web
from faust.exceptions import SameNode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from advrec.contract import MAX_ID_CHARS, encode_key
from stream_app.feed import PinError
from stream_app.openapi import DEFAULT_K, OPENAPI_PATH, build_openapi
from stream_app.routing import KeyRouter
from stream_app.serving import ModelTimeout
from stream_app.state import UserState

if TYPE_CHECKING:
    from stream_app.app import StreamApp

__all__ = ["register"]

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Any]]


def _status_class(status: int) -> str:
    return f"{status // 100}xx"


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error as JSON ``{"error", "status"}``, and never with a bare 500.

    aiohttp answers unknown paths (404) and methods (405) in plain text by raising; a
    per-user read routed to the owning worker fails with a client error while that worker is
    unreachable (it crashed, a rebalance is under way): that is "not now", a 503.
    """
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        message = f"{exc.reason}: {request.method} {request.path[:100]}"
        return web.json_response({"error": message, "status": exc.status},
                                 status=exc.status, headers=headers)
    except (ClientError, TimeoutError) as exc:
        log.warning("routing %s to the owning worker failed: %r", request.path, exc)
        return web.json_response({"error": "the worker owning this key is unreachable, "
                                           "retry later", "status": 503}, status=503)
    except Exception:
        log.exception("unhandled error answering %s %s", request.method, request.path)
        return web.json_response({"error": "internal error", "status": 500}, status=500)


def register(sa: StreamApp) -> None:
    """Attach the web views to ``sa.app``."""
    app, s, m = sa.app, sa.settings, sa.metrics
    router = KeyRouter(app, sa.user_state, s.partitions)
    app.web.web_app.middlewares.append(json_errors)
    openapi = build_openapi(s)

    def timed(endpoint: str) -> Callable[[Handler], Handler]:
        def deco(fun: Handler) -> Handler:
            @wraps(fun)
            async def wrapper(view: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                status = 500
                try:
                    response = await fun(view, request, *args, **kwargs)
                    status = int(getattr(response, "status", 200))
                    return response
                finally:
                    m.request_seconds.labels(endpoint=endpoint, status_class=_status_class(
                        status)).observe(time.perf_counter() - started)
            return wrapper
        return deco

    def error(view: Any, status: int, message: str) -> Any:
        return view.json({"error": message, "status": status}, status=status)

    def restoring(key: bytes) -> bool:
        """Whether the local partition holding ``key`` is still being restored.

        Only that partition's readers wait: partitions that stayed with this worker through a
        rebalance keep answering while newly assigned ones catch up.
        """
        if not app.in_recovery:
            return False
        recovery = app.tables.recovery
        tp = router.topic_partition(key)
        if tp not in recovery.active_tps:
            return False
        return tp not in recovery.active_highwaters or recovery.active_remaining()[tp] > 0

    def owned(fun: Handler) -> Handler:
        """Answer a per-user read here if this worker owns the user, else proxy it to the
        owner; 503 while this worker cannot yet tell which worker owns a key."""
        @wraps(fun)
        async def wrapper(view: Any, request: Any, user: str) -> Any:
            if not sa.started:
                return error(view, 503, "worker is starting (tables not recovered yet), "
                                        "retry later")
            if not 1 <= len(user) <= MAX_ID_CHARS:
                return error(view, 400, f"user id must have 1..{MAX_ID_CHARS} characters")
            key = encode_key(user)
            if not router.is_local(key):
                try:
                    return await router.route(key, view.web, request)
                except SameNode:  # the partition moved here meanwhile
                    pass
            return await fun(view, request, user)
        return wrapper

    async def admit_read(view: Any, user: str) -> Any | None:
        """Return a 503 while local state is being restored from the changelog; pace the
        read while ingestion is behind."""
        if restoring(encode_key(user)):
            return error(view, 503, "this worker is restoring the user's partition from the "
                                    "changelog, retry later")
        if sa.backlog > s.backlog_messages:
            await sa.read_pacer.wait()
        return None

    def authorized(request: Any) -> bool | None:
        """Return None if admin is disabled, else whether the bearer token matches."""
        if not s.admin_token:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), s.admin_token.encode())

    def admin_denied(view: Any, request: Any) -> Any | None:
        ok = authorized(request)
        if ok is None:
            return error(view, 404, "admin endpoints are disabled (no ADVREC_ADMIN_TOKEN set)")
        if not ok:
            return view.json({"error": "missing or wrong bearer token", "status": 401},
                             status=401, headers={"WWW-Authenticate": "Bearer"})
        return None

    def cached(key: bytes) -> UserState | None:
        """The in-memory state (write-behind: newer than the table until the next flush)."""
        return None if sa.behind is None else sa.behind.cache.peek(key)

    def read_state(key: bytes) -> UserState | None:
        state = cached(key)
        if state is not None:
            return state if state.count else None  # a new user whose events were duplicates
        raw = router.read(key)
        return None if raw is None else UserState.from_bytes(raw)

    def read_history(key: bytes) -> list:
        state = cached(key)
        return list(state.history) if state is not None else UserState.history_from_bytes(
            router.read(key))

    def worker_ident() -> dict[str, Any]:
        return {"host": s.web_host, "port": s.web_port}

    @app.page("/recommendations/{user}")
    @timed("recommendations")
    @owned
    async def recommendations(view: Any, request: Any, user: str) -> Any:
        bad = await admit_read(view, user)
        if bad is not None:
            return bad
        raw_k = request.query.get("k", str(DEFAULT_K))
        try:
            k = int(raw_k)
        except ValueError:
            return error(view, 400, f"k must be an integer, got {raw_k[:20]!r}")
        if not 1 <= k <= s.max_k:
            return error(view, 400, f"k must be between 1 and {s.max_k}, got {k}")
        history = read_history(encode_key(user))
        answer = None
        cause = "no_history" if not history else "no_known_items"
        if sa.server.current is None:
            cause = "no_model"
        elif history:
            try:
                answer = await sa.server.recommend(history, k)
            except ModelTimeout as exc:
                log.warning("recommendations for %r: %s", user[:64], exc)
                return error(view, 503, f"{exc}; retry later")
            except Exception:
                log.exception("model call failed; answering with the trending fallback")
                cause = "model_error"
        if answer is not None:
            items, version = answer
            return view.json({"user": user, "items": items, "model_version": version,
                              "fallback": False, "served_by": worker_ident()})
        seen = set(history)
        items = [i for i in sa.trending_cache if i not in seen][:k]
        m.fallback_answers.labels(cause=cause).inc()
        live = sa.server.current
        return view.json({"user": user, "items": items, "fallback": True,
                          "fallback_cause": cause,
                          "model_version": live.version if live else None,
                          "served_by": worker_ident()})

    @app.page("/users/{user}")
    @timed("users")
    @owned
    async def user_state_view(view: Any, request: Any, user: str) -> Any:
        bad = await admit_read(view, user)
        if bad is not None:
            return bad
        state = read_state(encode_key(user))
        if state is None:
            return view.json({"error": f"unknown user {user!r}", "status": 404,
                              "served_by": worker_ident()}, status=404)
        return view.json({"user": user, **state.public(), "served_by": worker_ident()})

    @app.page("/healthz")
    @timed("healthz")
    async def healthz(view: Any, request: Any) -> Any:
        return view.json({"status": "ok"})

    @app.page("/readyz")
    @timed("readyz")
    async def readyz(view: Any, request: Any) -> Any:
        live = sa.server.current
        feed = sa.feed.snapshot
        fallback_mode = live is None and s.ready_without_model
        # ready once the tables are local and the bundle topic was read and its current
        # version tried: a new pod answers with the fleet's model from its first request
        ready = sa.started and sa.feed.ready.is_set() and (live is not None or fallback_mode)
        body = {
            "ready": ready,
            "model_version": live.version if live else None,
            "providers": live.providers if live else [],
            "fallback_mode": fallback_mode,
            "published_version": feed.pointer,
            "pinned_version": feed.pin.version if feed.pin else None,
            "bundle_topic_read": feed.caught_up,
            "rejected": dict(sa.watcher.rejected),
        }
        return view.json(body, status=200 if ready else 503)

    @app.page("/metrics")
    async def metrics_view(view: Any, request: Any) -> Any:
        # aiohttp refuses a charset inside content_type, so the exposition header goes raw
        body = generate_latest(m.registry)
        return view.bytes(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.page(OPENAPI_PATH)
    async def openapi_view(view: Any, request: Any) -> Any:
        return view.json(openapi)

    @app.page("/noop")
    @timed("noop")
    async def noop(view: Any, request: Any) -> Any:
        return view.json({"ok": True})

    @app.page("/admin/model")
    @timed("admin")
    async def admin_model(view: Any, request: Any) -> Any:
        denied = admin_denied(view, request)
        if denied is not None:
            return denied
        live = sa.server.current
        feed = sa.feed.snapshot
        pin = feed.pin
        return view.json({
            "live": None if live is None else {
                "version": live.version, "providers": live.providers,
                "vocab_size": len(live.bundle.vocab), "loaded_at": live.loaded_at,
                "meta": live.bundle.meta},
            "current_pointer": feed.pointer,
            "pin": None if pin is None else {"version": pin.version, "by": pin.by,
                                             "reason": pin.reason, "at_ms": pin.at},
            "versions": list(feed.local),
            "topic_versions": list(feed.topic),
            "rejected": dict(sa.watcher.rejected),
            "swaps": sa.watcher.swaps,
        })

    def admin_caller(request: Any) -> str:
        peer = request.remote or "?"
        return f"admin@{s.web_host}:{s.web_port} from {peer}"

    class AdminRollback(faust.web.View):
        async def post(self, request: Any) -> Any:
            started = time.perf_counter()
            response = await self._rollback(request)
            m.request_seconds.labels(endpoint="admin", status_class=_status_class(
                response.status)).observe(time.perf_counter() - started)
            return response

        async def _rollback(self, request: Any) -> Any:
            denied = admin_denied(self, request)
            if denied is not None:
                return denied
            version = request.query.get("version") or None
            if version is not None and version not in sa.feed.snapshot.local:
                # never let a request name a path: only versions rebuilt from the topic load
                return error(self, 409, f"no published bundle version {version[:80]!r}")
            try:
                done = await sa.feed.rollback(version, by=admin_caller(request))
            except PinError as exc:
                return error(self, exc.status, str(exc))
            log.warning("rolled the fleet back to bundle %s by admin request", done)
            return self.json({"rolled_back_to": done, "pinned": done})

    class AdminPin(faust.web.View):
        async def get(self, request: Any) -> Any:
            return await self._timed(request, self._show)

        async def delete(self, request: Any) -> Any:
            return await self._timed(request, self._release)

        async def _timed(self, request: Any, fun: Handler) -> Any:
            started = time.perf_counter()
            denied = admin_denied(self, request)
            response = denied if denied is not None else await fun(request)
            m.request_seconds.labels(endpoint="admin", status_class=_status_class(
                response.status)).observe(time.perf_counter() - started)
            return response

        async def _show(self, request: Any) -> Any:
            pin = sa.feed.snapshot.pin
            return self.json({"pinned": pin.version if pin else None,
                              "by": pin.by if pin else None,
                              "current_pointer": sa.feed.snapshot.pointer})

        async def _release(self, request: Any) -> Any:
            if sa.feed.snapshot.pin is None:
                return self.json({"pinned": None, "released": False,
                                  "current_pointer": sa.feed.snapshot.pointer})
            try:
                await sa.feed.pin(None, by=admin_caller(request), reason="released")
            except PinError as exc:
                return error(self, exc.status, str(exc))
            return self.json({"pinned": None, "released": True,
                              "current_pointer": sa.feed.snapshot.pointer})

    app.page("/admin/rollback")(AdminRollback)
    app.page("/admin/pin")(AdminPin)
