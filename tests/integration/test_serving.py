"""Serving against the real broker: recommendations follow clicks, swaps drop nothing."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from advrec.bundle import write_bundle
from advrec.contract import ClickEvent, encode_event, encode_key
from advrec.suspicion import Behaviour, behaviour_features
from tests.bundles import (
    TOY_DETECTOR_META,
    publish_dir,
    publish_toy_to_topic,
    toy_detector,
    toy_model,
)
from tests.integration.conftest import Names, Worker, send, wait_for

pytestmark = pytest.mark.kafka

VOCAB = [f"i{n}" for n in range(200)]
NOW = int(time.time() * 1000)


def click(user: str, item: str, n: int) -> tuple[bytes, bytes]:
    e = ClickEvent(user=user, item=item, ts=NOW - 100_000 + n, id=f"{user}-{n}")
    return encode_key(user), encode_event(e)


def recommend(worker: Worker, user: str, k: int = 10) -> dict:
    r = httpx.get(f"{worker.url}/recommendations/{user}", params={"k": k}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def serving(kafka: str, tmp_path_factory: pytest.TempPathFactory):
    """One worker for the module (start-up is the slow part); tests run in file order."""
    tmp = tmp_path_factory.mktemp("serving")
    names = Names()
    first = publish_toy_to_topic(kafka, names.bundles, VOCAB, seed=0)
    worker = Worker(names, tmp, extra_env={"ADVREC_READY_WITHOUT_MODEL": "0",
                                           "ADVREC_ADMIN_TOKEN": "let-me-in"})
    worker.start()
    try:
        worker.wait_ready()
        yield worker, names, kafka, first
    finally:
        worker.stop()


def live_version(worker: Worker) -> str:
    return httpx.get(f"{worker.url}/readyz", timeout=5).json()["model_version"]


def test_clicks_change_recommendations_and_seen_items_never_return(serving) -> None:
    worker, names, _bundles, first = serving
    send(names.clicks, [click("alice", "i1", 0), click("alice", "i2", 1)])
    wait_for(lambda: httpx.get(f"{worker.url}/users/alice").status_code == 200, 60,
             "alice's clicks applied")
    before = recommend(worker, "alice")
    assert before["fallback"] is False and before["model_version"] == first
    assert not {"i1", "i2"} & set(before["items"])
    send(names.clicks, [click("alice", f"i{n}", n) for n in range(10, 40)])
    wait_for(lambda: httpx.get(f"{worker.url}/users/alice").json()["count"] == 32, 60,
             "more clicks applied")
    after = recommend(worker, "alice", k=50)
    seen = {"i1", "i2", *(f"i{n}" for n in range(10, 40))}
    assert not seen & set(after["items"]) and len(after["items"]) == 50
    assert after["items"][:10] != before["items"]


def test_an_unknown_user_gets_the_trending_fallback(serving) -> None:
    worker, names, _bundles, _first = serving
    send(names.clicks, [click(f"fan{n}", "i7", n) for n in range(20)])
    wait_for(lambda: recommend(worker, "stranger")["items"][:1] == ["i7"], 30,
             "trending list refreshed")
    answer = recommend(worker, "stranger")
    assert answer["fallback"] is True and answer["fallback_cause"] == "no_history"


@pytest.mark.parametrize(("k", "status"), [("0", 400), ("201", 400), ("ten", 400)])
def test_bad_k_gets_a_400_with_a_message(serving, k: str, status: int) -> None:
    worker = serving[0]
    r = httpx.get(f"{worker.url}/recommendations/alice", params={"k": k}, timeout=5)
    assert r.status_code == status and "k must" in r.json()["error"]


def test_too_long_user_id_gets_a_400(serving) -> None:
    worker = serving[0]
    r = httpx.get(f"{worker.url}/recommendations/{'x' * 129}", timeout=5)
    assert r.status_code == 400


def test_fifty_swaps_under_sixteen_clients_fail_no_request(serving) -> None:
    worker, names, kafka, first = serving
    send(names.clicks, [click(f"user{n}", f"i{n % 150}", n) for n in range(64)])
    wait_for(lambda: httpx.get(f"{worker.url}/users/user63").status_code == 200, 60,
             "users known")
    published = {first}
    log: list[tuple[float, float, str | None, int]] = []
    stop = asyncio.Event()

    async def client(n: int) -> None:
        async with httpx.AsyncClient(base_url=worker.url, timeout=10) as http:
            i = 0
            while not stop.is_set():
                started = time.monotonic()
                r = await http.get(f"/recommendations/user{(n * 4 + i) % 64}?k=10")
                body = r.json() if r.status_code == 200 else {}
                log.append((started, time.monotonic(), body.get("model_version"),
                            r.status_code))
                i += 1

    swaps_before = worker.metric("advrec_model_swaps_total")

    async def swapper() -> None:
        async with httpx.AsyncClient(base_url=worker.url, timeout=10) as http:
            for seed in range(1, 51):
                version = await asyncio.to_thread(publish_toy_to_topic, kafka, names.bundles,
                                                  VOCAB, seed=seed, stale=5)
                published.add(version)
                # the next bundle only once this one is live: 50 real swaps, at any speed
                for _ in range(600):
                    if (await http.get("/readyz")).json()["model_version"] == version:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"bundle {version} never went live")
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        stop.set()

    async def run() -> None:
        await asyncio.gather(swapper(), *(client(n) for n in range(16)))

    asyncio.run(run())
    assert len(log) > 500
    failed = [entry for entry in log if entry[3] != 200]
    assert not failed, f"{len(failed)} failed requests, e.g. {failed[:3]}"
    assert {v for *_, v, _ in log} <= published
    # once a response with version V has completed, no later-started request sees older
    done = sorted(log, key=lambda e: e[1])
    newest, j = "", 0
    for started, _end, version, _ in sorted(log):
        while j < len(done) and done[j][1] < started:
            newest = max(newest, done[j][2] or "")
            j += 1
        assert (version or "") >= newest, (version, newest)
    assert worker.metric("advrec_model_swaps_total") - swaps_before == 50


def _truncated_at_publish(root: Path) -> str:
    """A publisher that wrote half the model and checksummed what it wrote."""
    whole = toy_model(len(VOCAB), seed=98)
    return write_bundle(root, whole[: len(whole) // 2], VOCAB, {"max_len": 10},
                        make_current=False, keep=100)


def _damaged_before_publish(damage: Callable[[Path], None],
                            **toy: object) -> Callable[[Path], str]:
    """A bundle damaged between export and publish: the bundle topic carries it intact
    (its chunks and manifest agree), so only the bundle's own checks can refuse it."""
    def make(root: Path) -> str:
        version = write_bundle(root, toy_model(len(VOCAB), seed=97, **toy), VOCAB,  # type: ignore[arg-type]
                               {"max_len": 10}, make_current=False, keep=100)
        damage(root / version)
        return version
    return make


def _no_damage(_d: Path) -> None:
    return None


BAD_BUNDLES = {
    "truncated at publish": (_truncated_at_publish, "load_error"),
    "truncated model": (_damaged_before_publish(
        lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:100])),
        "checksum_mismatch"),
    "wrong checksum": (_damaged_before_publish(lambda d: (d / "meta.json").write_text(
        (d / "meta.json").read_text().replace('"model_sha256": "', '"model_sha256": "0'))),
        "checksum_mismatch"),
    "NaN weights": (_damaged_before_publish(_no_damage, nan=True), "nan_output"),
    "wrong input name": (_damaged_before_publish(_no_damage, input_name="tokens"),
                         "bad_signature"),
    "vocabulary mismatch": (_damaged_before_publish(_no_damage, extra_cols=3),
                            "vocab_mismatch"),
    "no meta.json": (_damaged_before_publish(lambda d: (d / "meta.json").unlink()),
                     "missing_meta"),
}


@pytest.mark.parametrize("fault", list(BAD_BUNDLES))
def test_a_bad_bundle_is_rejected_with_its_reason_and_the_old_one_keeps_answering(
        serving, tmp_path: Path, fault: str) -> None:
    worker, names, kafka, _first = serving
    send(names.clicks, [click("bob", "i3", 0)])
    wait_for(lambda: httpx.get(f"{worker.url}/users/bob").status_code == 200, 60, "bob")
    live = live_version(worker)
    make, reason = BAD_BUNDLES[fault]
    counted = worker.metric("advrec_bundles_rejected_total", f'reason="{reason}"')
    bad = make(tmp_path)
    publish_dir(kafka, names.bundles, tmp_path, bad)
    wait_for(lambda: worker.metric("advrec_bundles_rejected_total", f'reason="{reason}"')
             >= counted + 1, 30, f"rejection of the {fault} bundle")
    assert recommend(worker, "bob")["model_version"] == live
    ready = httpx.get(f"{worker.url}/readyz").json()
    assert ready["rejected"][bad] == reason
    assert ready["model_version"] == live


def test_admin_needs_the_bearer_token_and_rollback_works(serving) -> None:
    worker, names, kafka, _first = serving
    first = publish_toy_to_topic(kafka, names.bundles, VOCAB, seed=100)
    wait_for(lambda: live_version(worker) == first, 30, "a good bundle live")
    second = publish_toy_to_topic(kafka, names.bundles, VOCAB, seed=101)
    wait_for(lambda: httpx.get(f"{worker.url}/readyz").json()["model_version"] == second, 30,
             "second bundle live")
    url = f"{worker.url}/admin/rollback"
    assert httpx.post(url).status_code == 401
    assert httpx.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{worker.url}/admin/model").status_code == 401
    r = httpx.post(url, headers={"Authorization": "Bearer let-me-in"}, timeout=30)
    assert r.status_code == 200 and r.json()["rolled_back_to"] == first
    status = httpx.get(f"{worker.url}/admin/model",
                       headers={"Authorization": "Bearer let-me-in"}).json()
    assert status["live"]["version"] == first and status["current_pointer"] == second
    assert status["pin"]["version"] == first  # the whole fleet is held on it
    assert httpx.delete(f"{worker.url}/admin/pin", timeout=30).status_code == 401
    r = httpx.delete(f"{worker.url}/admin/pin", timeout=30,
                     headers={"Authorization": "Bearer let-me-in"})
    assert r.status_code == 200 and r.json() == {"pinned": None, "released": True,
                                                 "current_pointer": second}
    assert live_version(worker) == second
    assert "let-me-in" not in httpx.get(f"{worker.url}/metrics").text
    assert "let-me-in" not in worker.log_text()  # settings are logged with secrets hidden
    assert "admin_token" in worker.log_text()  # ... and they were logged


def test_a_bundle_with_a_detector_scores_users_as_their_clicks_arrive(serving) -> None:
    worker, names, kafka, _first = serving
    version = publish_toy_to_topic(kafka, names.bundles, VOCAB, seed=102,
                                   detector=toy_detector())
    wait_for(lambda: live_version(worker) == version, 30, "the bundle with a detector live")
    send(names.clicks, [click("suspect", f"i{n}", n) for n in range(2)])
    wait_for(lambda: httpx.get(f"{worker.url}/users/suspect").status_code == 200, 60,
             "two clicks applied")
    assert httpx.get(f"{worker.url}/users/suspect").json()["suspicion"] is None  # < 3 clicks
    send(names.clicks, [click("suspect", f"i{n}", n) for n in range(2, 6)])
    wait_for(lambda: httpx.get(f"{worker.url}/users/suspect").json()["count"] == 6, 60,
             "six clicks applied")
    body = httpx.get(f"{worker.url}/users/suspect").json()
    # the toy detector's P(fake): a sigmoid of the summed behaviour features of six clicks
    # 1 ms apart (advrec.suspicion), computed here from the same events
    b = Behaviour()
    for n in range(6):
        b.update(NOW - 100_000 + n)
    want = 1 / (1 + math.exp(-sum(behaviour_features(b))))
    assert body["suspicion"]["detector_rounds"] == TOY_DETECTOR_META["rounds"]
    assert abs(body["suspicion"]["p_fake"] - want) < 1e-5, (body, want)
    metrics = httpx.get(f"{worker.url}/metrics").text
    scored = [float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("advrec_user_suspicion_count ")]
    assert scored and scored[0] >= 1, scored


def test_a_delta_over_the_topic_is_rebuilt_from_the_bundle_before_it_and_served(
        serving, tmp_path: Path) -> None:
    import io

    import numpy as np

    from advrec.bundle import TWO_STAGE_ITEMS, bundle_files, delta_files
    from tests.bundles import publish_files, toy_two_stage

    worker, names, kafka, _first = serving
    stamp = int(time.time() * 1000)
    full, delta = f"{stamp + 50_000:013d}", f"{stamp + 50_001:013d}"
    meta = {"max_len": 10, "last_event_ms": 0, "examples_seen": 0, "metrics": {}}
    parts = toy_two_stage(len(VOCAB), seed=7)
    write_bundle(tmp_path, toy_model(len(VOCAB), seed=7), VOCAB, {**meta, "version": full},
                 two_stage=parts)
    publish_files(kafka, names.bundles, full, bundle_files(tmp_path, full))
    wait_for(lambda: live_version(worker) == full, 30, "the full bundle live")
    # the delta: one item more, whose vector follows i5's, ten times over
    old = np.load(io.BytesIO(parts[TWO_STAGE_ITEMS]))
    new = np.concatenate([old, 10 * old[6:7]])  # row 6 is i5
    vocab = [*VOCAB, "fresh-1"]
    buf = io.BytesIO()
    np.save(buf, new)
    grown = toy_two_stage(len(vocab), seed=7)  # user.onnx and rescore.onnx for V+1 rows
    write_bundle(tmp_path, None, vocab, {**meta, "version": delta},
                 two_stage={**grown, TWO_STAGE_ITEMS: buf.getvalue()},
                 delta=(full, delta_files(old, VOCAB, new, vocab)))
    sent = bundle_files(tmp_path, delta)
    assert "items.npy" not in {name for name, _ in sent}  # the rows travel, not the table
    publish_files(kafka, names.bundles, delta, sent)
    wait_for(lambda: live_version(worker) == delta, 60, "the delta rebuilt and live")
    assert worker.metric("advrec_bundle_deltas_total") >= 1
    send(names.clicks, [click("dana", "i5", 0)])
    wait_for(lambda: httpx.get(f"{worker.url}/users/dana").status_code == 200, 60,
             "dana's click applied")
    body = recommend(worker, "dana")
    assert body["model_version"] == delta and body["items"][0] == "fresh-1"
