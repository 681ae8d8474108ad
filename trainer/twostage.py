"""Two-stage serving's graphs: G's user and item vectors, and the scorer at candidate rows.

G scores item ``i`` as ``h . E[i] + b[i]`` (trainer/model.py ``Generator.score``), with ``h``
the newest position's hidden state. So the *user vector* is ``[h, 1]`` and the *item table*
is ``[E, b]`` (``[h]`` and ``[E]`` without item biases): their inner product is G's score
exactly, and a worker finds G's best rows with a nearest-neighbour index over the table
(stream_app/retrieval.py). The other score terms are not inner products: the co-occurrence
prior (trainer/prior.py) scores the links of the history's latest items, the content score
(trainer/content.py) the catalogue items with no click. The user encoder names those rows as
candidates beside the user vector (``linked``, ``cold``), and the rescorer gives every
candidate the full scorer's score, as ``scoring_model`` would at that column.

Graphs (names in advrec/bundle.py, ``TWO_STAGE_*``):

- user.onnx: history [B, L] int64 -> user [B, D'], linked [B, R*K] int64, cold [B, M] int64
  (linked and cold are [B, 1] of padding when the scorer has no such term). With G's item
  table tied (the default), the history's own rows of the item table come in as well,
  history_vectors [B, L, D'], read by the worker from its index: the graph then carries no
  item table of its own (256 MB at 1M items, in every bundle and in every worker);
- rescore.onnx: history [B, L], user [B, D'], rows [B, C] int64 and their item vectors
  [B, C, D'] -> scores [B, C] (the vectors are an input: the worker holds the table once,
  for its index, instead of once more inside the graph).

With the prior, both graphs also take the links of the history's latest R rows,
history_links and history_link_counts [B, R, K], which the worker gathers from the prior's
sparse rows (advrec/links.py, files ``PRIOR_FILES`` beside the graphs): neither graph
carries the [V+1, K] link table (512 MB at 1M items, in each).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from advrec.bundle import (
    TWO_STAGE_ITEMS,
    TWO_STAGE_RESCORE,
    TWO_STAGE_RESCORE_INPUTS,
    TWO_STAGE_RESCORE_OUTPUT,
    TWO_STAGE_USER,
    TWO_STAGE_USER_INPUT,
    TWO_STAGE_USER_OUTPUTS,
    TWO_STAGE_USER_VECTORS,
    encode_item_rows,
    item_rows,
)
from advrec.links import LINK_INPUTS, SparseRows, link_inputs, link_shape, npy_bytes
from trainer.content import ColdScorer, WithCold
from trainer.model import NEG, Generator
from trainer.prior import HybridScorer, PriorScorer

__all__ = ["COLD_CANDIDATES", "CandidateScorer", "ScorerParts", "UserEncoder",
           "check_two_stage_parity", "export_two_stage", "held_rows", "item_vectors",
           "parity_rows", "scorer_parts"]

OPSET = 17  # as trainer/export.py
# content-only rows named per request: the content score ranks them, so the best M by it
# are the only ones that can enter a top k <= M (ADVREC_MAX_K is at most 1000; 200 default)
COLD_CANDIDATES = 200


@dataclass(frozen=True)
class ScorerParts:
    """The terms of a ``scoring_model``: G, the prior and its weight, the content score."""

    generator: Generator
    prior: PriorScorer | None = None
    weight: float = 0.0
    cold: ColdScorer | None = None


def scorer_parts(scorer: nn.Module) -> ScorerParts:
    """Take a scorer (G, ``HybridScorer``, either inside ``WithCold``) apart."""
    cold = None
    if isinstance(scorer, WithCold):
        scorer, cold = scorer.scorer, scorer.cold
    if isinstance(scorer, HybridScorer):
        assert isinstance(scorer.generator, Generator), type(scorer.generator)
        return ScorerParts(scorer.generator, scorer.prior, scorer.weight, cold)
    assert isinstance(scorer, Generator), f"not a scorer: {type(scorer).__name__}"
    return ScorerParts(scorer, cold=cold)


def item_vectors(generator: Generator) -> np.ndarray:
    """G's item table as the index holds it: [V+1, D'] float32, row 0 (padding) and the
    rows a bounded vocabulary freed zero (the worker never takes those as candidates);
    ``D' = D + 1`` with item biases (the last column), else ``D``."""
    with torch.no_grad():
        table = generator.item_table().detach().float().cpu()  # (V+1, D)
        bias = generator.item_bias()  # (V+1,) or None
        if bias is not None:
            table = torch.cat([table, bias.detach().float().cpu().unsqueeze(1)], dim=1)
        table[0] = 0.0
        if generator.hole_offset is not None:
            table[generator.hole_offset[: len(table)].cpu() < 0] = 0.0
    return np.ascontiguousarray(table.numpy())  # (V+1, D')


class UserEncoder(nn.Module):
    """history [B, L] (and, when ``reads_vectors``, the history's rows of the item table
    [B, L, D']; when ``reads_links``, the links of its latest R rows [B, R, K] twice:
    advrec/links.py) -> user vector [B, D'], the prior's linked rows [B, R*K] and the best
    ``n_cold`` content-only rows by content score [B, M]."""

    def __init__(self, scorer: nn.Module, n_cold: int = COLD_CANDIDATES) -> None:
        super().__init__()
        parts = scorer_parts(scorer)
        self.generator = parts.generator
        self.with_bias = parts.generator.item_bias() is not None
        # the scoring table is the input table: the worker's index holds the history's rows
        self.reads_vectors = parts.generator.out_items is None
        self.prior = parts.prior
        # the prior's links come in as inputs, gathered by the worker from the bundle's
        # sparse rows: the graph carries no [V+1, K] table (512 MB at 1M items)
        self.reads_links = parts.prior is not None
        self.cold = parts.cold
        rows = (np.zeros(0, np.int64) if parts.cold is None
                else np.flatnonzero(parts.cold.mix.cpu().numpy() > 0))
        self.register_buffer("cold_rows", torch.from_numpy(rows.astype(np.int64)))  # (N_c,)
        self.n_cold = min(n_cold, len(rows))

    def forward(self, history: torch.Tensor, *inputs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # inputs, as the graph takes them: history_vectors (B, L, D') when reads_vectors,
        # then history_links and history_link_counts (B, R, K) when reads_links; none: G's
        # own table and the prior's (what they are read from)
        rest = list(inputs)
        emb = None
        if self.reads_vectors and rest:  # (B, L, D'): item_vectors' rows, bias column last
            D = self.generator.config.d_model
            emb = rest.pop(0)[..., :D] * self.generator.emb_scale  # (B, L, D), as G.embed
        h = self.generator.last_hidden(history, emb)  # (B, D)
        if self.with_bias:
            h = torch.cat([h, h[:, :1] * 0.0 + 1.0], dim=1)  # (B, D+1)
        none = history[:, -1:] * 0  # (B, 1) padding: no candidates from this term
        linked = none
        if self.prior is not None:
            gathered = (rest[0], rest[1]) if rest else None
            linked = self.prior.links(history, gathered)[0]  # (B, R*K)
        cold = none
        if self.cold is not None and self.n_cold > 0:
            table = self.cold.table[self.cold_rows]  # (N_c, k)
            content = self.cold.scale * (self.cold.profile(history) @ table.t())  # (B, N_c)
            best = torch.topk(content, self.n_cold, dim=1).indices  # (B, M)
            cold = self.cold_rows[best]  # (B, M)
        return h, linked, cold


class CandidateScorer(nn.Module):
    """The full scorer at candidate rows: (history [B, L], user [B, D'], rows [B, C], their
    item vectors [B, C, D'], with the prior the history's links [B, R, K] twice) -> scores
    [B, C], as ``scoring_model(history)[:, rows]``."""

    def __init__(self, scorer: nn.Module) -> None:
        super().__init__()
        parts = scorer_parts(scorer)
        self.prior = parts.prior
        self.weight = parts.weight
        self.cold = parts.cold

    def forward(self, history: torch.Tensor, user: torch.Tensor, rows: torch.Tensor,
                vectors: torch.Tensor, links: torch.Tensor | None = None,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        scores = (vectors @ user.unsqueeze(2)).squeeze(2)  # (B, C): G's score
        scores = torch.where(rows > 0, scores, torch.full_like(scores, NEG))  # padding
        if self.prior is not None:
            gathered = None if links is None or counts is None else (links, counts)
            scores = scores + self.weight * self.prior.at(history, rows, gathered)  # (B, C)
        if self.cold is not None:
            scores = self.cold.at(history, rows, scores)  # (B, C)
        return scores


def _export(module: nn.Module, args: tuple, names_in: list[str], names_out: list[str],
            batch_axes: dict[str, dict[int, str]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter, as trainer/export.py uses (the dynamo one is ~20x slower)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, args, buf, input_names=names_in, output_names=names_out,
                          dynamic_axes=batch_axes, opset_version=OPSET, dynamo=False)
    return buf.getvalue()


def export_two_stage(scorer: nn.Module, max_len: int, n_cold: int = COLD_CANDIDATES,
                     stored: np.ndarray | None = None) -> dict[str, bytes]:
    """Export a ``scoring_model``'s two-stage parts: the bundle files (name -> bytes).
    ``stored``: items.npy's array when the caller has it, ``held_rows`` of the int8 rows
    G's table was rounded from (trainer/export.py ``PackedTable``): then it is not packed
    again (at 1M items that was ~0.5 s of every export)."""
    scorer = scorer.cpu().eval()
    user_enc, rescorer = UserEncoder(scorer, n_cold).eval(), CandidateScorer(scorer).eval()
    table = None if stored is not None else item_vectors(user_enc.generator)  # (V+1, D')
    n_rows = len(stored if table is None else table)

    def vectors_at(ids: torch.Tensor) -> torch.Tensor:
        """G's rows as the index holds them (the trace's example inputs): [..., D']."""
        if table is not None:
            return torch.from_numpy(table)[ids]
        assert stored is not None
        flat = item_rows(stored[ids.reshape(-1).numpy()])  # (n, D')
        return torch.from_numpy(flat).reshape(*ids.shape, flat.shape[1])

    history = torch.zeros((2, max_len), dtype=torch.int64)  # (B, L)
    history[0, -1] = 1 if n_rows > 1 else 0
    args: tuple = (history,)
    names_in, axes = [TWO_STAGE_USER_INPUT], {TWO_STAGE_USER_INPUT: {0: "batch"}}
    if user_enc.reads_vectors:
        args = (history, vectors_at(history))  # (B, L), (B, L, D')
        names_in.append(TWO_STAGE_USER_VECTORS)
        axes[TWO_STAGE_USER_VECTORS] = {0: "batch"}
    links: SparseRows | None = None
    gathered: tuple = ()
    if user_enc.prior is not None:
        prior = user_enc.prior
        links = prior.as_rows()
        gathered = tuple(torch.from_numpy(a) for a in links.gather(
            prior.recent(history).numpy(), prior.top_k))  # (B, R, K) each
        args = (*args, *gathered)
        names_in.extend(LINK_INPUTS)
        axes.update({name: {0: "batch"} for name in LINK_INPUTS})
    user_bytes = _export(
        user_enc, args, names_in, list(TWO_STAGE_USER_OUTPUTS),
        {**axes, TWO_STAGE_USER_OUTPUTS[0]: {0: "batch"},
         TWO_STAGE_USER_OUTPUTS[1]: {0: "batch", 1: "n_linked"},
         TWO_STAGE_USER_OUTPUTS[2]: {0: "batch", 1: "n_cold"}})
    with torch.no_grad():
        user = user_enc(*args)[0]  # (B, D')
    rows = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.int64) % n_rows  # (B, C)
    vectors = vectors_at(rows)  # (B, C, D')
    names = list(TWO_STAGE_RESCORE_INPUTS) + (list(LINK_INPUTS) if gathered else [])
    rescore_bytes = _export(
        rescorer, (history, user, rows, vectors, *gathered), names,
        [TWO_STAGE_RESCORE_OUTPUT],
        {names[0]: {0: "batch"}, names[1]: {0: "batch"}, names[2]: {0: "batch", 1: "n"},
         names[3]: {0: "batch", 1: "n"}, TWO_STAGE_RESCORE_OUTPUT: {0: "batch", 1: "n"},
         **{name: {0: "batch"} for name in names[4:]}})
    # int8 rows when that loses nothing (G's tables rounded by trainer/export.py
    # ``compact_item_tables``): a quarter of float32's bytes on the topic and in the bundle
    return {TWO_STAGE_USER: user_bytes, TWO_STAGE_RESCORE: rescore_bytes,
            TWO_STAGE_ITEMS: npy_bytes(stored if table is None else encode_item_rows(table)),
            **(links.files() if links is not None else {})}


def held_rows(packed: np.ndarray, generator: Generator) -> np.ndarray:
    """items.npy's array from G's int8 rows [V+1, D'+1]: a copy with padding and the freed
    rows zero, as ``item_vectors`` leaves them (an int8 row of zeros is all zeros)."""
    assert packed.dtype == np.int8 and len(packed) == generator.n_items + 1, packed.shape
    stored = packed.copy()  # (V+1, D'+1)
    stored[0] = 0
    if generator.hole_offset is not None:
        stored[generator.hole_offset[: len(stored)].cpu().numpy() < 0] = 0
    return stored


def check_two_stage_parity(scorer: nn.Module, files: dict[str, bytes],
                           histories: np.ndarray, n_random: int = 64, *,
                           stored: np.ndarray | None = None,
                           rows: np.ndarray | None = None) -> float:
    """Return the largest |torch - onnxruntime| over: user . items against G's scores of
    every row (or of ``rows``), and the rescored candidates (random rows, the linked and the
    content rows) against the full scorer's scores at those rows; inf on NaN or a shape
    mismatch. ``stored``: items.npy's array when the caller has it (else read from
    ``files``). ``rows``: the table's rows to compare user . items at (``parity_rows``: a
    delta's changed rows and a sample of the rest; at 1M items the whole table cost ~0.4 s
    of every export); None: every row."""
    import onnxruntime as ort

    scorer = scorer.cpu().eval()
    parts = scorer_parts(scorer)
    history = torch.as_tensor(np.asarray(histories), dtype=torch.int64)  # (B, L)
    if stored is None:  # int8, float16 or float32 rows in the file
        stored = np.load(io.BytesIO(files[TWO_STAGE_ITEMS]), allow_pickle=False)
    table = item_rows(stored) if rows is None else None  # (V+1, D'): all of it, once

    def vectors(ids: np.ndarray) -> np.ndarray:
        """The table's float32 rows at ``ids`` [...] -> [..., D'], as the worker reads them."""
        if table is not None:
            return table[ids]
        flat = item_rows(stored[ids.reshape(-1)])  # (n, D')
        return flat.reshape(*ids.shape, flat.shape[1])

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a check, not a benchmark

    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(files[name], options, providers=["CPUExecutionProvider"])

    user_session = session(TWO_STAGE_USER)
    feed = {TWO_STAGE_USER_INPUT: history.numpy()}
    if TWO_STAGE_USER_VECTORS in {i.name for i in user_session.get_inputs()}:
        feed[TWO_STAGE_USER_VECTORS] = vectors(history.numpy())  # (B, L, D'), as the worker
    shape = link_shape(user_session)  # the links, gathered as the worker gathers them
    links = ({} if shape is None
             else link_inputs(SparseRows.from_files(files), shape, history.numpy()))
    reads = {i.name for i in user_session.get_inputs()}  # the counts: only to rescore
    feed.update({name: value for name, value in links.items() if name in reads})
    user, linked, cold = user_session.run(list(TWO_STAGE_USER_OUTPUTS), feed)
    expected, expected_g = _scores_and_g(scorer, parts.generator, history)  # (B, V+1) each
    if expected_g.shape != (len(history), len(stored)):
        return float("inf")
    held = expected_g[0] > NEG / 10  # (V+1,): not padding, not a freed row (G scores NEG)
    columns = np.arange(len(stored)) if rows is None else rows  # (n,)
    got_g = user @ (table.T if table is not None else vectors(columns).T)  # (B, n)
    if got_g.shape != (len(history), len(columns)) or not np.isfinite(got_g).all():
        return float("inf")
    compared = columns[held[columns]]  # (m,)
    diff = float(np.abs(got_g[:, held[columns]] - expected_g[:, compared]).max(initial=0.0))
    rng = np.random.default_rng(0)
    random_rows = rng.integers(1, len(stored), (len(history), n_random))  # (B, n)
    candidates = np.concatenate([random_rows, linked, cold], axis=1).astype(np.int64)  # (B, C)
    rescore = session(TWO_STAGE_RESCORE)
    reads = {i.name for i in rescore.get_inputs()}  # history is dropped when G alone scores
    feed = {**dict(zip(TWO_STAGE_RESCORE_INPUTS,
                       (history.numpy(), user, candidates, vectors(candidates)), strict=True)),
            **links}
    (scores,) = rescore.run([TWO_STAGE_RESCORE_OUTPUT],
                            {name: value for name, value in feed.items() if name in reads})
    want = np.take_along_axis(expected, candidates, axis=1)  # (B, C)
    live = held[candidates]  # padding and freed rows are never candidates
    if scores.shape != want.shape or not np.isfinite(scores[live]).all():
        return float("inf")
    return max(diff, float(np.abs(scores[live] - want[live]).max(initial=0.0)))


def _scores_and_g(scorer: nn.Module, generator: nn.Module, history: torch.Tensor
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The full scorer's scores of ``history`` [B, L] and G's own, [B, V+1] each, from one
    pass of G where the scorer runs it once (at 1M items a pass is ~0.08 s of an export)."""
    seen: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: Any, out: torch.Tensor) -> None:
        seen.append(out.clone())  # a copy: the scorer may add to G's logits in place

    hook = generator.register_forward_hook(keep)
    try:
        with torch.no_grad():
            scores = scorer(history)  # (B, V+1)
    finally:
        hook.remove()
    if len(seen) != 1 or seen[0].shape != scores.shape:
        with torch.no_grad():
            seen = [generator(history)]  # (B, V+1)
    return scores.numpy(), seen[0].numpy()


def parity_rows(changed: np.ndarray, n_rows: int, n_sample: int = 16384,
                seed: int = 0) -> np.ndarray:
    """The rows a delta bundle's parity check compares: the ``changed`` ones and a random
    ``n_sample`` of the table's ``n_rows`` (ascending, unique, int64). The others are the
    bytes of the bundle the delta extends, checked when it went out, and the user encoder,
    new in every bundle, scores against the sample as it does against the rest."""
    sample = np.random.default_rng(seed).integers(0, n_rows, min(n_sample, n_rows))
    return np.unique(np.concatenate([np.asarray(changed, dtype=np.int64), sample]))
