"""Small hand-built ONNX generators for tests of serving and hot swap (no torch needed)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from advrec.bundle import INPUT_NAME, OUTPUT_NAME, bundle_files, write_bundle
from advrec.channel_io import ChannelPublisher
from advrec.topics import CHANNEL_CONFIG, TopicSpec, ensure_topics


def toy_model(n_items: int, dim: int = 8, *, seed: int = 0, nan: bool = False,
              input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME,
              extra_cols: int = 0) -> bytes:
    """history[B, L] int64 -> scores[B, V+1]: mean of history embeddings dot item embeddings."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(n_items + 1 + extra_cols, dim)).astype(np.float32)
    table[0] = 0.0
    if nan:
        table[1, 0] = np.nan
    nodes = [
        helper.make_node("Gather", ["table", input_name], ["emb"], axis=0),  # (B, L, D)
        helper.make_node("ReduceMean", ["emb", "axes"], ["user"], keepdims=0),  # (B, D)
        helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),  # (D, V+1)
        helper.make_node("MatMul", ["user", "table_t"], [output_name]),  # (B, V+1)
    ]
    graph = helper.make_graph(
        nodes, "toy_generator",
        [helper.make_tensor_value_info(input_name, TensorProto.INT64, ["batch", "length"])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT,
                                       ["batch", n_items + 1 + extra_cols])],
        initializer=[numpy_helper.from_array(table, "table"),
                     numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def toy_table(n_items: int, dim: int = 8, *, seed: int = 0) -> np.ndarray:
    """The item table [V+1, D] of ``toy_model`` with the same arguments (row 0 zero)."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(n_items + 1, dim)).astype(np.float32)
    table[0] = 0.0
    return table


def toy_two_stage(n_items: int, dim: int = 8, *, seed: int = 0,
                  linked: list[int] | None = None) -> dict[str, bytes]:
    """The two-stage parts of ``toy_model`` (same table, same scores): user.onnx (the mean
    history embedding; ``linked`` rows named as candidates for every user, none by
    default), rescore.onnx (user . vectors) and items.npy."""
    import io

    from advrec.bundle import (
        TWO_STAGE_ITEMS,
        TWO_STAGE_RESCORE,
        TWO_STAGE_RESCORE_INPUTS,
        TWO_STAGE_RESCORE_OUTPUT,
        TWO_STAGE_USER,
        TWO_STAGE_USER_INPUT,
        TWO_STAGE_USER_OUTPUTS,
    )

    table = toy_table(n_items, dim, seed=seed)
    user, out_linked, out_cold = TWO_STAGE_USER_OUTPUTS
    links = np.array([linked or [0]], dtype=np.int64)  # (1, R)
    nodes = [
        helper.make_node("Gather", ["table", TWO_STAGE_USER_INPUT], ["emb"], axis=0),
        helper.make_node("ReduceMean", ["emb", "axes"], [user], keepdims=0),  # (B, D)
        helper.make_node("Shape", [TWO_STAGE_USER_INPUT], ["shape"]),  # (2,)
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),  # (1,)
        helper.make_node("Concat", ["batch", "one"], ["shape_b1"], axis=0),  # (2,) = [B, 1]
        helper.make_node("Concat", ["batch", "n_links"], ["batch_r"], axis=0),  # [B, R]
        helper.make_node("Expand", ["links", "batch_r"], [out_linked]),  # (B, R)
        helper.make_node("ConstantOfShape", ["shape_b1"], [out_cold],
                         value=helper.make_tensor("z", TensorProto.INT64, [1], [0])),
    ]
    graph = helper.make_graph(
        nodes, "toy_user",
        [helper.make_tensor_value_info(TWO_STAGE_USER_INPUT, TensorProto.INT64,
                                       ["batch", "length"])],
        [helper.make_tensor_value_info(user, TensorProto.FLOAT, ["batch", dim]),
         helper.make_tensor_value_info(out_linked, TensorProto.INT64, ["batch", "r"]),
         helper.make_tensor_value_info(out_cold, TensorProto.INT64, ["batch", 1])],
        initializer=[numpy_helper.from_array(table, "table"),
                     numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
                     numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
                     numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
                     numpy_helper.from_array(links, "links"),
                     numpy_helper.from_array(np.array([links.shape[1]], np.int64),
                                             "n_links")])
    history, user_in, rows, vectors = TWO_STAGE_RESCORE_INPUTS
    rescore = helper.make_graph(
        [helper.make_node("Unsqueeze", [user_in, "two"], ["user_3d"]),  # (B, D, 1)
         helper.make_node("MatMul", [vectors, "user_3d"], ["dots"]),  # (B, C, 1)
         helper.make_node("Squeeze", ["dots", "two"], [TWO_STAGE_RESCORE_OUTPUT])],  # (B, C)
        "toy_rescore",
        [helper.make_tensor_value_info(history, TensorProto.INT64, ["batch", "length"]),
         helper.make_tensor_value_info(user_in, TensorProto.FLOAT, ["batch", dim]),
         helper.make_tensor_value_info(rows, TensorProto.INT64, ["batch", "n"]),
         helper.make_tensor_value_info(vectors, TensorProto.FLOAT, ["batch", "n", dim])],
        [helper.make_tensor_value_info(TWO_STAGE_RESCORE_OUTPUT, TensorProto.FLOAT,
                                       ["batch", "n"])],
        initializer=[numpy_helper.from_array(np.array([2], dtype=np.int64), "two")])
    out = {}
    for name, g in ((TWO_STAGE_USER, graph), (TWO_STAGE_RESCORE, rescore)):
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        onnx.checker.check_model(model)
        out[name] = model.SerializeToString()
    buf = io.BytesIO()
    np.save(buf, table, allow_pickle=False)
    out[TWO_STAGE_ITEMS] = buf.getvalue()
    return out


TOY_DETECTOR_META = {"threshold": 0.999, "min_clicks": 3, "rounds": 5}


def toy_detector(*, nan: bool = False, n_terms: int | None = None) -> bytes:
    """items[B, L] int64, behaviour[B, F_b] float32 -> p_fake[B] (a sigmoid of the summed
    behaviour) and terms[B, F] (the behaviour, repeated to F columns): a detector.onnx."""
    from advrec.bundle import DETECTOR_INPUTS, DETECTOR_OUTPUTS
    from advrec.suspicion import BEHAVIOUR_FEATURES, FEATURES

    f_b = len(BEHAVIOUR_FEATURES)
    n_terms = len(FEATURES) if n_terms is None else n_terms
    items, behaviour = DETECTOR_INPUTS
    p_fake, terms = DETECTOR_OUTPUTS
    scale = np.array([np.nan if nan else 1.0], dtype=np.float32)
    pick = np.arange(n_terms, dtype=np.int64) % f_b
    nodes = [
        helper.make_node("Mul", [behaviour, "scale"], ["scaled"]),  # (B, F_b)
        helper.make_node("ReduceSum", ["scaled", "axes"], ["total"], keepdims=0),  # (B,)
        helper.make_node("Sigmoid", ["total"], [p_fake]),  # (B,)
        helper.make_node("Gather", ["scaled", "pick"], [terms], axis=1),  # (B, F)
    ]
    graph = helper.make_graph(
        nodes, "toy_detector",
        [helper.make_tensor_value_info(items, TensorProto.INT64, ["batch", "length"]),
         helper.make_tensor_value_info(behaviour, TensorProto.FLOAT, ["batch", f_b])],
        [helper.make_tensor_value_info(p_fake, TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info(terms, TensorProto.FLOAT, ["batch", n_terms])],
        initializer=[numpy_helper.from_array(scale, "scale"),
                     numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
                     numpy_helper.from_array(pick, "pick")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every ``os.fsync`` from here on (each still runs): the descriptors, in order."""
    synced: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd))[1])
    return synced


def publish_toy(root: Path, vocab: list[str], *, seed: int = 0, max_len: int = 10,
                keep: int = 100, two_stage: dict[str, bytes] | None = None,
                **kw: object) -> str:
    """Write a toy bundle for ``vocab`` and make it current; return its version.
    ``two_stage``: its two-stage parts (``toy_two_stage``)."""
    model = toy_model(len(vocab), seed=seed, **kw)  # type: ignore[arg-type]
    return write_bundle(root, model, vocab, {"max_len": max_len, "last_event_ms": 0,
                                             "examples_seen": 0, "metrics": {}}, keep=keep,
                        two_stage=two_stage)


def publish_files(bootstrap: str, topic: str, version: str,
                  files: list[tuple[str, bytes]], *, stale: int | None = None) -> None:
    """Publish files as one version on a bundle topic, as the trainer does (chunks, manifest,
    pointer); the topic is created if missing. ``stale``: tombstone all but this many newest
    versions this helper published there."""
    done = _published.setdefault(topic, [])

    async def run() -> int:
        await ensure_topics(bootstrap, [TopicSpec(topic, 1, config=dict(CHANNEL_CONFIG))])
        pub = ChannelPublisher(bootstrap, topic, producer_id="tests", chunk_bytes=16 * 1024)
        try:
            old = done[: len(done) + 1 - stale] if stale else []
            return (await pub.publish(version, files, stale=old)).chunks
        finally:
            await pub.stop()

    done.append((version, asyncio.run(run())))


def publish_dir(bootstrap: str, topic: str, root: Path, version: str) -> None:
    """Publish whatever files ``root/version`` holds (meta.json last, if there is one)."""
    names = sorted(p.name for p in (root / version).iterdir())
    names.sort(key=lambda n: n == "meta.json")
    publish_files(bootstrap, topic, version, [(n, (root / version / n).read_bytes())
                                              for n in names])


def publish_toy_to_topic(bootstrap: str, topic: str, vocab: list[str], *, seed: int = 0,
                         max_len: int = 10, stale: int | None = None,
                         detector: bytes | None = None, **kw: object) -> str:
    """Publish a toy bundle to a bundle topic; return its version (later calls, later
    versions: versions are millisecond times, and two calls may share a millisecond).
    ``detector``: a detector.onnx to carry (meta: min_clicks 3, rounds 5)."""
    global _last_version
    _last_version = max(int(time.time() * 1000), _last_version + 1)
    version = f"{_last_version:013d}"
    with tempfile.TemporaryDirectory() as scratch:
        write_bundle(scratch, toy_model(len(vocab), seed=seed, **kw),  # type: ignore[arg-type]
                     vocab, {"max_len": max_len, "last_event_ms": 0, "examples_seen": 0,
                             "metrics": {}, "version": version,
                             **({"detector": TOY_DETECTOR_META} if detector else {})},
                     keep=1, detector_bytes=detector)
        files = bundle_files(scratch, version)
    publish_files(bootstrap, topic, version, files, stale=stale)
    return version


_published: dict[str, list[tuple[str, int]]] = {}  # topic -> (version, chunks) published here
_last_version = 0
