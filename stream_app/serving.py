"""ONNX serving: verified sessions, provider checks, micro-batched inference off the loop."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from advrec.bundle import INPUT_NAME, OUTPUT_NAME, Bundle, BundleError, load_bundle
from advrec.types import ItemId

__all__ = [
    "LoadedModel", "ModelServer", "cpu_limit", "intra_op_threads", "load_model", "ranking_graph",
    "release_freed_memory", "select_providers",
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
    """A verified bundle with a warmed onnxruntime session of its ranking graph."""

    bundle: Bundle
    session: ort.InferenceSession
    providers: list[str]
    index: dict[ItemId, int]  # external id -> row (1-based)
    loaded_at: float
    load_seconds: float
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def max_len(self) -> int:
        return self.bundle.max_len

    def known_rows(self, history: list[ItemId]) -> list[int]:
        """Return the rows of the items of ``history`` the model knows, oldest first."""
        index = self.index
        return [r for r in map(index.get, history) if r is not None]

    def encode(self, history: list[ItemId]) -> np.ndarray:
        """Return the left-padded row indices of the last ``max_len`` known items."""
        return self._left_pad(self.known_rows(history))

    def _left_pad(self, rows: list[int]) -> np.ndarray:
        """The model input for known ``rows``: the last ``max_len`` of them, left-padded."""
        tail = rows[-self.max_len:]
        out = np.zeros(self.max_len, dtype=np.int64)  # (L,)
        if tail:
            out[-len(tail):] = tail
        return out

    def recommend_batch(self, histories: list[list[ItemId]], ks: list[int]) -> list[list[int]]:
        """Return the top-k rows for each history, every known history item excluded.

        Blocking: one onnxruntime call for the whole batch (run it off the event loop).
        """
        known = [self.known_rows(h) for h in histories]
        model_in = np.stack([self._left_pad(rows) for rows in known])  # (B, L)
        exclude = np.zeros((len(known), 1 + max(map(len, known))),
                           dtype=np.int64)  # (B, S), 0-padded
        for i, rows in enumerate(known):
            exclude[i, 1:1 + len(rows)] = rows
        k = min(max(ks), len(self.bundle.vocab))
        if k <= 0:
            return [[] for _ in ks]
        scores, rows = self.session.run(
            [TOP_SCORES, TOP_ROWS],
            {INPUT_NAME: model_in, EXCLUDE_NAME: exclude, K_NAME: np.array([k], np.int64)})
        finite = np.isfinite(scores).sum(axis=1)  # (B,): -inf (excluded) sorts last
        return [rows[i, :min(ki, int(finite[i]))].tolist() for i, ki in enumerate(ks)]


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give memory that dropped sessions freed back to the OS.

    Sessions are built and run on pool threads, and glibc keeps what a thread frees in that
    thread's malloc arena. Without this the worker's RSS grew by roughly a session with every
    swap (bench/soak.py: +71 % over 8 minutes with 55 swaps; flat with it).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


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


def load_model(root: Path | str, version: str, *, providers: str = "auto",
               threads: int = 0) -> LoadedModel:
    """Verify a bundle, build its ranking session and warm it up; raise ``BundleError`` if
    unusable."""
    started = time.perf_counter()
    bundle = load_bundle(root, version)
    n_cols = len(bundle.vocab) + 1
    try:
        model = onnx.load_from_string(bundle.model_bytes)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise BundleError("load_error", f"{version}: not an ONNX model: {exc}"[:500]) from None
    _check_signature(model, version, n_cols)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or intra_op_threads(cpu_limit())
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
    probe = np.zeros((2, bundle.max_len), dtype=np.int64)
    if bundle.vocab:
        probe[1] = np.arange(bundle.max_len) % len(bundle.vocab) + 1
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
    index = {item: row for row, item in enumerate(bundle.vocab, start=1)}
    return LoadedModel(bundle=bundle, session=session, providers=session.get_providers(),
                       index=index, loaded_at=time.time(),
                       load_seconds=time.perf_counter() - started)


@dataclass
class _Request:
    history: list[ItemId]
    k: int
    future: asyncio.Future


class ModelServer:
    """Holds the live model (one reference) and answers recommendation requests.

    Requests queue up; one loop task takes up to ``max_batch`` of them (waiting at most
    ``max_wait_ms`` after the first), snapshots the live model once, and runs a single
    model call in a thread pool, so a swap never changes the model under a batch and the
    event loop stays free for ingestion (onnxruntime releases the GIL).
    """

    def __init__(self, *, max_batch: int = 32, max_wait_ms: float = 2.0, threads: int = 1,
                 metrics: Any = None) -> None:
        assert max_batch >= 1 and threads >= 1
        self.current: LoadedModel | None = None
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="advrec-infer")
        self._slots = asyncio.Semaphore(threads)
        self._queue: asyncio.Queue[_Request] | None = None
        self._task: asyncio.Task | None = None
        self._inflight = 0  # model calls running now

    def swap(self, model: LoadedModel) -> LoadedModel | None:
        """Make ``model`` live; return the previous one (in-flight batches keep using it)."""
        old, self.current = self.current, model
        return old

    async def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def recommend(self, history: list[ItemId], k: int) -> tuple[list[ItemId], str] | None:
        """Return (top-k items, model version), or None if no model or no usable history."""
        model = self.current
        if model is None or not any(i in model.index for i in history):
            return None
        if self._task is None:
            await self.start()
        assert self._queue is not None
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(history, k, fut))
        return await fut

    async def _serve(self) -> None:
        """Form batches adaptively: run at once when a model slot is free, else accumulate.

        A request that finds a free slot and nobody else waiting runs alone (no added
        latency at low load); while every slot is busy, requests pile up and the next free
        slot takes up to ``max_batch`` of them, waiting at most ``max_wait`` for more only
        if another batch is still in flight.
        """
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                first = await self._queue.get()
            except BaseException:
                self._slots.release()
                raise
            batch = [first]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                timeout = deadline - loop.time()
                if timeout <= 0 or self._inflight == 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            self._inflight += 1
            task = loop.create_task(self._run_batch(batch))
            task.add_done_callback(self._batch_done)

    def _batch_done(self, _task: asyncio.Task) -> None:
        self._inflight -= 1
        self._slots.release()

    async def _run_batch(self, batch: list[_Request]) -> None:
        model = self.current  # one snapshot per batch: a swap never splits a batch
        try:
            if model is None:
                raise RuntimeError("no model loaded")
            histories, ks = [r.history for r in batch], [r.k for r in batch]
            # encoding, the model call and the ranking all run in the pool: numpy and
            # onnxruntime release the GIL, and the event loop stays free for ingestion
            best = await asyncio.get_running_loop().run_in_executor(
                self._pool, model.recommend_batch, histories, ks)
            if self.metrics is not None:
                self.metrics.microbatch_size.observe(len(batch))
            vocab = model.bundle.vocab
            for req, picked in zip(batch, best, strict=True):
                if not req.future.done():
                    req.future.set_result(([vocab[r - 1] for r in picked], model.version))
        except Exception as exc:  # fail the requests, never the serving loop
            log.exception("model call failed for a batch of %d", len(batch))
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(exc)
