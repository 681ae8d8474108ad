"""Small hand-built ONNX generators for tests of serving and hot swap (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from advrec.bundle import INPUT_NAME, OUTPUT_NAME, write_bundle


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


def publish_toy(root: Path, vocab: list[str], *, seed: int = 0, max_len: int = 10,
                keep: int = 100, **kw: object) -> str:
    """Write a toy bundle for ``vocab`` and make it current; return its version."""
    model = toy_model(len(vocab), seed=seed, **kw)  # type: ignore[arg-type]
    return write_bundle(root, model, vocab, {"max_len": max_len, "last_event_ms": 0,
                                             "examples_seen": 0, "metrics": {}}, keep=keep)
