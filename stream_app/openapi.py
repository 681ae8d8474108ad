"""The OpenAPI 3.0 document of the worker's HTTP API (``GET /openapi.json``).

The limits in it (user id length, ``k``, history length) come from the same constants and
settings the views check, so the document and the code cannot disagree about them; the
integration test ``tests/integration/test_http_fuzz.py`` fuzzes a live worker against it
(schemathesis) and checks that every route the views register is described here.

Status codes, as the views produce them:

* 400: a bad user id or ``k``; 401: admin call without the right bearer token; 404: unknown
  user, or admin endpoints disabled (no ``ADVREC_ADMIN_TOKEN``); 405: method not allowed;
  409: rollback refused. Every error body is JSON ``{"error": <message>, "status": <code>}``.
* 503 only means "not now": ``/readyz`` before the worker is started and has a model (or
  declared fallback mode), and the per-user reads while the partition that owns the user is
  not assigned to any worker (start-up, rebalance, recovery) or its owner is unreachable.
"""

from __future__ import annotations

from typing import Any

from advrec.contract import MAX_ID_CHARS
from stream_app.settings import Settings

__all__ = ["DEFAULT_K", "FALLBACK_CAUSES", "OPENAPI_PATH", "build_openapi"]

OPENAPI_PATH = "/openapi.json"
DEFAULT_K = 10  # recommendations per answer when the request names no k
FALLBACK_CAUSES = ("no_history", "no_known_items", "no_model", "model_error")

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any],
          headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _error(description: str) -> dict[str, Any]:
    return _json(description, _ref("Error"))


def _schemas(s: Settings) -> dict[str, Any]:
    items = {"type": "array", "items": {"type": "string"}}
    version = {"type": "string", "nullable": True}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string", "minLength": 1,
                          "description": "What was wrong, for a person to read"},
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "served_by": _ref("ServedBy"),
            },
        },
        "ServedBy": {
            "type": "object",
            "description": "The worker that owns the user's partition and answered",
            "required": ["host", "port"],
            "properties": {"host": {"type": "string"},
                           "port": {"type": "integer", "minimum": 1, "maximum": 65535}},
        },
        "Recommendations": {
            "type": "object",
            "required": ["user", "items", "fallback", "model_version", "served_by"],
            "properties": {
                "user": {"type": "string"},
                "items": {**items, "maxItems": s.max_k,
                          "description": "Best first; never an item the user already saw"},
                "fallback": {"type": "boolean",
                             "description": "True: trending items, not the model's answer"},
                "fallback_cause": {"type": "string", "enum": list(FALLBACK_CAUSES)},
                "model_version": version,
                "served_by": _ref("ServedBy"),
            },
        },
        "UserState": {
            "type": "object",
            "required": ["user", "history", "last_ts", "count", "types", "served_by"],
            "properties": {
                "user": {"type": "string"},
                "history": {**items, "maxItems": s.history_len,
                            "description": "Last items, oldest first"},
                "last_ts": {"type": "integer", "description": "Latest event time (ms)"},
                "count": {"type": "integer", "minimum": 0},
                "types": {"type": "object", "additionalProperties": {"type": "integer"}},
                "suspicion": {
                    "type": "object", "nullable": True,
                    "description": "P(fake) from the live bundle's fake-user detector at the "
                                   "user's latest scored batch; null: not scored (too few "
                                   "clicks, or no bundle with a detector yet)",
                    "required": ["p_fake", "detector_rounds"],
                    "properties": {
                        "p_fake": {"type": "number", "minimum": 0, "maximum": 1},
                        "detector_rounds": {"type": "integer", "minimum": 0,
                                            "description": "The detector's version"}},
                },
                "served_by": _ref("ServedBy"),
            },
        },
        "Readiness": {
            "type": "object",
            "required": ["ready", "model_version", "providers", "fallback_mode",
                         "published_version", "pinned_version", "bundle_topic_read",
                         "rejected"],
            "properties": {
                "ready": {"type": "boolean"},
                "model_version": version,
                "providers": items,
                "fallback_mode": {"type": "boolean"},
                "published_version": {**version, "description": "The topic's current version"},
                "pinned_version": {**version, "description": "The version a pin holds the "
                                                             "fleet on, if any"},
                "bundle_topic_read": {"type": "boolean", "description": "The bundle topic was "
                                      "read up to where it ended at start-up"},
                "rejected": {"type": "object", "additionalProperties": {"type": "string"},
                             "description": "Rejected bundle version -> reason"},
            },
        },
        "ModelStatus": {
            "type": "object",
            "required": ["live", "current_pointer", "pin", "versions", "topic_versions",
                         "rejected", "swaps"],
            "properties": {
                "live": {
                    "type": "object",
                    "nullable": True,
                    "required": ["version", "providers", "vocab_size", "loaded_at", "meta",
                                 "path", "index_build_seconds"],
                    "properties": {
                        "version": {"type": "string"},
                        "providers": items,
                        "vocab_size": {"type": "integer", "minimum": 0},
                        "loaded_at": {"type": "number"},
                        # how it ranks (README, "Large catalogues"), and its index's build
                        "path": {"type": "string", "enum": ["exact", "two_stage"]},
                        "index_build_seconds": {"type": "number", "nullable": True},
                        "meta": {"type": "object"},
                    },
                },
                "current_pointer": version,
                "pin": {"type": "object", "nullable": True,
                        "required": ["version", "by", "reason", "at_ms"],
                        "properties": {"version": {"type": "string"}, "by": {"type": "string"},
                                       "reason": {"type": "string"},
                                       "at_ms": {"type": "integer"}}},
                "versions": {**items, "description": "Versions in this worker's cache, "
                                                     "oldest first"},
                "topic_versions": {**items, "description": "Whole versions on the bundle "
                                                           "topic, oldest first"},
                "rejected": {"type": "object", "additionalProperties": {"type": "string"}},
                "swaps": {"type": "integer", "minimum": 0},
            },
        },
        "PinStatus": {
            "type": "object",
            "required": ["pinned", "current_pointer"],
            "properties": {"pinned": version, "by": version, "released": {"type": "boolean"},
                           "current_pointer": version},
        },
        "Flag": {
            "type": "object",
            "required": ["user", "state", "at_ms", "by", "reasons"],
            "properties": {
                "user": {"type": "string"},
                "state": {"type": "string", "enum": ["flagged", "readmitted"]},
                "at_ms": {"type": "integer"}, "by": {"type": "string"},
                "p_fake": {"type": "number", "nullable": True,
                           "description": "The score that crossed the threshold"},
                "rounds": {"type": "integer",
                           "description": "The detector's training rounds then (its version)"},
                "note": {"type": "string"},
                "reasons": {"type": "array", "items": {
                    "type": "object", "required": ["feature", "term"],
                    "properties": {"feature": {"type": "string"}, "term": {"type": "number"}},
                    "description": "A feature that raised the score and by how much (logit); "
                                   "the last, 'company', is how many high scorers push one "
                                   "item with this user"}},
            },
        },
    }


def build_openapi(settings: Settings) -> dict[str, Any]:
    """Return the OpenAPI document of the HTTP API for a worker with ``settings``."""
    s = settings
    user = {
        "name": "user", "in": "path", "required": True,
        "description": "User id, the same string as in click events",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
    }
    k = {
        "name": "k", "in": "query", "required": False,
        "description": "How many items to recommend",
        "schema": {"type": "integer", "minimum": 1, "maximum": s.max_k, "default": DEFAULT_K},
    }
    unavailable = _error("The user's partition has no reachable owner now (start-up, "
                         "rebalance, recovery): retry later")
    bad_request = _error(f"Bad user id (1..{MAX_ID_CHARS} characters) or bad k (1..{s.max_k})")
    unauthorized = _json("Missing or wrong bearer token", _ref("Error"), headers={
        "WWW-Authenticate": {"schema": {"type": "string", "enum": ["Bearer"]}}})
    admin_disabled = _error("Admin endpoints are disabled (no ADVREC_ADMIN_TOKEN set)")
    admin = [{"bearerAuth": []}]
    paths: dict[str, Any] = {
        "/recommendations/{user}": {"get": {
            "operationId": "recommendations",
            "summary": "Top-k items for a user (the model's, else the trending fallback)",
            "parameters": [user, k],
            "responses": {"200": _json("Recommendations", _ref("Recommendations")),
                          "400": bad_request, "503": _error(
                              "The user's partition has no reachable owner now (start-up, "
                              "rebalance, recovery), or the model call did not answer within "
                              "ADVREC_MODEL_TIMEOUT_S: retry later")},
        }},
        "/users/{user}": {"get": {
            "operationId": "userState",
            "summary": "A user's state: recent history, last event time, counts",
            "parameters": [user],
            "responses": {"200": _json("The user's state", _ref("UserState")),
                          "400": bad_request,
                          "404": _error("No event of this user was applied"),
                          "503": unavailable},
        }},
        "/healthz": {"get": {
            "operationId": "healthz", "summary": "Liveness: the event loop answers",
            "responses": {"200": _json("Alive", {
                "type": "object", "required": ["status"],
                "properties": {"status": {"type": "string", "enum": ["ok"]}}})},
        }},
        "/readyz": {"get": {
            "operationId": "readyz",
            "summary": "Readiness: started, and a model live (or declared fallback mode)",
            "responses": {"200": _json("Ready", _ref("Readiness")),
                          "503": _json("Not ready yet", _ref("Readiness"))},
        }},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus metrics",
            "responses": {"200": {"description": "Prometheus text exposition",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
        "/noop": {"get": {
            "operationId": "noop", "summary": "Does nothing (measures the HTTP overhead)",
            "responses": {"200": _json("Done", {
                "type": "object", "required": ["ok"],
                "properties": {"ok": {"type": "boolean", "enum": [True]}}})},
        }},
        "/admin/model": {"get": {
            "operationId": "adminModel", "summary": "The live model, the bundles, the swaps",
            "security": admin,
            "responses": {"200": _json("Model status", _ref("ModelStatus")),
                          "401": unauthorized, "404": admin_disabled},
        }},
        "/admin/rollback": {"post": {
            "operationId": "adminRollback",
            "summary": "Pin the whole fleet to an older bundle (a pin record on the bundle "
                       "topic); new bundles wait until DELETE /admin/pin",
            "security": admin,
            "parameters": [{
                "name": "version", "in": "query", "required": False,
                "description": "A published bundle version (default: the newest good one "
                               "older than the live model)",
                "schema": {"type": "string"},
            }],
            "responses": {
                "200": _json("Rolled back", {
                    "type": "object", "required": ["rolled_back_to", "pinned"],
                    "properties": {"rolled_back_to": {"type": "string"},
                                   "pinned": {"type": "string"}}}),
                "401": unauthorized, "404": admin_disabled,
                "409": _error("No such published version, no older one, or it was "
                              "rejected"),
                "503": _error("The pin could not be written to the bundle topic now"),
            },
        }},
        "/admin/pin": {
            "get": {
                "operationId": "adminPin", "summary": "The pin on the bundle topic, if any",
                "security": admin,
                "responses": {"200": _json("Pin status", _ref("PinStatus")),
                              "401": unauthorized, "404": admin_disabled},
            },
            "delete": {
                "operationId": "adminReleasePin",
                "summary": "Release the pin: the fleet serves the topic's current version "
                           "again and the trainer's next bundle goes live",
                "security": admin,
                "responses": {"200": _json("Released (or there was no pin)",
                                           _ref("PinStatus")),
                              "401": unauthorized, "404": admin_disabled,
                              "503": _error("The release could not be written now")},
            },
        },
        "/admin/flagged": {"get": {
            "operationId": "adminFlagged",
            "summary": "Users the fake-user detector flagged (their examples are not trained "
                       "on), the highest score first, with the features that raised it",
            "security": admin,
            "parameters": [{"name": "limit", "in": "query", "required": False,
                            "description": "At most this many users (1-10000, default 100)",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}],
            "responses": {"200": _json("Flagged users", {
                "type": "object", "required": ["count", "listed", "read_all", "users"],
                "properties": {"count": {"type": "integer"}, "listed": {"type": "integer"},
                               "read_all": {"type": "boolean"},
                               "users": {"type": "array", "items": _ref("Flag")}}}),
                          "400": _error("Bad limit"), "401": unauthorized,
                          "404": admin_disabled},
        }},
        "/admin/flagged/{user}/readmit": {"post": {
            "operationId": "adminReadmit",
            "summary": "Lift a user's flag (a false positive): the trainer trains on the "
                       "user's next examples and does not flag the user again",
            "security": admin,
            "parameters": [
                {"name": "user", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "note", "in": "query", "required": False,
                 "description": "Why (kept on the flags topic, at most 200 characters)",
                 "schema": {"type": "string"}}],
            "responses": {"200": _json("Re-admitted", {
                "type": "object", "required": ["readmitted", "was"],
                "properties": {"readmitted": _ref("Flag"), "was": _ref("Flag")}}),
                          "401": unauthorized,
                          "404": _error("Admin disabled, or the user is not flagged"),
                          "503": _error("The re-admission could not be written now")},
        }},
        OPENAPI_PATH: {"get": {
            "operationId": "openapi", "summary": "This document",
            "responses": {"200": _json("OpenAPI 3.0 document", {"type": "object"})},
        }},
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "advrec worker API",
            "version": "1",
            "description": "Recommendations and user state (answered by the worker that owns "
                           "the user's partition), health, metrics and admin. Errors are "
                           'JSON {"error": message, "status": code}; 503 only means "not now".',
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(s),
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "The ADVREC_ADMIN_TOKEN of the worker"}},
        },
    }
