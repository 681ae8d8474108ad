"""Live: a poisoning attack replayed into a running worker and trainer (real broker, real
processes) gets its fake users flagged and their examples filtered; real users still train;
an admin lists the flags and re-admits a user, whose next examples train again."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from advrec.attacks import AttackConfig, inject
from advrec.contract import ClickEvent, encode_event, encode_key
from advrec.synthetic import SyntheticConfig, synthetic_events
from tests.integration.conftest import Names, TrainerProcess, Worker, send, wait_for

TOKEN = "trust-and-safety"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_an_attack_is_flagged_filtered_listed_and_a_readmitted_user_trains_again(
        kafka: str, names: Names, tmp_path: Path, workers) -> None:
    worker = Worker(names, tmp_path, extra_env={
        "ADVREC_ADMIN_TOKEN": TOKEN, "ADVREC_TRAIN_BATCH_SIZE": "256",
        "ADVREC_TRAIN_BATCH_S": "1.0"})
    workers.append(worker)
    worker.start().wait_ready()
    trainer = TrainerProcess(names, tmp_path, bundle_dir=tmp_path / "trainer-bundles",
                             extra_env={"ADVREC_TRAINER_DETECTOR": "1",
                                        "ADVREC_TRAINER_MODE": "none",
                                        "ADVREC_TRAINER_DIM": "16",
                                        "ADVREC_TRAINER_LAYERS": "1",
                                        "ADVREC_TRAINER_STEPS_PER_BATCH": "1",
                                        "ADVREC_EXPORT_EVERY_S": "3",
                                        # one batch a step, as a trainer that keeps up: the
                                        # detector's rounds come every 10 batches
                                        "ADVREC_SHED_TARGET_LAG_S": "600",
                                        "ADVREC_SHED_SKIP_LAG_S": "0"})
    trainer.start()
    try:
        now = int(time.time() * 1000)
        cfg = SyntheticConfig(n_users=300, n_items=200, seed=3, start_ms=now - 6 * 3_600_000)
        # ~80 batches of 256: the detector's rounds come every 10, its first 3 are a warm-up
        # and a flag takes 2 rounds in a row, so the attack (batches ~35-44) leaves 3 or 4
        # rounds after it, however the worker happens to cut the batches
        events = list(synthetic_events(cfg, 20000))
        stream, labels = inject(events, AttackConfig(kind="random", budget=0.05, filler=20,
                                                     start=0.45, end=0.55, seed=1))
        fake = set(labels.fake_users)
        send(names.clicks, [(encode_key(e.user), encode_event(e)) for e in stream])
        real_events = len(stream) - labels.n_events

        # the trainer flags; every worker lists the flags from the flags topic
        def listed() -> dict:
            r = httpx.get(f"{worker.url}/admin/flagged", headers=AUTH, timeout=5)
            assert r.status_code == 200, r.text
            return r.json()

        try:
            wait_for(lambda: listed()["count"] >= len(fake) // 2, 240,
                     f"at least {len(fake) // 2} users flagged", interval=2)
        except AssertionError as exc:  # say what the detector did
            said = [line for line in trainer.log_text().splitlines() if "detector" in line]
            raise AssertionError("\n".join([str(exc), *said[-20:]])) from None
        wait_for(lambda: trainer.metric("advrec_trainer_examples_total")
                 + trainer.metric("advrec_trainer_filtered_examples_total")
                 >= 0.95 * len(stream) - 2 * 256, 240, "the stream trained through", interval=2)
        body = listed()
        users = {u["user"]: u for u in body["users"]}
        caught = set(users) & fake
        assert len(caught) >= len(fake) // 2  # most of the attack is caught...
        assert len(set(users) - fake) <= len(caught)  # ...and more fakes than real users
        first = body["users"][0]
        assert first["p_fake"] >= 0.5 and first["reasons"] and first["by"]
        # a flag says how many high scorers push one item with the user (3 at least)
        assert first["reasons"][-1]["feature"] == "company"
        assert first["reasons"][-1]["term"] >= 3
        # their examples were filtered; real users' examples still trained
        filtered = trainer.metric("advrec_trainer_filtered_examples_total")
        assert filtered > 0
        assert trainer.metric("advrec_trainer_examples_total") >= 0.8 * real_events
        assert trainer.metric("advrec_trainer_flagged_users") >= len(users)
        assert worker.metric("advrec_flagged_users") == body["count"]
        # the detector travels in the bundles that the worker accepted
        model = httpx.get(f"{worker.url}/admin/model", headers=AUTH, timeout=5).json()
        wait_for(lambda: "detector" in (httpx.get(f"{worker.url}/admin/model", headers=AUTH,
                                                  timeout=5).json()["live"] or {}).get("meta",
                                                                                     {}),
                 60, "a live bundle that carries the detector", interval=1)
        assert model["live"] is not None

        # re-admission: only with the token, only a flagged user
        user = sorted(caught)[0]
        url = f"{worker.url}/admin/flagged/{user}/readmit"
        assert httpx.post(url, timeout=5).status_code == 401
        assert httpx.post(f"{worker.url}/admin/flagged/nobody/readmit", headers=AUTH,
                          timeout=5).status_code == 404
        r = httpx.post(url, headers=AUTH, params={"note": "test"}, timeout=5)
        assert r.status_code == 200, r.text
        assert r.json()["readmitted"]["state"] == "readmitted"
        assert user not in {u["user"] for u in listed()["users"]}
        wait_for(lambda: f"user {user} re-admitted" in trainer.log_text(), 60,
                 "the trainer to read the re-admission", interval=1)
        # the user's next examples train: the filtered count stays where it was
        before = trainer.metric("advrec_trainer_filtered_examples_total")
        trained = trainer.metric("advrec_trainer_examples_total")
        last = max(e.ts for e in stream)
        send(names.clicks, [(encode_key(user), encode_event(
            ClickEvent(user, f"i{k}", last + 1000 * (k + 1), id=f"{user}-after-{k}")))
            for k in range(10)])
        wait_for(lambda: trainer.metric("advrec_trainer_examples_total") >= trained + 10, 60,
                 "the re-admitted user's examples trained", interval=1)
        assert trainer.metric("advrec_trainer_filtered_examples_total") == before
    finally:
        trainer.stop()
