"""The HTTP API against its OpenAPI document: schemathesis fuzzes a live worker, no 5xx.

One worker with a model (three published bundles, so rollback has somewhere to go), an admin
token and a few ingested users, some with odd ids, is made fully ready first: from then on a
503 has no legitimate cause, so any 5xx at all fails. schemathesis (its CLI, the most stable
surface of 4.x) loads the document the worker serves at /openapi.json and runs its coverage
and fuzzing phases with the checks in ``CHECKS``. The regression tests after it pin what
fuzzing and review found, each with a plain request.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema
import pytest
from aiohttp import ClientConnectionError, web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry

from advrec.contract import MAX_ID_CHARS, ClickEvent, encode_event, encode_key
from stream_app.app import create_app
from stream_app.openapi import DEFAULT_K, OPENAPI_PATH, build_openapi
from stream_app.settings import Settings
from stream_app.views import json_errors
from tests.bundles import publish_toy_to_topic
from tests.integration.conftest import Names, Worker, send, wait_for

pytestmark = pytest.mark.kafka

TOKEN = "fuzz-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VOCAB = [f"i{n}" for n in range(200)]
NOW = int(time.time() * 1000)
MAX_EXAMPLES = 400  # per operation; the whole run takes ~40 s on 2 busy cores
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "unsupported_method",
    "ignored_auth",
)
# user ids a path can mangle: slashes, dots, percent signs, query and fragment marks,
# spaces, non-ASCII, the longest allowed
ODD_USERS = ["alice", "ümlaut 🎉", "a/b", "../../etc/passwd", "%2F", "100%", "semi;colon?q=1#f",
             " padded ", "日本語", "+plus+", "x" * MAX_ID_CHARS]


def click(user: str, item: str, n: int) -> tuple[bytes, bytes]:
    e = ClickEvent(user=user, item=item, ts=NOW - 100_000 + n, id=f"e{n}")
    return encode_key(user), encode_event(e)


def path_of(user: str) -> str:
    return quote(user, safe="")


@pytest.fixture(scope="module")
def live(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A fully ready worker (model live, users ingested) for the whole module."""
    tmp = tmp_path_factory.mktemp("fuzz")
    names = Names()
    for seed in range(3):
        publish_toy_to_topic(kafka, names.bundles, VOCAB, seed=seed)
    worker = Worker(names, tmp, extra_env={"ADVREC_READY_WITHOUT_MODEL": "0",
                                           "ADVREC_ADMIN_TOKEN": TOKEN})
    worker.start()
    try:
        worker.wait_ready()
        send(names.clicks, [click(u, f"i{n}", n) for u in ODD_USERS for n in range(3)])
        wait_for(lambda: all(
            httpx.get(f"{worker.url}/users/{path_of(u)}", timeout=5).status_code == 200
            for u in ODD_USERS), 60, "every user's clicks applied")
        # /readyz said 503 while the worker started (as it should): count from here on
        worker.errors_when_ready = _server_errors(worker)  # type: ignore[attr-defined]
        yield worker
    finally:
        worker.stop()


def _server_errors(worker: Worker) -> float:
    return worker.metric("advrec_http_request_seconds_count", 'status_class="5xx"')


# --- the document ------------------------------------------------------------------------

def _openapi_30_metaschema() -> dict[str, Any]:
    # the official OpenAPI 3.0 schema, as schemathesis ships it to validate what it loads
    from schemathesis.specs.openapi.definitions import OPENAPI_30

    return OPENAPI_30


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_the_document_is_valid_openapi_and_takes_its_limits_from_the_code() -> None:
    doc = build_openapi(Settings(max_k=7))
    jsonschema.Draft4Validator(_openapi_30_metaschema()).validate(doc)
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"], ref
    params = {p["name"]: p["schema"]
              for p in doc["paths"]["/recommendations/{user}"]["get"]["parameters"]}
    assert params["user"] == {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}
    assert params["k"]["maximum"] == 7 and params["k"]["default"] == DEFAULT_K
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                assert response.get("description"), (method, path, status)
                if int(status) >= 400:  # every error is the JSON {"error": ...} body
                    schema = response["content"]["application/json"]["schema"]
                    assert schema["$ref"].endswith(("/Error", "/Readiness")), (path, status)
    admin = [op for item in doc["paths"].values() for op in item.values() if "security" in op]
    assert len(admin) == 6 and all("401" in op["responses"] for op in admin)


def test_every_route_the_views_register_is_in_the_document(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "tables"), bundle_dir=str(tmp_path / "b"))
    sa = create_app(settings, registry=CollectorRegistry())
    routes = {(r.method.lower(), r.resource.canonical)
              for r in sa.app.web.web_app.router.routes() if r.method != "HEAD"}
    doc = build_openapi(settings)
    documented = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert routes == documented


@pytest.mark.parametrize(("exc", "status"), [
    (web.HTTPNotFound(), 404), (web.HTTPMethodNotAllowed("POST", ["GET"]), 405),
    (ClientConnectionError("owner down"), 503), (TimeoutError(), 503),
    (RuntimeError("bug"), 500)])
async def test_the_error_middleware_answers_json(exc: BaseException, status: int) -> None:
    # a routed read whose owning worker just died (ClientConnectionError) is "not now", 503;
    # a multi-worker crash test would need a dead owner inside the session timeout
    async def handler(request: web.Request) -> web.StreamResponse:
        raise exc

    request = make_mocked_request("GET", "/users/bob")
    response = await json_errors(request, handler)
    assert response.status == status and response.content_type == "application/json"
    body = json.loads(response.body)
    assert body["status"] == status and body["error"]
    if status == 405:
        assert response.headers["Allow"] == "GET"


# --- fuzzing the live worker -------------------------------------------------------------

def _schemathesis() -> str:
    exe = Path(sys.executable).parent / "schemathesis"
    return str(exe) if exe.exists() else shutil.which("schemathesis") or "schemathesis"


def _cases_per_operation(ndjson: Path) -> dict[str, int]:
    cases: dict[str, int] = {}
    for line in ndjson.read_text().splitlines():
        event = json.loads(line)
        done = event.get("ScenarioFinished")
        recorded = (done or {}).get("recorder", {})
        if "cases" in recorded:  # the cases it generated, keyed by case id
            label = recorded["label"]
            cases[label] = cases.get(label, 0) + len(recorded["cases"])
    return cases


def test_schemathesis_finds_no_server_error_and_no_contract_violation(
        live: Worker, tmp_path: Path) -> None:
    doc = httpx.get(f"{live.url}{OPENAPI_PATH}", timeout=5).json()
    assert doc == json.loads(json.dumps(build_openapi(Settings())))
    errors_before = _server_errors(live)
    report = tmp_path / "report.ndjson"
    cmd = [_schemathesis(), "run", f"{live.url}{OPENAPI_PATH}", "--url", live.url,
           "--header", f"Authorization: Bearer {TOKEN}", "--checks", ",".join(CHECKS),
           "--phases", "examples,coverage,fuzzing", "--max-examples", str(MAX_EXAMPLES),
           # one worker: with two, the seed is not enough to fix which cases run, and now
           # and then a POST operation's fuzzing ended after a handful of cases
           "--seed", "8", "--workers", "1", "--generation-database", "none",
           "--request-timeout", "10", "--no-color",
           "--report", "ndjson", "--report-ndjson-path", str(report)]
    started = time.monotonic()
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - started
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"schemathesis failed (rc {res.returncode}):\n{out[-6000:]}"
    cases = _cases_per_operation(report)
    print(f"\nschemathesis: {sum(cases.values())} cases in {elapsed:.0f}s: {cases}")
    # every operation ran; the ones with inputs got hundreds of distinct cases
    operations = sum(len(item) for item in doc["paths"].values())
    assert len(cases) == operations - 1, cases  # it never fuzzes the schema's own URL
    for op in ("GET /recommendations/{user}", "GET /users/{user}", "POST /admin/rollback",
               "POST /admin/flagged/{user}/readmit"):
        assert cases[op] >= 200, cases
    assert _server_errors(live) == errors_before
    assert live.alive()
    ready = httpx.get(f"{live.url}/readyz", timeout=5).json()
    assert ready["ready"] and ready["model_version"] and ready["rejected"] == {}


# --- regressions: what fuzzing and review found ------------------------------------------

@pytest.mark.parametrize("user", ODD_USERS)
def test_odd_user_ids_reach_their_own_state(live: Worker, user: str) -> None:
    r = httpx.get(f"{live.url}/users/{path_of(user)}", timeout=5)
    assert r.status_code == 200 and r.json()["user"] == user and r.json()["count"] == 3
    r = httpx.get(f"{live.url}/recommendations/{path_of(user)}", timeout=5)
    body = r.json()
    assert r.status_code == 200 and body["user"] == user and body["fallback"] is False
    assert not {"i0", "i1", "i2"} & set(body["items"]) and len(body["items"]) == DEFAULT_K


@pytest.mark.parametrize("raw_k", ["0", "-1", "201", "1.5", "1e3", "", " ", "ten", "\x00",
                                   "9" * 30, "1" * 5000])
def test_every_bad_k_is_a_400_with_a_message(live: Worker, raw_k: str) -> None:
    r = httpx.get(f"{live.url}/recommendations/alice", params={"k": raw_k}, timeout=5)
    assert r.status_code == 400 and r.json()["error"].startswith("k must"), r.text
    assert len(r.text) < 200  # the bad value is echoed truncated, never whole


@pytest.mark.parametrize("user", ["x" * (MAX_ID_CHARS + 1), "é" * (MAX_ID_CHARS + 1),
                                  "x" * 5000])
def test_too_long_user_ids_are_a_400(live: Worker, user: str) -> None:
    for endpoint in ("users", "recommendations"):
        r = httpx.get(f"{live.url}/{endpoint}/{path_of(user)}", timeout=5)
        assert r.status_code == 400 and "user id must have" in r.json()["error"]


def test_a_request_line_over_the_8_kib_limit_is_a_400_not_a_crash(live: Worker) -> None:
    # aiohttp's parser refuses it (plain text, before any view runs); the worker carries on
    r = httpx.get(f"{live.url}/recommendations/alice?k=1&pad={'p' * 9000}", timeout=5)
    assert r.status_code == 400
    assert httpx.get(f"{live.url}/recommendations/alice", timeout=5).status_code == 200


def test_extra_query_params_and_bodies_on_get_are_ignored(live: Worker) -> None:
    r = httpx.request("GET", f"{live.url}/recommendations/alice?k=3&k=500&zzz=%00&user=bob",
                      content=b"\xff" * 10_000, timeout=5)
    assert r.status_code == 200 and len(r.json()["items"]) == 3 and r.json()["user"] == "alice"


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/nope", 404), ("GET", "/users/", 404), ("GET", "/users/a/b", 404),
    # Faust's own debug pages are off (/table/ would dump raw state past our checks)
    ("GET", "/table/user_state/alice/", 404), ("GET", "/router/user_state/alice/", 404),
    ("GET", "/graph/", 404), ("GET", "/stats/", 404),
    ("POST", "/noop", 405), ("DELETE", "/recommendations/alice", 405),
    ("GET", "/admin/rollback", 405), ("PUT", "/admin/model", 405),
])
def test_unknown_paths_and_methods_answer_json(live: Worker, method: str, path: str,
                                               status: int) -> None:
    r = httpx.request(method, f"{live.url}{path}", timeout=5)
    assert r.status_code == status and r.headers["content-type"].startswith("application/json")
    assert r.json()["status"] == status and path in r.json()["error"]
    if status == 405:
        assert r.headers["Allow"]


@pytest.mark.parametrize("version", ["../../etc", "..", ".", "/", "/tmp", "a\x00b", "v" * 4000,
                                     "CURRENT", ".tmp-1"])
def test_rollback_to_anything_but_a_published_version_is_refused(live: Worker,
                                                                 version: str) -> None:
    before = httpx.get(f"{live.url}/readyz", timeout=5).json()
    r = httpx.post(f"{live.url}/admin/rollback", params={"version": version}, headers=AUTH,
                   timeout=5)
    assert r.status_code == 409 and "no published bundle version" in r.json()["error"]
    after = httpx.get(f"{live.url}/readyz", timeout=5).json()
    # nothing was loaded, and a request cannot grow the rejected-bundle map
    assert after["model_version"] == before["model_version"] and after["rejected"] == {}


def test_admin_without_the_token_is_a_401_that_says_so(live: Worker) -> None:
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic eDp5"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        r = httpx.get(f"{live.url}/admin/model", headers=headers, timeout=5)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert "bearer token" in r.json()["error"]
    assert httpx.get(f"{live.url}/admin/model", headers=AUTH, timeout=5).status_code == 200


def test_no_request_once_ready_got_a_5xx(live: Worker) -> None:
    assert _server_errors(live) == live.errors_when_ready  # type: ignore[attr-defined]
    assert TOKEN not in httpx.get(f"{live.url}/metrics", timeout=5).text
