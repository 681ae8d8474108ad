"""ONNX serving: verified sessions, provider checks, micro-batched inference off the loop."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from advrec.bundle import (
    DELTA_VOCAB,
    DETECTOR_INPUTS,
    DETECTOR_OUTPUTS,
    INPUT_NAME,
    META_FILE,
    OUTPUT_NAME,
    Bundle,
    BundleError,
    appended_items,
    delta_base,
    load_bundle,
)
from advrec.encoding import exclusion_rows, known_rows, model_input
from advrec.suspicion import BEHAVIOUR_FEATURES, FEATURES, Behaviour, behaviour_matrix
from advrec.types import ItemId
from stream_app.retrieval import IndexConfig, TwoStage, build_two_stage

__all__ = [
    "LoadedModel", "ModelServer", "ModelTimeout", "cpu_limit", "intra_op_threads", "load_model",
    "ranking_graph", "select_providers",
]

log = logging.getLogger(__name__)


def cpu_limit() -> int:
    """Return the CPUs this process may use: the cgroup quota if set, else the affinity mask."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return max(1, int(float(quota) / float(period)))
    except (OSError, ValueError):
        pass
    return max(1, len(os.sched_getaffinity(0)))


def intra_op_threads(cpus: int) -> int:
    """Return onnxruntime's intra-op thread count for ``cpus`` CPUs: one core is left to the
    event loop, which has a request's other half of the work.

    On 2 cores one thread beat two at every load measured: with a training run on the other
    core, at micro-batches of ~15, two threads were no faster per call and cost 160 vs 125 us
    of CPU per request, at single requests 645 vs 414 us (threads that sleep between ops are
    woken for every op); idle, 153 vs 137 us at c=32 (bench/serve's CPU split).
    """
    return max(1, cpus - 1)


def select_providers(wanted: str) -> list[str]:
    """Return the execution providers to ask for, filtered by what this build offers."""
    available = ort.get_available_providers()
    if wanted == "cpu":
        return ["CPUExecutionProvider"]
    chosen = []
    if "CUDAExecutionProvider" in available and wanted in ("auto", "cuda", "cuda,cpu"):
        chosen.append("CUDAExecutionProvider")
    chosen.append("CPUExecutionProvider")
    return chosen


# The served graph: the bundle's generator with exclusion and top-k appended, so one
# onnxruntime call returns the ranked rows (no [B, V+1] score matrix crosses into Python).
# a score at or below this is no item: the model scores padding and the rows a bounded
# vocabulary freed NEG (-1e9, trainer/model.py); real scores are logits, far above it
SCORE_FLOOR = -1e8
EXCLUDE_NAME = "exclude"  # int64 [B, S]: rows never to recommend (seen items), padded with 0
K_NAME = "k"  # int64 [1]: how many rows to return
TOP_SCORES = "top_scores"  # float32 [B, k], best first; -inf where fewer than k rows remain
TOP_ROWS = "top_rows"  # int64 [B, k]


def ranking_graph(model: onnx.ModelProto) -> bytes:
    """Return ``model`` (history -> scores) extended to (history, exclude, k) -> top k.

    The excluded rows and column 0 (padding) are set to -inf before ``TopK``, which is why
    an ``exclude`` row is padded with 0. ``scores`` stays an output for the warm-up checks.
    """
    ranked = onnx.ModelProto()
    ranked.CopyFrom(model)
    g = ranked.graph
    g.input.extend([
        helper.make_tensor_value_info(EXCLUDE_NAME, TensorProto.INT64, ["batch", "n_exclude"]),
        helper.make_tensor_value_info(K_NAME, TensorProto.INT64, [1]),
    ])
    minus_inf = helper.make_tensor("minus_inf", TensorProto.FLOAT, [1], [-np.inf])
    g.node.extend([
        helper.make_node("Shape", [EXCLUDE_NAME], ["_exclude_shape"]),  # (2,)
        helper.make_node("ConstantOfShape", ["_exclude_shape"], ["_minus_inf"],
                         value=minus_inf),  # (B, S)
        helper.make_node("ScatterElements", [OUTPUT_NAME, EXCLUDE_NAME, "_minus_inf"],
                         ["_allowed_scores"], axis=1),  # (B, V+1)
        helper.make_node("TopK", ["_allowed_scores", K_NAME], [TOP_SCORES, TOP_ROWS],
                         axis=1, largest=1, sorted=1),  # (B, k) each
    ])
    g.output.extend([
        helper.make_tensor_value_info(TOP_SCORES, TensorProto.FLOAT, ["batch", "k"]),
        helper.make_tensor_value_info(TOP_ROWS, TensorProto.INT64, ["batch", "k"]),
    ])
    if not any(o.domain in ("", "ai.onnx") and o.version >= 11 for o in ranked.opset_import):
        raise BundleError("bad_signature", "the model's opset is older than 11 (ScatterElements)")
    return ranked.SerializeToString()


@dataclass
class LoadedModel:
    """A verified bundle with a warmed onnxruntime session of its ranking graph, or, for a
    large catalogue, its two-stage parts and their index (stream_app/retrieval.py)."""

    bundle: Bundle
    session: ort.InferenceSession | None  # the exact ranking graph; None when two-stage
    providers: list[str]
    # external id -> row (1-based). Models of a chain of deltas that only add items share
    # one map (``_grown_vocabulary``): a model reads only its own rows, 1..V
    index: dict[ItemId, int]
    loaded_at: float
    load_seconds: float
    # the bundle's fake-user detector (detector.onnx), checked at load; None without one
    detector: ort.InferenceSession | None = None
    two_stage: TwoStage | None = None  # the index and rescorer, when ranking in two stages

    @property
    def path(self) -> str:
        """How requests are ranked: ``exact`` (every item scored) or ``two_stage``."""
        return "exact" if self.two_stage is None else "two_stage"

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def max_len(self) -> int:
        return self.bundle.max_len

    def known_rows(self, history: list[ItemId]) -> list[int]:
        """Return the rows of the items of ``history`` the model knows, oldest first."""
        return known_rows(self.index, history, len(self.bundle.vocab))

    def encode(self, history: list[ItemId]) -> np.ndarray:
        """Return the left-padded row indices of the last ``max_len`` known items."""
        return self.prepare([self.known_rows(history)])[0][0]

    def prepare(self, known: list[list[int]], excluded: list[list[int]] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Return the model input [B, L] and the rows to exclude [B, S] for the known rows of
        B histories: the last ``max_len`` are the input (left-padded with 0), as the trainer
        encodes them (``advrec.encoding``); ``excluded`` rows (default: all of ``known``)
        leave the lists (0-padded).
        """
        return (model_input(known, self.max_len),
                exclusion_rows(known if excluded is None else excluded))  # (B, L), (B, S)

    @property
    def detector_meta(self) -> dict[str, Any]:
        """What the bundle's meta says of its detector (threshold, min_clicks, rounds)."""
        meta = self.bundle.meta.get("detector")
        return meta if isinstance(meta, dict) else {}

    def suspicion(self, histories: list[list[ItemId]], behaviours: list[Behaviour]
                  ) -> np.ndarray:
        """P(fake) [B] of B users from the bundle's detector (one onnxruntime call; the
        history is encoded as for ranking, the counters as the trainer encodes them)."""
        assert self.detector is not None, "the bundle has no detector"
        items = model_input([self.known_rows(h) for h in histories], self.max_len)  # (B, L)
        feed = dict(zip(DETECTOR_INPUTS, (items, behaviour_matrix(behaviours)), strict=True))
        p_fake, _ = self.detector.run(list(DETECTOR_OUTPUTS), feed)  # (B,), (B, F)
        return p_fake

    def rank(self, model_in: np.ndarray, exclude: np.ndarray,
             k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-``k`` (scores, rows) [B, k] each, best first: one onnxruntime call of the
        exact graph, or the two-stage path (index search, then the rescorer's call)."""
        if self.two_stage is not None:
            return self.two_stage.rank(model_in, exclude, k)
        scores, rows = self.session.run(
            [TOP_SCORES, TOP_ROWS],
            {INPUT_NAME: model_in, EXCLUDE_NAME: exclude, K_NAME: np.array([k], np.int64)})
        return scores, rows

    def top_k(self, ks: list[int]) -> int:
        """The ``k`` of a batch's one model call: the largest asked, at most the vocabulary."""
        return min(max(ks), len(self.bundle.vocab))

    @staticmethod
    def picked(scores: np.ndarray, rows: np.ndarray, ks: list[int]) -> list[list[int]]:
        """Cut each row of a ``rank`` result to its own ``k``, dropping excluded rows."""
        # (B,): excluded rows (-inf) and freed ones (the model's NEG, -1e9) sort last
        finite = (scores > SCORE_FLOOR).sum(axis=1).tolist()
        return [r[:min(k, n)] for r, k, n in zip(rows.tolist(), ks, finite, strict=True)]

    def recommend_batch(self, histories: list[list[ItemId]], ks: list[int]) -> list[list[int]]:
        """Return the top-k rows for each history, every known history item excluded.

        Blocking: one ``rank`` call for the whole batch.
        """
        k = self.top_k(ks)
        if k <= 0:
            return [[] for _ in ks]
        model_in, exclude = self.prepare([self.known_rows(h) for h in histories])
        return self.picked(*self.rank(model_in, exclude, k), ks)


def _check_signature(model: onnx.ModelProto, version: str, n_cols: int) -> None:
    """Raise unless the graph is history int64 [B, L] -> scores [B, V+1] (V from the vocab)."""
    inputs, outputs = model.graph.input, model.graph.output
    dims = [d.dim_value or None for d in inputs[0].type.tensor_type.shape.dim] if inputs else []
    if ([i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]
            or inputs[0].type.tensor_type.elem_type != TensorProto.INT64 or len(dims) != 2):
        raise BundleError("bad_signature",
                          f"{version}: expected {INPUT_NAME}[B, L] int64 -> {OUTPUT_NAME}[B, V+1]")
    out_dims = [d.dim_value or None for d in outputs[0].type.tensor_type.shape.dim]
    if len(out_dims) == 2 and out_dims[1] is not None and out_dims[1] != n_cols:
        raise BundleError("vocab_mismatch", f"{version}: model scores {out_dims[1]} columns, "
                                            f"vocabulary needs {n_cols}")


def _check_detector(data: bytes, probe: np.ndarray, version: str) -> ort.InferenceSession:
    """The bundle's fake-user detector must load and give each probe user a finite P(fake)
    in [0, 1] and one finite term per feature, or the whole bundle is refused: what the
    trainer flags with must be what an operator can replay. Return its session (one
    thread: it scores users at ingest, on the event loop's core)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(data, sess_options=opts,
                                       providers=["CPUExecutionProvider"])
        behaviour = np.zeros((len(probe), len(BEHAVIOUR_FEATURES)), dtype=np.float32)
        p_fake, terms = session.run(list(DETECTOR_OUTPUTS),
                                    dict(zip(DETECTOR_INPUTS, (probe, behaviour), strict=True)))
    except Exception as exc:
        raise BundleError("bad_detector", f"{version}: detector: {exc}"[:500]) from None
    if p_fake.shape != (len(probe),) or terms.shape != (len(probe), len(FEATURES)):
        raise BundleError("bad_detector", f"{version}: detector gives shapes {p_fake.shape}, "
                                          f"{terms.shape} for {len(probe)} users")
    if not (np.isfinite(p_fake).all() and np.isfinite(terms).all()
            and ((p_fake >= 0) & (p_fake <= 1)).all()):
        raise BundleError("bad_detector", f"{version}: detector scores are not finite P(fake)")
    return session


def _exact_session(bundle: Bundle, threads: int, providers: str,
                   probe: np.ndarray) -> ort.InferenceSession:
    """Build the exact ranking graph's session and warm it up with ``probe`` [2, L]."""
    version, n_cols = bundle.version, len(bundle.vocab) + 1
    try:
        model = onnx.load_from_string(bundle.model_bytes)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise BundleError("load_error", f"{version}: not an ONNX model: {exc}"[:500]) from None
    _check_signature(model, version, n_cols)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning intra-op threads burn the cores the event loop needs between model calls
    # (2-core machine: the /recommendations rate roughly doubled without it).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(ranking_graph(model), sess_options=opts,
                                       providers=select_providers(providers))
    except BundleError:
        raise
    except Exception as exc:  # onnxruntime raises its own untyped errors on bad graphs
        raise BundleError("load_error", f"{version}: {exc}"[:500]) from None
    # Warm-up doubles as a health check: both an empty and a full history must give finite
    # scores over exactly V+1 columns (NaN weights or a wrong vocabulary show up here).
    feed = {INPUT_NAME: probe, EXCLUDE_NAME: np.zeros((2, 1), dtype=np.int64),
            K_NAME: np.array([1], dtype=np.int64)}
    try:
        scores, _ = session.run([OUTPUT_NAME, TOP_ROWS], feed)
    except Exception as exc:
        raise BundleError("load_error", f"{version}: warm-up failed: {exc}"[:500]) from None
    if scores.shape != (2, n_cols):
        raise BundleError("vocab_mismatch",
                          f"{version}: scores shape {scores.shape}, vocabulary needs {n_cols}")
    if not np.isfinite(scores[:, 1:]).all():
        raise BundleError("nan_output", f"{version}: warm-up scores are not finite")
    return session


def _two_stage(bundle: Bundle, threads: int, providers: str, config: IndexConfig,
               probe: np.ndarray, previous: TwoStage | None = None,
               holes: np.ndarray | None = None) -> TwoStage:
    """Load the bundle's two-stage parts, build their index (or refresh ``previous``'s),
    and rank ``probe`` [2, L] with them: finite scores of known rows, or the bundle is
    refused. ``holes``: the vocabulary's freed rows, if known already."""
    assert bundle.two_stage is not None
    n_items = len(bundle.vocab)
    if holes is None:
        holes = np.array([row for row, item in enumerate(bundle.vocab, start=1)
                          if item is None], dtype=np.int64)
    two_stage = build_two_stage(bundle.two_stage, n_items, config, threads=threads,
                                providers=select_providers(providers),
                                version=bundle.version, holes=holes, previous=previous)
    try:
        scores, rows = two_stage.rank(probe, np.zeros((2, 1), dtype=np.int64),
                                      min(10, n_items))
    except Exception as exc:
        raise BundleError("bad_index", f"{bundle.version}: two-stage warm-up failed: "
                                       f"{exc}"[:500]) from None
    if not (np.isfinite(scores[rows > 0]).all() and (rows[:, 0] > 0).all()
            and (rows <= n_items).all()):
        raise BundleError("nan_output", f"{bundle.version}: two-stage warm-up gave no finite "
                                        "scores of known rows")
    return two_stage


def _two_stage_wanted(path: Path, index: IndexConfig | None) -> bool:
    """Whether the bundle at ``path`` is ranked in two stages: its meta names the parts and
    a catalogue of ``index.min_items`` items or more, or it has no exact graph (a delta);
    False on any doubt (``load_bundle`` then says what is wrong)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        if not meta.get("two_stage"):
            return False
        if meta["model_sha256"] is None:
            if index is None:
                raise BundleError("missing_model", f"{path.name} is ranked in two stages "
                                                   "only (a delta), and two-stage serving "
                                                   "is off here")
            return True
        return index is not None and index.use_for(int(meta["vocab_size"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _grown_vocabulary(path: Path, previous: LoadedModel | None
                      ) -> tuple[tuple[ItemId | None, ...], list[ItemId]] | None:
    """For a delta against the live bundle whose vocabulary only adds items: its vocabulary
    (the live one's, then the new items) and the new items; None otherwise.

    At 1M ids, decoding vocab.json again, checking it for repeats and mapping it held the
    GIL for ~0.4 s of a swap, during which no request moved; the items a delta adds are a
    few, and the live model's vocabulary was checked when it loaded.
    """
    if previous is None:
        return None
    old = previous.bundle.vocab
    links: list[list[ItemId]] = []  # the items each delta of the chain adds, newest first
    try:
        for _ in range(32):  # a worker that skipped some versions: back to the live one
            delta = json.loads((path / META_FILE).read_text()).get("delta")
            if not isinstance(delta, dict):
                return None
            spec = json.loads((path / DELTA_VOCAB).read_bytes())
            base = path.parent / delta_base(delta)
            n_base = (len(old) if base.name == previous.version
                      else int(json.loads((base / META_FILE).read_text())["vocab_size"]))
            added = appended_items(n_base, int(spec["size"]),
                                   [(int(row), item) for row, item in spec["rows"]])
            if added is None:
                return None
            links.append(added)
            if base.name == previous.version:
                break
            path = base
        else:
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # the full path decides what is wrong
    new = [item for added in reversed(links) for item in added]
    if len(set(new)) != len(new) or any(
            previous.index.get(item, len(old) + 1) <= len(old) for item in new):
        return None
    return old + tuple(new), new


def load_model(root: Path | str, version: str, *, providers: str = "auto",
               threads: int = 0, index: IndexConfig | None = None,
               previous: LoadedModel | None = None) -> LoadedModel:
    """Verify a bundle, build its ranking session and warm it up; raise ``BundleError`` if
    unusable.

    With ``index``, a catalogue of at least ``index.min_items`` items whose bundle carries
    the two-stage parts is ranked in two stages: those parts and their nearest-neighbour
    index are built here instead of the exact graph (off the request path: the caller swaps
    the result in). A bundle without the parts is ranked exactly, whatever its size.
    ``previous`` (the live model) lends its index to be refreshed rather than built afresh
    when it can (``stream_app.retrieval.ItemIndex``). A bundle without the exact graph (a
    delta, rebuilt by ``advrec.bundle.apply_delta``) is ranked in two stages whatever its
    size.
    """
    started = time.perf_counter()
    staged = _two_stage_wanted(Path(root) / version, index)
    grown = _grown_vocabulary(Path(root) / version, previous)
    bundle = load_bundle(root, version, model=not staged,
                         vocab=None if grown is None else grown[0])
    n_threads = threads or intra_op_threads(cpu_limit())
    probe = np.zeros((2, bundle.max_len), dtype=np.int64)  # an empty and a full history
    if bundle.vocab:
        probe[1] = np.arange(bundle.max_len) % len(bundle.vocab) + 1
    session, two_stage = None, None
    if staged:
        assert index is not None
        if bundle.two_stage is None or not bundle.vocab:  # meta.json changed under us
            raise BundleError("bad_meta", f"{version}: meta.json changed while loading")
        live = None if previous is None else previous.two_stage
        holes = None
        if grown is not None and live is not None:  # the live holes: only items were added
            holes = (np.zeros(0, np.int64) if live.freed is None
                     else np.flatnonzero(live.freed).astype(np.int64))
        two_stage = _two_stage(bundle, n_threads, providers, index, probe, live, holes)
        # the exact graph is never loaded, and the parts are: their bytes (~V x D x 4 each,
        # 256 MB at 1M items) need not stay in memory
        bundle = dataclasses.replace(bundle, model_bytes=b"", two_stage=None)
        in_use = two_stage.rescore.get_providers()
    else:
        session = _exact_session(bundle, n_threads, providers, probe)
        in_use = session.get_providers()
    detector = None
    if bundle.detector_bytes is not None:
        detector = _check_detector(bundle.detector_bytes, probe, version)
    if grown is not None and previous is not None:
        # the live map, with the new items' rows: the live model reads rows <= its own V
        rows = previous.index
        rows.update(zip(grown[1], range(len(previous.bundle.vocab) + 1,
                                        len(bundle.vocab) + 1), strict=True))
    else:
        rows = {item: row for row, item in enumerate(bundle.vocab, start=1)
                if item is not None}
    return LoadedModel(bundle=bundle, session=session, providers=in_use, index=rows,
                       loaded_at=time.time(), load_seconds=time.perf_counter() - started,
                       detector=detector, two_stage=two_stage)


@dataclass(slots=True)
class _Request:
    history: list[ItemId]
    rows: list[int]  # the history's known rows under ``model``
    model: LoadedModel
    k: int
    future: asyncio.Future
    queued_at: float  # loop time
    # the items that leave this list (advrec.exclusion); None: the whole history
    excluded: list[ItemId] | None = None
    excluded_rows: list[int] | None = None  # their rows under ``model``


@dataclass(slots=True)
class _Batch:
    model: LoadedModel  # the one model the whole batch runs on
    requests: list[_Request]
    model_in: np.ndarray  # (B, L)
    exclude: np.ndarray  # (B, S)
    k: int
    # a batch the loop hands over: held until an inference thread takes it
    taken: threading.Lock | None = None


class ModelTimeout(Exception):
    """A request waited longer than the server's ``call_timeout`` for its model call."""


class ModelServer:
    """Holds the live model (one reference) and answers recommendation requests.

    Requests wait in a queue. A model slot takes a batch of them, snapshots the live model,
    encodes the batch into one input and makes the onnxruntime call on an inference thread
    (the call releases the GIL); the answers go back to the loop in one callback. So a swap
    never changes the model under a batch, and only the encoding and the call leave the loop.

    How big a batch is: at most ``max_batch``, and at most an even share of the requests in
    the server (queued, on a model slot, or answered and not yet resumed), one share per
    slot and one for the loop. While one half is on the model, the loop answers and reads
    the other half, so the two overlap. Taking all that was queued instead, at c=32 on
    2 cores the batches fell into a cycle of 2 and 30: the model ran 30 while the loop had
    2 to answer, then the loop answered 30 while the model ran 2.

    A slot whose call ends takes its next batch itself, on its thread, before it posts the
    answers; it does not wait for the loop to get round to the finished batch. Only an idle
    slot is handed a batch by the loop, which blocks (GIL released) until the thread has
    taken it, at most ``handover_timeout``: a thread woken while the loop goes on running
    Python gets the GIL only when the loop next blocks (the loop's short socket calls
    release it, but retake it before the woken thread runs), and at c=32 the model call
    then started 0.5 ms after its batch was queued (median), 0.08 ms with the hand-over.
    bench/serve, c=32 on 2 cores, against the no-op endpoint in alternating runs: 0.50x with
    the share alone, 0.53x with the share and the self-refilling slot, 0.47x before either.

    A request that finds a slot free and no batch in flight runs at once (no added latency
    at low load). With ``threads`` > 1, a free slot beside a running batch waits for its
    share to fill: until the queue holds it, the running batch ends, or the oldest request
    has waited ``max_wait``.
    """

    handover_timeout = 0.005  # s: the most the loop waits for a thread to take a batch

    def __init__(self, *, max_batch: int = 32, max_wait_ms: float = 2.0, threads: int = 1,
                 call_timeout_s: float = 2.0, metrics: Any = None) -> None:
        assert max_batch >= 1 and threads >= 1 and call_timeout_s > 0
        self.current: LoadedModel | None = None
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.call_timeout = call_timeout_s
        self.metrics = metrics
        self.threads = threads
        self._pending: deque[_Request] = deque()
        # the loop and the inference threads both take batches: this guards the taking
        # (_pending's left end) and _free
        self._lock = threading.Lock()
        self._jobs: SimpleQueue[_Batch | None] = SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._free = threads  # model slots with no batch
        self._outstanding = 0  # requests inside recommend() (written on the loop only)
        self._flush_at: asyncio.Handle | None = None  # a scheduled _flush
        # requests not yet answered, oldest first, for the timeout watchdog (_watch)
        self._waiting: deque[_Request] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self._watch_every = min(0.25, call_timeout_s / 4)

    def swap(self, model: LoadedModel) -> LoadedModel | None:
        """Make ``model`` live; return the previous one (in-flight batches keep using it)."""
        old, self.current = self.current, model
        return old

    async def start(self) -> None:
        if self._workers:
            return
        self._loop = asyncio.get_running_loop()
        self._workers = [threading.Thread(target=self._infer, name=f"advrec-infer-{i}",
                                          daemon=True) for i in range(self.threads)]
        for worker in self._workers:
            worker.start()

    async def stop(self) -> None:
        """Stop the inference threads after their current call; fail requests still queued."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        with self._lock:
            queued = list(self._pending)
            self._pending.clear()
        self._fail(queued, RuntimeError("the model server stopped"))
        workers, self._workers = self._workers, []
        for _ in workers:
            self._jobs.put(None)
        for worker in workers:
            await asyncio.to_thread(worker.join, 10.0)

    async def recommend(self, history: list[ItemId], k: int,
                        excluded: list[ItemId] | None = None
                        ) -> tuple[list[ItemId], str] | None:
        """Return (top-k items, model version), or None if no model or no usable history.
        ``excluded``: the items that leave the list (advrec.exclusion); None: all of
        ``history``."""
        model = self.current
        if model is None:
            return None
        rows = model.known_rows(history)
        if not rows:
            return None
        ex_rows = None if excluded is None else model.known_rows(excluded)
        if not self._workers:
            await self.start()
        assert self._loop is not None
        future = self._loop.create_future()
        self._outstanding += 1
        try:
            request = _Request(history, rows, model, k, future, self._loop.time(),
                               excluded, ex_rows)
            self._pending.append(request)
            self._waiting.append(request)
            # once per loop iteration: requests read in the same iteration share a batch;
            # a batch waiting to fill (a timer) goes as soon as its share is queued
            if self._flush_at is None or (isinstance(self._flush_at, asyncio.TimerHandle)
                                          and len(self._pending) >= self._share()):
                if self._flush_at is not None:
                    self._flush_at.cancel()
                self._flush_at = self._loop.call_soon(self._flush)
            if self._watchdog is None:
                self._watchdog = self._loop.call_later(self._watch_every, self._watch)
            return await future
        finally:
            self._outstanding -= 1

    def _watch(self) -> None:
        """Fail the requests that have waited ``call_timeout`` with ``ModelTimeout`` (on the
        loop, a few times per timeout while requests are in the server).

        One timer for the server, not one per request: a per-request ``wait_for`` put a
        timer on the loop's heap and a callback on the future for every request.
        """
        assert self._loop is not None
        self._watchdog = None
        now, expired = self._loop.time(), 0
        waiting: deque[_Request] = deque()
        for request in self._waiting:
            if request.future.done():
                continue
            if now - request.queued_at >= self.call_timeout:
                request.future.set_exception(ModelTimeout(
                    f"no answer from the model within {self.call_timeout:g}s (model "
                    f"{request.model.version})"))
                expired += 1
            else:
                waiting.append(request)
        self._waiting = waiting
        if expired:
            self._timed_out(expired)
        if waiting:
            self._watchdog = self._loop.call_later(self._watch_every, self._watch)

    def _timed_out(self, n: int) -> None:
        """Count requests that waited too long; replace any inference thread that died, so
        that its slot serves again (a thread stuck in a call cannot be replaced: its requests
        keep timing out, counted, instead of hanging)."""
        log.warning("%d request(s) got no answer from the model within %gs", n,
                    self.call_timeout)
        if self.metrics is not None:
            self.metrics.model_timeouts.inc(n)
        for n, worker in enumerate(self._workers):
            if worker.is_alive():
                continue
            log.error("inference thread %s died; starting a new one", worker.name)
            fresh = threading.Thread(target=self._infer, name=worker.name, daemon=True)
            self._workers[n] = fresh
            with self._lock:
                self._free += 1  # the slot it held when it died
            fresh.start()
        if self._pending and self._flush_at is None and self._loop is not None:
            self._flush_at = self._loop.call_soon(self._flush)

    def _share(self) -> int:
        """The most requests one batch takes: ``max_batch``, or an even share of those in the
        server between the model slots and the loop if that is smaller."""
        return max(1, min(self.max_batch, -(-self._outstanding // (self.threads + 1))))

    def _take(self, beside: int) -> list[_Request] | None:
        """Take a slot's next batch off the queue, or None to leave the slot free; call with
        ``_lock`` held. ``beside``: how many other slots have a batch in flight."""
        if not self._pending:
            return None
        share = self._share()
        if beside > 0 and len(self._pending) < share:
            assert self._loop is not None
            if self._loop.time() < self._pending[0].queued_at + self.max_wait:
                return None  # wait to fill
        return [self._pending.popleft() for _ in range(min(len(self._pending), share))]

    def _flush(self) -> None:
        """Hand queued requests to free model slots (on the loop)."""
        assert self._loop is not None
        self._flush_at = None
        while True:
            with self._lock:
                if self._free == 0:
                    return
                requests = self._take(beside=self.threads - self._free)
                if requests is None:
                    if self._pending:  # waiting to fill beside a running batch
                        deadline = self._pending[0].queued_at + self.max_wait
                        self._flush_at = self._loop.call_at(deadline, self._flush)
                    return
                self._free -= 1
            batch = self._encode(requests)
            if isinstance(batch, Exception):
                with self._lock:
                    self._free += 1
                self._fail(requests, batch)
                continue
            self._hand_over(batch)

    def _hand_over(self, batch: _Batch) -> None:
        """Queue ``batch`` for an idle thread and block until it is taken, at most
        ``handover_timeout`` (see the class docstring)."""
        batch.taken = threading.Lock()
        batch.taken.acquire()
        self._jobs.put(batch)
        batch.taken.acquire(timeout=self.handover_timeout)

    def _refill(self) -> _Batch | None:
        """The next batch of a slot whose call just ended (on its thread), or None: the slot
        is free again."""
        while True:
            with self._lock:
                requests = self._take(beside=self.threads - 1 - self._free)
                if requests is None:
                    self._free += 1
                    return None
            batch = self._encode(requests)
            if not isinstance(batch, Exception):
                return batch
            if not self._post(self._fail, requests, batch):
                return None

    def _encode(self, requests: list[_Request]) -> _Batch | Exception:
        """Encode ``requests`` for the live model, or return the error (never raise: the
        caller fails the requests, never the server)."""
        model = self.current or requests[0].model  # one snapshot: a swap never splits a batch
        try:
            known = [r.rows if r.model is model else model.known_rows(r.history)
                     for r in requests]
            excluded = None
            if any(r.excluded is not None for r in requests):
                excluded = [rows if r.excluded is None else r.excluded_rows
                            if r.model is model else model.known_rows(r.excluded)
                            for r, rows in zip(requests, known, strict=True)]
            model_in, exclude = (model.prepare(known) if excluded is None
                                 else model.prepare(known, excluded))
            return _Batch(model, requests, model_in, exclude, model.top_k([r.k for r in requests]))
        except Exception as exc:
            log.exception("could not encode a batch of %d", len(requests))
            return exc

    def _post(self, callback: Any, *args: Any) -> bool:
        """Run ``callback(*args)`` on the loop (from a thread); False once the loop is closed."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return False
        return True

    def _infer(self) -> None:
        """An inference thread: run each batch's model call, take the slot's next batch,
        post the outcome to the loop."""
        batch = self._jobs.get()
        while batch is not None:
            if batch.taken is not None:
                batch.taken.release()  # the loop, waiting on it, lets go of the GIL
            try:
                outcome: Any = batch.model.rank(batch.model_in, batch.exclude, batch.k)
            except Exception as exc:
                outcome = exc
            following = self._refill()
            if not self._post(self._done, batch, outcome):
                return
            batch = following if following is not None else self._jobs.get()

    def _done(self, batch: _Batch, outcome: Any) -> None:
        """Answer a batch's requests (on the loop); its slot has moved on already."""
        if self._pending and self._free > 0:  # left free by its thread: hand the queue over
            if self._flush_at is not None:
                self._flush_at.cancel()
            self._flush()
        requests = batch.requests
        if isinstance(outcome, Exception):
            log.error("model call failed for a batch of %d: %s", len(requests), outcome,
                      exc_info=outcome)
            self._fail(requests, outcome)
            return
        try:
            best = batch.model.picked(*outcome, [r.k for r in requests])
            vocab, version = batch.model.bundle.vocab, batch.model.version
            for request, picked in zip(requests, best, strict=True):
                if not request.future.done():
                    request.future.set_result(([vocab[r - 1] for r in picked], version))
        except Exception as exc:
            log.exception("could not rank a batch of %d", len(requests))
            self._fail(requests, exc)
        if self.metrics is not None:
            self.metrics.microbatch_size.observe(len(requests))

    @staticmethod
    def _fail(requests: list[_Request], exc: Exception) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(exc)
