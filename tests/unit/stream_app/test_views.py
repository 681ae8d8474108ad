"""The HTTP endpoints one at a time, over a small stand-in for the stream app (no Faust app,
no broker): what each answers for good and bad requests."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from advrec.channel import Pin
from advrec.contract import ClickEvent, encode_key
from stream_app.feed import FeedSnapshot
from stream_app.metrics import StreamMetrics
from stream_app.serving import ModelServer, ModelTimeout, load_model
from stream_app.settings import load_settings
from stream_app.state import UserState
from stream_app.views import HttpApi
from tests.bundles import publish_toy

VOCAB = [f"i{n}" for n in range(20)]


@dataclass
class Answer:
    body: Any
    status: int
    headers: dict[str, str]


class View:
    """What a Faust view offers the endpoints: ``json`` and ``bytes``."""

    def json(self, body: Any, *, status: int = 200, headers: Any = None) -> Answer:
        json.dumps(body)  # an endpoint's body must be JSON
        return Answer(body, status, dict(headers or {}))

    def bytes(self, body: bytes, *, status: int = 200, headers: Any = None) -> Answer:
        return Answer(body, status, dict(headers or {}))


@dataclass
class Request:
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    remote: str = "10.0.0.9"


class Router:
    """Every key is local; states come from a dict."""

    def __init__(self) -> None:
        self.states: dict[bytes, bytes] = {}

    def is_local(self, key: bytes) -> bool:
        return True

    def read(self, key: bytes) -> bytes | None:
        return self.states.get(key)


class Feed:
    def __init__(self) -> None:
        self.snapshot = FeedSnapshot(pointer="v2", local=("v1", "v2"), topic=("v1", "v2"),
                                     caught_up=True)
        self.ready = asyncio.Event()
        self.rollbacks: list[tuple[str | None, str]] = []

    async def rollback(self, version: str | None, by: str) -> str:
        self.rollbacks.append((version, by))
        done = version or "v1"
        self.snapshot = FeedSnapshot(pointer="v2", pin=Pin(done, by, "rollback", 0),
                                     local=self.snapshot.local, caught_up=True)
        return done


def make_api(tmp_path: Path, *, model: bool = True, server: Any = None,
             **env: str) -> tuple[HttpApi, Router, StreamMetrics]:
    settings = load_settings({"ADVREC_BUNDLE_DIR": str(tmp_path), **env})
    metrics = StreamMetrics.create()
    if server is None:
        server = ModelServer(metrics=metrics)
        if model:
            server.swap(load_model(tmp_path, publish_toy(tmp_path, VOCAB)))
    router = Router()
    sa = SimpleNamespace(
        settings=settings, metrics=metrics, server=server, feed=Feed(), started=True,
        backlog=0, behind=None, trending_cache=["i3", "i1", "i2"],
        watcher=SimpleNamespace(rejected={}, swaps=1),
        app=SimpleNamespace(in_recovery=False))
    return HttpApi(sa, router), router, metrics  # type: ignore[arg-type]


def remember(router: Router, user: str, items: list[str],
             types: list[str] | None = None) -> None:
    state = UserState()
    for n, item in enumerate(items):
        kind = "click" if types is None else types[n]
        state.apply(ClickEvent(user, item, 1_000 + n, type=kind, id=f"{user}{n}"), 50, 32)
    router.states[encode_key(user)] = state.to_bytes()


async def test_recommendations_answer_from_the_model_without_seen_items(tmp_path: Path) -> None:
    api, router, _ = make_api(tmp_path)
    remember(router, "u1", ["i1", "i2"])
    got = await api.recommendations(View(), Request({"k": "5"}), "u1")
    assert got.status == 200 and not got.body["fallback"]
    assert len(got.body["items"]) == 5 and not {"i1", "i2"} & set(got.body["items"])
    await api.sa.server.stop()


async def test_exclude_none_lets_the_list_show_the_users_past_items(tmp_path: Path) -> None:
    api, router, _ = make_api(tmp_path, ADVREC_EXCLUDE="none")
    remember(router, "u1", ["i1", "i2"])
    got = await api.recommendations(View(), Request({"k": "20"}), "u1")
    assert got.status == 200 and not got.body["fallback"]
    assert {"i1", "i2"} <= set(got.body["items"]) and len(got.body["items"]) == 20
    await api.sa.server.stop()


async def test_exclude_by_type_drops_only_items_of_those_event_types(tmp_path: Path) -> None:
    api, router, _ = make_api(tmp_path, ADVREC_EXCLUDE="purchase")
    remember(router, "u1", ["i1", "i2", "i5"], types=["purchase", "click", "cart"])
    got = await api.recommendations(View(), Request({"k": "20"}), "u1")
    items = set(got.body["items"])
    assert "i1" not in items and {"i2", "i5"} <= items and len(items) == 19
    await api.sa.server.stop()


async def test_the_trending_fallback_follows_the_exclusion_rule(tmp_path: Path) -> None:
    api, router, _ = make_api(tmp_path, model=False, ADVREC_EXCLUDE="none")
    remember(router, "u1", ["i1"])
    got = await api.recommendations(View(), Request({"k": "5"}), "u1")
    assert got.body["fallback"] and got.body["items"] == ["i3", "i1", "i2"]


@pytest.mark.parametrize(("k", "message"), [("x", "k must be an integer"),
                                            ("0", "k must be between 1 and 200"),
                                            ("201", "k must be between 1 and 200")])
async def test_recommendations_refuse_a_bad_k_with_a_message(tmp_path: Path, k: str,
                                                              message: str) -> None:
    api, _, _ = make_api(tmp_path)
    got = await api.recommendations(View(), Request({"k": k}), "u1")
    assert got.status == 400 and message in got.body["error"]


async def test_without_a_model_the_trending_list_answers_without_seen_items(
        tmp_path: Path) -> None:
    api, router, metrics = make_api(tmp_path, model=False)
    remember(router, "u1", ["i1"])
    got = await api.recommendations(View(), Request({"k": "5"}), "u1")
    assert got.status == 200 and got.body["fallback"] and got.body["items"] == ["i3", "i2"]
    assert got.body["fallback_cause"] == "no_model"
    assert metrics.registry.get_sample_value("advrec_fallback_answers_total",
                                             {"cause": "no_model"}) == 1


async def test_a_model_call_that_times_out_is_a_503_not_a_fallback(tmp_path: Path) -> None:
    class Hung:
        current = SimpleNamespace(version="v2")

        async def recommend(self, history: list[str], k: int, excluded: Any = None) -> Any:
            raise ModelTimeout("no answer from the model within 2s (model v2)")

    api, router, metrics = make_api(tmp_path, server=Hung())
    remember(router, "u1", ["i1"])
    got = await api.recommendations(View(), Request(), "u1")
    assert got.status == 503 and "within 2s" in got.body["error"]
    assert not metrics.registry.get_sample_value("advrec_fallback_answers_total",
                                                 {"cause": "model_error"})


async def test_owned_refuses_bad_user_ids_and_answers_503_before_start(tmp_path: Path) -> None:
    api, _, _ = make_api(tmp_path)
    handler = api.owned(api.user_state)
    assert (await handler(View(), Request(), "")).status == 400
    assert (await handler(View(), Request(), "u" * 300)).status == 400
    api.sa.started = False
    got = await handler(View(), Request(), "u1")
    assert got.status == 503 and "starting" in got.body["error"]


async def test_user_state_is_404_for_an_unknown_user_and_public_for_a_known_one(
        tmp_path: Path) -> None:
    api, router, _ = make_api(tmp_path)
    assert (await api.user_state(View(), Request(), "nobody")).status == 404
    remember(router, "u1", ["i1", "i4"])
    got = await api.user_state(View(), Request(), "u1")
    assert got.status == 200 and got.body["history"] == ["i1", "i4"] and got.body["count"] == 2


async def test_admin_is_404_without_a_token_and_401_with_a_wrong_one(tmp_path: Path) -> None:
    api, _, _ = make_api(tmp_path)
    assert (await api.admin_model(View(), Request())).status == 404
    api, _, _ = make_api(tmp_path, ADVREC_ADMIN_TOKEN="s3cret")
    wrong = await api.admin_rollback(View(), Request(headers={"Authorization": "Bearer no"}))
    assert wrong.status == 401 and wrong.headers == {"WWW-Authenticate": "Bearer"}
    assert api.sa.feed.rollbacks == []


async def test_admin_rollback_pins_only_a_version_the_cache_holds(tmp_path: Path) -> None:
    api, _, _ = make_api(tmp_path, ADVREC_ADMIN_TOKEN="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    refused = await api.admin_rollback(View(), Request({"version": "../etc"}, auth))
    assert refused.status == 409 and api.sa.feed.rollbacks == []
    done = await api.admin_rollback(View(), Request({"version": "v1"}, auth))
    assert done.status == 200 and done.body == {"rolled_back_to": "v1", "pinned": "v1"}
    assert api.sa.feed.rollbacks == [("v1", "admin@127.0.0.1:6066 from 10.0.0.9")]
    pin = await api.admin_pin(View(), Request(headers=auth))
    assert pin.body["pinned"] == "v1"


async def test_readyz_is_503_until_the_bundle_topic_was_read(tmp_path: Path) -> None:
    api, _, _ = make_api(tmp_path)
    assert (await api.readyz(View(), Request())).status == 503
    api.sa.feed.ready.set()
    got = await api.readyz(View(), Request())
    assert got.status == 200 and got.body["published_version"] == "v2"
    await api.sa.server.stop()


async def test_admin_model_says_how_the_live_model_ranks(tmp_path: Path) -> None:
    from stream_app.retrieval import IndexConfig
    from tests.bundles import toy_two_stage

    auth = Request(headers={"Authorization": "Bearer s3cret"})
    api, _, _ = make_api(tmp_path, ADVREC_ADMIN_TOKEN="s3cret")
    live = (await api.admin_model(View(), auth)).body["live"]
    assert live["path"] == "exact" and live["index_build_seconds"] is None
    version = publish_toy(tmp_path, VOCAB, two_stage=toy_two_stage(len(VOCAB)))
    api.sa.server.swap(load_model(tmp_path, version, index=IndexConfig(min_items=0)))
    live = (await api.admin_model(View(), auth)).body["live"]
    assert live["path"] == "two_stage" and live["index_build_seconds"] >= 0
