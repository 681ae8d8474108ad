"""The per-user suspicion score, kept with the user's state and updated as events arrive.

Each bundle the trainer publishes with its fake-user detector on carries ``detector.onnx``
(trainer/detector.py), checked at load like the generator. After an ingest batch is applied,
every user it changed who has at least the detector's ``min_clicks`` clicks is scored in one
onnxruntime call: the user's history (encoded as for ranking) and behaviour counters
(advrec.suspicion) -> P(fake), written into the user's state with the detector's version.

The worker only shows the score (``GET /users/{user}``, ``advrec_user_suspicion``); the
trainer's detector, which sees every example, decides what is not trained on and publishes
its flags (stream_app/flags.py). The two agree as far as the bundle is fresh: the bundle's
detector is the trainer's as of its export.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from stream_app.metrics import StreamMetrics
from stream_app.serving import ModelServer
from stream_app.state import UserState

__all__ = ["DEFAULT_MIN_CLICKS", "score_users"]

log = logging.getLogger(__name__)

DEFAULT_MIN_CLICKS = 8  # when a bundle's meta does not say (trainer.detector.DetectorConfig)


def score_users(server: ModelServer, metrics: StreamMetrics, states: Sequence[UserState]
                ) -> int:
    """Score ``states`` with the live model's detector, in place; return how many were
    scored (0 without a live model with a detector). Never raises: a failed call is logged
    and the states keep their previous score."""
    model = server.current
    if model is None or model.detector is None or not states:
        return 0
    meta = model.detector_meta
    min_clicks = int(meta.get("min_clicks", DEFAULT_MIN_CLICKS))
    due = [st for st in states if st.behaviour.clicks >= min_clicks]
    if not due:
        return 0
    started = time.perf_counter()
    try:
        p_fake = model.suspicion([st.history for st in due], [st.behaviour for st in due])
    except Exception:
        log.exception("the detector of bundle %s failed on %d users; scores not updated",
                      model.version, len(due))
        return 0
    rounds = int(meta.get("rounds", 0))
    for st, p in zip(due, p_fake.tolist(), strict=True):
        st.suspicion, st.suspicion_rounds = p, rounds
        metrics.user_suspicion.observe(p)
    metrics.suspicion_seconds.observe(time.perf_counter() - started)
    return len(due)
