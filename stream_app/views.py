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
from advrec.flags import FLAGGED
from stream_app.feed import PinError
from stream_app.openapi import DEFAULT_K, OPENAPI_PATH, build_openapi
from stream_app.routing import KeyRouter
from stream_app.serving import ModelTimeout
from stream_app.state import UserState

if TYPE_CHECKING:
    from stream_app.app import StreamApp

__all__ = ["HttpApi", "json_errors", "register"]

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


def timed(metrics: Any, endpoint: str) -> Callable[[Handler], Handler]:
    """Record each answer's latency in ``advrec_request_seconds{endpoint, status_class}``."""
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
                metrics.request_seconds.labels(endpoint=endpoint, status_class=_status_class(
                    status)).observe(time.perf_counter() - started)
        return wrapper
    return deco


def _plain(fun: Handler) -> Handler:
    @wraps(fun)
    async def handler(view: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        return await fun(view, request, *args, **kwargs)
    return handler


def error(view: Any, status: int, message: str) -> Any:
    return view.json({"error": message, "status": status}, status=status)


class HttpApi:
    """The worker's HTTP endpoints, one method each, over one ``StreamApp``.

    Each endpoint takes Faust's ``(view, request, ...)``; ``register`` mounts them. Kept as
    methods of one object (not closures inside ``register``) so that a unit test can build the
    API over a small stand-in for the app and call one endpoint at a time.
    """

    def __init__(self, sa: StreamApp, router: KeyRouter) -> None:
        self.sa = sa
        self.s = sa.settings
        self.exclusion = self.s.exclusion  # which past items leave the list
        self.m = sa.metrics
        self.router = router
        self.openapi = build_openapi(sa.settings)

    # ------------------------------------------------------------------ helpers

    def restoring(self, key: bytes) -> bool:
        """Whether the local partition holding ``key`` is still being restored.

        Only that partition's readers wait: partitions that stayed with this worker through a
        rebalance keep answering while newly assigned ones catch up.
        """
        app = self.sa.app
        if not app.in_recovery:
            return False
        recovery = app.tables.recovery
        tp = self.router.topic_partition(key)
        if tp not in recovery.active_tps:
            return False
        return tp not in recovery.active_highwaters or recovery.active_remaining()[tp] > 0

    def owned(self, fun: Handler) -> Handler:
        """Answer a per-user read here if this worker owns the user, else proxy it to the
        owner; 503 while this worker cannot yet tell which worker owns a key."""
        @wraps(fun)
        async def wrapper(view: Any, request: Any, user: str) -> Any:
            if not self.sa.started:
                return error(view, 503, "worker is starting (tables not recovered yet), "
                                        "retry later")
            if not 1 <= len(user) <= MAX_ID_CHARS:
                return error(view, 400, f"user id must have 1..{MAX_ID_CHARS} characters")
            key = encode_key(user)
            if not self.router.is_local(key):
                try:
                    return await self.router.route(key, view.web, request)
                except SameNode:  # the partition moved here meanwhile
                    pass
            return await fun(view, request, user)
        return wrapper

    async def admit_read(self, view: Any, user: str) -> Any | None:
        """Return a 503 while local state is being restored from the changelog; pace the
        read while ingestion is behind."""
        if self.restoring(encode_key(user)):
            return error(view, 503, "this worker is restoring the user's partition from the "
                                    "changelog, retry later")
        if self.sa.backlog > self.s.backlog_messages:
            await self.sa.read_pacer.wait()
        return None

    def authorized(self, request: Any) -> bool | None:
        """Return None if admin is disabled, else whether the bearer token matches."""
        if not self.s.admin_token:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.s.admin_token.encode())

    def admin_denied(self, view: Any, request: Any) -> Any | None:
        ok = self.authorized(request)
        if ok is None:
            return error(view, 404, "admin endpoints are disabled (no ADVREC_ADMIN_TOKEN set)")
        if not ok:
            return view.json({"error": "missing or wrong bearer token", "status": 401},
                             status=401, headers={"WWW-Authenticate": "Bearer"})
        return None

    def admin_caller(self, request: Any) -> str:
        peer = request.remote or "?"
        return f"admin@{self.s.web_host}:{self.s.web_port} from {peer}"

    def cached(self, key: bytes) -> UserState | None:
        """The in-memory state (write-behind: newer than the table until the next flush)."""
        behind = self.sa.behind
        return None if behind is None else behind.cache.peek(key)

    def read_state(self, key: bytes) -> UserState | None:
        state = self.cached(key)
        if state is not None:
            return state if state.count else None  # a new user whose events were duplicates
        raw = self.router.read(key)
        return None if raw is None else UserState.from_bytes(raw)

    def read_history(self, key: bytes) -> list:
        state = self.cached(key)
        return list(state.history) if state is not None else UserState.history_from_bytes(
            self.router.read(key))

    def history_and_excluded(self, key: bytes) -> tuple[list, list | None]:
        """The user's history and the items the exclusion rule takes out of the list (None:
        the whole history, the default rule, read without decoding the rest of the state)."""
        if self.exclusion.everything:
            return self.read_history(key), None
        state = self.cached(key)
        if state is None:
            raw = self.router.read(key)
            state = None if raw is None else UserState.from_bytes(raw)
        if state is None:
            return [], None
        history = list(state.history)
        return history, self.exclusion.excluded(history, state.history_types)

    def worker_ident(self) -> dict[str, Any]:
        return {"host": self.s.web_host, "port": self.s.web_port}

    # ------------------------------------------------------------------ per-user reads

    async def recommendations(self, view: Any, request: Any, user: str) -> Any:
        """``GET /recommendations/{user}?k=``: the model's top k, else the trending list."""
        bad = await self.admit_read(view, user)
        if bad is not None:
            return bad
        s, sa = self.s, self.sa
        raw_k = request.query.get("k", str(DEFAULT_K))
        try:
            k = int(raw_k)
        except ValueError:
            return error(view, 400, f"k must be an integer, got {raw_k[:20]!r}")
        if not 1 <= k <= s.max_k:
            return error(view, 400, f"k must be between 1 and {s.max_k}, got {k}")
        history, excluded = self.history_and_excluded(encode_key(user))
        answer = None
        cause = "no_history" if not history else "no_known_items"
        if sa.server.current is None:
            cause = "no_model"
        elif history:
            try:
                answer = await sa.server.recommend(history, k, excluded)
            except ModelTimeout as exc:
                log.warning("recommendations for %r: %s", user[:64], exc)
                return error(view, 503, f"{exc}; retry later")
            except Exception:
                log.exception("model call failed; answering with the trending fallback")
                cause = "model_error"
        if answer is not None:
            items, version = answer
            return view.json({"user": user, "items": items, "model_version": version,
                              "fallback": False, "served_by": self.worker_ident()})
        seen = set(history if excluded is None else excluded)
        items = [i for i in sa.trending_cache if i not in seen][:k]
        self.m.fallback_answers.labels(cause=cause).inc()
        live = sa.server.current
        return view.json({"user": user, "items": items, "fallback": True,
                          "fallback_cause": cause,
                          "model_version": live.version if live else None,
                          "served_by": self.worker_ident()})

    async def user_state(self, view: Any, request: Any, user: str) -> Any:
        """``GET /users/{user}``: what the worker remembers of the user."""
        bad = await self.admit_read(view, user)
        if bad is not None:
            return bad
        state = self.read_state(encode_key(user))
        if state is None:
            return view.json({"error": f"unknown user {user!r}", "status": 404,
                              "served_by": self.worker_ident()}, status=404)
        return view.json({"user": user, **state.public(), "served_by": self.worker_ident()})

    # ------------------------------------------------------------------ health and docs

    async def healthz(self, view: Any, request: Any) -> Any:
        return view.json({"status": "ok"})

    async def readyz(self, view: Any, request: Any) -> Any:
        """Ready once the tables are local and the bundle topic was read and its current
        version tried: a new pod answers with the fleet's model from its first request."""
        sa = self.sa
        live = sa.server.current
        feed = sa.feed.snapshot
        fallback_mode = live is None and self.s.ready_without_model
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

    async def metrics(self, view: Any, request: Any) -> Any:
        # aiohttp refuses a charset inside content_type, so the exposition header goes raw
        body = generate_latest(self.m.registry)
        return view.bytes(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi_doc(self, view: Any, request: Any) -> Any:
        return view.json(self.openapi)

    async def noop(self, view: Any, request: Any) -> Any:
        return view.json({"ok": True})

    # ------------------------------------------------------------------ admin

    async def admin_model(self, view: Any, request: Any) -> Any:
        """``GET /admin/model``: the live model, the pointer, any pin, the cached versions."""
        denied = self.admin_denied(view, request)
        if denied is not None:
            return denied
        sa = self.sa
        live = sa.server.current
        feed = sa.feed.snapshot
        pin = feed.pin
        return view.json({
            "live": None if live is None else {
                "version": live.version, "providers": live.providers,
                "vocab_size": len(live.bundle.vocab), "loaded_at": live.loaded_at,
                "meta": live.bundle.meta, "path": live.path,
                "index_build_seconds": None if live.two_stage is None
                else live.two_stage.index_seconds},
            "current_pointer": feed.pointer,
            "pin": None if pin is None else {"version": pin.version, "by": pin.by,
                                             "reason": pin.reason, "at_ms": pin.at},
            "versions": list(feed.local),
            "topic_versions": list(feed.topic),
            "rejected": dict(sa.watcher.rejected),
            "swaps": sa.watcher.swaps,
        })

    async def admin_rollback(self, view: Any, request: Any) -> Any:
        """``POST /admin/rollback[?version=]``: pin the fleet to a version (default: the one
        before the live one)."""
        denied = self.admin_denied(view, request)
        if denied is not None:
            return denied
        version = request.query.get("version") or None
        if version is not None and version not in self.sa.feed.snapshot.local:
            # never let a request name a path: only versions rebuilt from the topic load
            return error(view, 409, f"no published bundle version {version[:80]!r}")
        try:
            done = await self.sa.feed.rollback(version, by=self.admin_caller(request))
        except PinError as exc:
            return error(view, exc.status, str(exc))
        log.warning("rolled the fleet back to bundle %s by admin request", done)
        return view.json({"rolled_back_to": done, "pinned": done})

    async def admin_flagged(self, view: Any, request: Any) -> Any:
        """``GET /admin/flagged[?limit=]``: users flagged as fake now, the highest score
        first, each with its score, the features that raised it and who flagged it when."""
        denied = self.admin_denied(view, request)
        if denied is not None:
            return denied
        raw = request.query.get("limit", "100")
        try:
            limit = int(raw)
            if not 1 <= limit <= 10_000:
                raise ValueError
        except ValueError:
            return error(view, 400, f"limit must be an integer in [1, 10000], got {raw[:40]!r}")
        flags = self.sa.flags
        flagged = flags.book.flagged()
        return view.json({"count": len(flagged), "listed": min(limit, len(flagged)),
                          "read_all": flags.caught_up.is_set(),
                          "users": [r.as_json() for r in flagged[:limit]]})

    async def admin_readmit(self, view: Any, request: Any, user: str) -> Any:
        """``POST /admin/flagged/{user}/readmit[?note=]``: lift a flag (a false positive):
        the trainer trains on the user's next examples and does not flag the user again."""
        denied = self.admin_denied(view, request)
        if denied is not None:
            return denied
        current = self.sa.flags.book.get(user)
        if current is None or current.state != FLAGGED:
            return error(view, 404, f"user {user[:80]!r} is not flagged")
        note = request.query.get("note", "")[:200]
        try:
            record = await self.sa.flags.readmit(user, by=self.admin_caller(request), note=note)
        except Exception as exc:  # the broker is away: nothing changed
            log.warning("could not write the re-admission of %s: %s", user, exc)
            return error(view, 503, "could not write the re-admission to the flags topic; "
                                    "retry later")
        log.warning("user %s re-admitted by admin request (%s)", user, note or "no note")
        return view.json({"readmitted": record.as_json(), "was": current.as_json()})

    async def admin_pin(self, view: Any, request: Any) -> Any:
        """``GET /admin/pin``: the fleet's pin, if any."""
        denied = self.admin_denied(view, request)
        if denied is not None:
            return denied
        snap = self.sa.feed.snapshot
        pin = snap.pin
        return view.json({"pinned": pin.version if pin else None,
                          "by": pin.by if pin else None, "current_pointer": snap.pointer})

    async def admin_unpin(self, view: Any, request: Any) -> Any:
        """``DELETE /admin/pin``: release the pin; the fleet follows the pointer again."""
        denied = self.admin_denied(view, request)
        if denied is not None:
            return denied
        feed = self.sa.feed
        if feed.snapshot.pin is None:
            return view.json({"pinned": None, "released": False,
                              "current_pointer": feed.snapshot.pointer})
        try:
            await feed.pin(None, by=self.admin_caller(request), reason="released")
        except PinError as exc:
            return error(view, exc.status, str(exc))
        return view.json({"pinned": None, "released": True,
                          "current_pointer": feed.snapshot.pointer})


def register(sa: StreamApp) -> HttpApi:
    """Mount the endpoints of an ``HttpApi`` over ``sa`` on its Faust app; return the API."""
    app, m = sa.app, sa.metrics
    api = HttpApi(sa, KeyRouter(app, sa.user_state, sa.settings.partitions))
    app.web.web_app.middlewares.append(json_errors)

    def page(path: str, handler: Handler, endpoint: str | None) -> None:
        # Faust makes a handler the methods of a View class, so it must be a plain function
        # (a bound method would not get the view): ``timed`` and ``_plain`` make one
        app.page(path)(_plain(handler) if endpoint is None else timed(m, endpoint)(handler))

    page("/recommendations/{user}", api.owned(api.recommendations), "recommendations")
    page("/users/{user}", api.owned(api.user_state), "users")
    page("/healthz", api.healthz, "healthz")
    page("/readyz", api.readyz, "readyz")
    page("/metrics", api.metrics, None)
    page(OPENAPI_PATH, api.openapi_doc, None)
    page("/noop", api.noop, "noop")
    page("/admin/model", api.admin_model, "admin")

    timed_admin = timed(m, "admin")
    rollback, show_pin, unpin = (timed_admin(api.admin_rollback), timed_admin(api.admin_pin),
                                 timed_admin(api.admin_unpin))

    class AdminRollback(faust.web.View):
        async def post(self, request: Any) -> Any:
            return await rollback(self, request)

    class AdminPin(faust.web.View):
        async def get(self, request: Any) -> Any:
            return await show_pin(self, request)

        async def delete(self, request: Any) -> Any:
            return await unpin(self, request)

    flagged, readmit = timed_admin(api.admin_flagged), timed_admin(api.admin_readmit)

    class AdminFlagged(faust.web.View):
        async def get(self, request: Any) -> Any:
            return await flagged(self, request)

    class AdminReadmit(faust.web.View):
        async def post(self, request: Any, user: str) -> Any:
            return await readmit(self, request, user)

    app.page("/admin/rollback")(AdminRollback)
    app.page("/admin/pin")(AdminPin)
    app.page("/admin/flagged")(AdminFlagged)
    app.page("/admin/flagged/{user}/readmit")(AdminReadmit)
    return api
