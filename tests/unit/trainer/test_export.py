"""ONNX export: parity with torch on padded/empty histories, dynamic batch, bundle layout, CLI."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from advrec.bundle import INPUT_NAME, OUTPUT_NAME, load_bundle, read_current
from tests.unit.trainer.planted import SMALL, planted_stream
from trainer.checkpoint import save_checkpoint
from trainer.export import (
    ExportError,
    check_parity,
    export_onnx,
    main,
    publish_bundle,
    scoring_model,
)
from trainer.learner import OnlineLearner, TrainConfig
from trainer.model import ModelConfig


@pytest.fixture(scope="module")
def learner() -> OnlineLearner:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the per-test thread fixture
    learner = OnlineLearner(SMALL, TrainConfig(mode="irgan", lr=3e-3, replay_size=300))
    for batch in planted_stream(6, 64):
        learner.train_batch(batch)
    torch.set_num_threads(before)
    return learner


@pytest.fixture(scope="module")
def model_bytes(learner: OnlineLearner) -> bytes:
    return export_onnx(scoring_model(learner), SMALL.max_len)  # what is shipped: G + prior


def _histories(n: int, n_items: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(1, n_items + 1, size=(n, SMALL.max_len))  # (B, L)
    for i in range(n):
        h[i, : rng.integers(0, SMALL.max_len + 1)] = 0  # left padding of every length
    h[0] = 0  # always one empty history
    return h.astype(np.int64)


def _top10(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_onnx_matches_torch_on_padded_and_empty_histories(
        learner: OnlineLearner, model_bytes: bytes, batch_size: int) -> None:
    histories = _histories(batch_size, len(learner.vocab))
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: histories})[0]  # (B, V+1)
    expected = learner._score_rows(histories)  # (B, V+1)
    assert got.shape == (batch_size, len(learner.vocab) + 1)  # one model, any batch size
    assert not np.isnan(got).any()
    assert np.abs(got - expected).max() < 1e-4
    np.testing.assert_array_equal(_top10(got), _top10(expected))
    assert (got.argmax(axis=1) != 0).all()
    assert check_parity(scoring_model(learner), model_bytes, histories) < 1e-4


def test_export_leaves_the_generator_in_training_mode(learner: OnlineLearner) -> None:
    learner.generator.train()
    export_onnx(learner.generator, SMALL.max_len)
    assert learner.generator.training


def test_onnx_model_is_self_contained_with_the_bundle_signature(model_bytes: bytes) -> None:
    model = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(model)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic (dynamic) batch axis


def test_exported_generator_reads_no_tensor_shapes(learner: OnlineLearner) -> None:
    # every size but the batch is a constant (trainer.model.static_dim): no Shape ops and
    # the arithmetic on them, which onnxruntime would run on every served call (the prior's
    # gather and scatter of the hybrid still read the batch size)
    g_bytes = export_onnx(learner.generator, SMALL.max_len)
    ops = {node.op_type for node in onnx.load_from_string(g_bytes).graph.node}
    assert "Shape" not in ops and "Sqrt" not in ops, sorted(ops)


def test_check_parity_reports_a_mismatch(learner: OnlineLearner, model_bytes: bytes) -> None:
    other = OnlineLearner(SMALL, TrainConfig(seed=5))
    other.train_batch(planted_stream(6, 64)[0])
    other.generator.grow(len(learner.vocab) - other.generator.n_items)
    assert check_parity(other.generator, model_bytes, _histories(4, len(learner.vocab))) > 1e-3


def test_publish_bundle_writes_a_verifiable_three_file_bundle(
        learner: OnlineLearner, tmp_path: Path) -> None:
    version = publish_bundle(learner, tmp_path, {"hr@10": 0.5}, keep=2)
    assert read_current(tmp_path) == version
    assert sorted(p.name for p in (tmp_path / version).iterdir()) == [
        "meta.json", "model.onnx", "vocab.json"]
    bundle = load_bundle(tmp_path, version)  # checks sha256 and vocabulary
    assert list(bundle.vocab) == learner.vocab.items()
    meta = bundle.meta
    assert meta["max_len"] == SMALL.max_len
    assert meta["examples_seen"] == learner.examples_seen
    assert meta["last_event_ms"] == learner.last_event_ms
    assert meta["metrics"] == {"hr@10": 0.5}
    assert meta["model_config"]["d_model"] == SMALL.d_model
    assert meta["train_config"]["mode"] == "irgan"
    assert meta["parity_max_abs_diff"] < 1e-4


def test_publish_bundle_refuses_an_empty_learner(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not seen any item"):
        publish_bundle(OnlineLearner(SMALL), tmp_path, {})


def test_export_cli_publishes_from_a_checkpoint(
        learner: OnlineLearner, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_checkpoint(tmp_path / "ckpt.pt", learner, {"metrics": {"hr@10": 0.25}})
    code = main(["--checkpoint", str(tmp_path / "ckpt.pt"),
                 "--bundle-dir", str(tmp_path / "bundles")])
    assert code == 0
    version = read_current(tmp_path / "bundles")
    assert version is not None and version in capsys.readouterr().out
    meta = json.loads((tmp_path / "bundles" / version / "meta.json").read_text())
    assert meta["metrics"] == {"hr@10": 0.25}


def test_export_cli_fails_cleanly_on_a_missing_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--bundle-dir", str(tmp_path)]) == 1
    assert "advrec export:" in capsys.readouterr().err


def test_export_cli_help_names_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "advrec export" in out and "--checkpoint" in out and "--bundle-dir" in out


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_scores(learner: OnlineLearner) -> None:
    model_bytes = export_onnx(learner.generator, SMALL.max_len, dynamo=True)
    assert check_parity(learner.generator, model_bytes, _histories(7, len(learner.vocab))) < 1e-4


@pytest.mark.parametrize("model_cfg", [
    dataclasses.replace(SMALL, item_bias=True),
    dataclasses.replace(SMALL, item_bias=True, tied_output=False),
], ids=["bias", "bias+untied"])
def test_output_parts_export_with_parity(model_cfg: ModelConfig, tmp_path: Path) -> None:
    learner = OnlineLearner(model_cfg, TrainConfig(mode="apr", replay_size=300, item_lr_mult=3.0))
    for batch in planted_stream(4, 64):  # more items than the initial capacity: tables grew
        learner.train_batch(batch)
    gen = learner.generator
    assert gen.item_bias() is not None and gen.item_bias()[1:].abs().max() > 0  # learned
    histories = _histories(16, len(learner.vocab))
    onnx_bytes = export_onnx(gen, model_cfg.max_len)
    assert check_parity(gen, onnx_bytes, histories) < 1e-4
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: histories})[0]  # (B, V+1)
    g_alone = learner._score_rows(histories, weight=0.0)  # the generator without its prior
    np.testing.assert_array_equal(_top10(got), _top10(g_alone))
    version = publish_bundle(learner, tmp_path, {})
    bundle = load_bundle(tmp_path, version)  # the same three files, the same signature
    assert bundle.meta["model_config"]["item_bias"] is True
    assert bundle.meta["vocab_size"] == len(learner.vocab)
