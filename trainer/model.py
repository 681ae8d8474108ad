"""The networks: a SASRec-like generator G that scores every item, and a small discriminator D.

Histories are item rows, oldest first, left-padded with 0, so the newest item always sits at
the last position. G's item table is tied by default: the same rows embed the history and
score the candidates (``ModelConfig.tied_output=False`` gives the scorer its own table, and
``item_bias`` adds a learned per-item offset to the scores). All item tables have a capacity
larger than the live vocabulary (``n_items``) so that most vocabulary growth is a counter
bump; only when capacity runs out is a table reallocated, and then the optimizer must be
told (``replace_param``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NEG",
    "Discriminator",
    "Generator",
    "LazyAdam",
    "ModelConfig",
    "attention_bias",
    "replace_param",
    "trim_padding",
]

# A finite "minus infinity": -inf becomes NaN as soon as it meets a 0 (0 * -inf, a softmax
# over a row of -inf); -1e9 still gets exactly 0 probability in a float32 softmax.
NEG = -1e9


def static_dim(x: torch.Tensor, dim: int) -> int:
    """Return ``x.shape[dim]`` as a plain int, also while being traced for ONNX export.

    Only the batch axis of the exported graph is dynamic; every other size is fixed (L, D,
    heads). A traced size would be exported as Shape/Gather/Unsqueeze/Concat chains that
    onnxruntime does not fold (142 nodes after its optimizer instead of 74), each one paid
    on every served call. Never use it for the batch axis: write -1 there.
    """
    return int(x.shape[dim])


# ---------------------------------------------------------------------------- blocks


def attention_bias(history: torch.Tensor) -> torch.Tensor:
    """Return the additive attention mask [B, 1, L, L]: causal, padding keys hidden.

    The diagonal is never masked, so a padded query (left padding, or an empty history)
    still attends to itself: masking causal and key padding separately leaves such rows
    with no key at all, and softmax over nothing is NaN in torch and in onnxruntime.
    Built from comparisons of ``arange`` (no ``torch.eye(dtype=bool)``, which exports to
    an op onnxruntime lacks).
    """
    pos = torch.arange(static_dim(history, 1), device=history.device)  # (L,)
    causal = pos.unsqueeze(0) <= pos.unsqueeze(1)  # (L, L): key j <= query i
    diag = pos.unsqueeze(0) == pos.unsqueeze(1)  # (L, L)
    valid_key = (history > 0).unsqueeze(1)  # (B, 1, L)
    allowed = causal.unsqueeze(0) & (valid_key | diag.unsqueeze(0))  # (B, L, L)
    zero = torch.zeros((), dtype=torch.float32, device=history.device)
    neg = torch.full((), NEG, dtype=torch.float32, device=history.device)
    return torch.where(allowed, zero, neg).unsqueeze(1)  # (B, 1, L, L)


class Dropout(nn.Module):
    """Inverted dropout with a float mask: fwd+bwd 13 ms vs nn.Dropout's 22 (512x50x64, CPU)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # 0 or 1/(1-p)
        return x * keep


def trim_padding(history: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns that are padding in every row: [B, L] -> [B, L'] (L' >= 1).

    Exact for G and D (padded keys are masked, positions count from the right) and makes
    a batch of short histories cost what its longest history costs.
    """
    used = (history > 0).any(dim=0)  # (L,)
    first = int(used.float().argmax()) if bool(used.any()) else history.shape[1] - 1
    return history[:, first:]  # (B, L')


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive mask.

    No dropout on the attention weights: on CPU drawing the [B, nh, L, L] mask cost as much
    as the attention itself and knocked ``scaled_dot_product_attention`` off its fused
    kernel (3.6x slower, fwd+bwd at B=512, L=50); residual and embedding dropout remain.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        assert d_model % n_heads == 0, f"d_model {d_model} not divisible by n_heads {n_heads}"
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Attend over ``x`` [B, L, D]; with ``last_only`` compute only the last query."""
        L, D = static_dim(x, 1), static_dim(x, 2)
        nh, hs = self.n_heads, D // self.n_heads
        if last_only:
            # only the newest position is scored: its query alone, keys/values of all (~40%
            # less work in the top block)
            w_q, w_kv = self.qkv.weight.split((D, 2 * D))
            b_q, b_kv = self.qkv.bias.split((D, 2 * D))
            q = F.linear(x[:, -1:], w_q, b_q)  # (B, 1, D)
            k, v = F.linear(x, w_kv, b_kv).split(D, dim=2)  # (B, L, D) each
            bias = bias[:, :, -1:, :]  # (B, 1, 1, L)
        else:
            q, k, v = self.qkv(x).split(D, dim=2)  # (B, L, D) each
        T = static_dim(q, 1)
        q = q.view(-1, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(-1, L, nh, hs).transpose(1, 2)  # (B, nh, L, hs)
        v = v.view(-1, L, nh, hs).transpose(1, 2)  # (B, nh, L, hs)
        # the scale given as a number: derived inside the op it exports as Shape/Sqrt/Div
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           scale=hs**-0.5)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(-1, T, D)  # (B, T, D)
        return self.resid_drop(self.proj(y))


class FeedForward(nn.Module):
    """Position-wise two-layer MLP."""

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.out = nn.Linear(hidden, d_model)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, d_model: int, n_heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, hidden, dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Return [B, L, D], or [B, 1, D] for the last position only."""
        residual = x[:, -1:] if last_only else x
        x = residual + self.attn(self.ln1(x), bias, last_only)
        return x + self.ff(self.ln2(x))


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelConfig:
    """Shape of G and D; ``n_items`` is the initial table capacity, not the vocabulary."""

    n_items: int = 1024  # rows reserved up front; tables double when the vocabulary outgrows them
    # history length L (SASRec uses 50 on ML-1M); online, 20 learned as well as 50 at 40% of
    # the cost, which buys more update steps (docs/results.md)
    max_len: int = 20
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    ffn_mult: int = 1  # SASRec's FFN is d->d (nanoGPT uses 4x); 1 keeps CPU training cheap
    dropout: float = 0.1  # 0.1 and 0.2 measured alike, 0.0 worse (docs/results.md)
    init_std: float = 0.02  # new item rows start this small, so they enter no top-k by chance
    d_disc: int = 32  # D is deliberately small: IRGAN may cost at most 2x plain training
    # a learned per-item score offset (popularity) added to every item's logit
    item_bias: bool = False
    # score candidates with their own output table instead of the input (history) table
    tied_output: bool = True

    def __post_init__(self) -> None:
        assert self.n_items >= 1, f"n_items must be >= 1, got {self.n_items}"
        assert self.max_len >= 1, f"max_len must be >= 1, got {self.max_len}"
        assert self.d_model % self.n_heads == 0, (
            f"d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        assert 0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"


# ---------------------------------------------------------------------------- growable tables


class _ItemTable(nn.Module):
    """An item embedding with spare capacity; rows ``1..n_items`` are live, row 0 is padding."""

    def __init__(self, capacity: int, dim: int, init_std: float) -> None:
        super().__init__()
        self.init_std = init_std
        self.n_items = 0
        self.emb = nn.Embedding(capacity + 1, dim, padding_idx=0)
        nn.init.normal_(self.emb.weight, std=init_std)
        with torch.no_grad():
            self.emb.weight[0].zero_()

    @property
    def capacity(self) -> int:
        return self.emb.num_embeddings - 1

    @property
    def sparse(self) -> bool:
        """Whether lookups give sparse gradients (only the rows looked up; see
        ``LazyAdam``): what keeps a step's cost off the table's size under sampled softmax."""
        return self.emb.sparse

    @sparse.setter
    def sparse(self, on: bool) -> None:
        self.emb.sparse = on

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Look up rows ``ids`` [...] -> [..., dim], sparse gradients when ``sparse``."""
        return self.emb(ids)

    def grow(self, n_new: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Make ``n_new`` more rows live; return (old, new) parameters if reallocated."""
        assert n_new >= 0, n_new
        need = self.n_items + n_new
        replaced: list[tuple[nn.Parameter, nn.Parameter]] = []
        if need > self.capacity:
            old = self.emb.weight
            capacity = max(need, 2 * self.capacity)
            emb = nn.Embedding(capacity + 1, old.shape[1], padding_idx=0,
                               device=old.device, dtype=old.dtype, sparse=self.emb.sparse)
            with torch.no_grad():
                nn.init.normal_(emb.weight, std=self.init_std)
                emb.weight[: old.shape[0]] = old
                emb.weight[0].zero_()
            self.emb = emb
            replaced.append((old, emb.weight))
        self.n_items = need
        return replaced

    def reset(self, rows: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Start ``rows`` [N] afresh (a freed vocabulary row): new initial values, and
        Adam's moments of those rows at zero, so that no step moves them until they are
        trained again."""
        weight = self.emb.weight
        with torch.no_grad():
            weight[rows] = torch.randn(len(rows), weight.shape[1], device=weight.device,
                                       dtype=weight.dtype) * self.init_std
        for value in optimizer.state.get(weight, {}).values():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == weight.shape[0]:
                value[rows] = 0

    def resize(self, capacity: int) -> None:
        """Reallocate to exactly ``capacity`` rows (before loading a saved state)."""
        old = self.emb.weight
        self.emb = nn.Embedding(capacity + 1, old.shape[1], padding_idx=0,
                                device=old.device, dtype=old.dtype, sparse=self.emb.sparse)


# ---------------------------------------------------------------------------- generator


class Generator(nn.Module):
    """SASRec-like next-item model: history rows [B, L] -> scores over every item [B, V+1]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        D = config.d_model
        self.items = _ItemTable(config.n_items, D, config.init_std)
        # optional per-item output parts; every item table grows in lock-step with ``items``
        self.out_items = (None if config.tied_output
                          else _ItemTable(config.n_items, D, config.init_std))
        self.out_bias = _ItemTable(config.n_items, 1, 0.0) if config.item_bias else None
        self.pos_emb = nn.Embedding(config.max_len + 1, D, padding_idx=0)  # 0 = padding
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(D, config.n_heads, config.ffn_mult * D, config.dropout)
            for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(D)
        self.emb_scale = math.sqrt(D)
        for name, p in self.named_parameters():
            if name.startswith(("items.", "out_items.", "out_bias.")):
                continue  # item tables initialise themselves (and keep row 0 at zero)
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=config.init_std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        with torch.no_grad():
            self.pos_emb.weight[0].zero_()
        # NEG at the rows the vocabulary freed (``set_holes``), 0 elsewhere, over the
        # tables' capacity; None while there are none. Not saved: the vocabulary says.
        self.register_buffer("hole_offset", None, persistent=False)

    @property
    def n_items(self) -> int:
        """Number of live items V (the vocabulary size, freed rows included)."""
        return self.items.n_items

    def set_holes(self, rows: list[int]) -> None:
        """Score ``rows`` (freed vocabulary rows) ``NEG`` until they are reused."""
        if not rows:
            self.hole_offset = None
            return
        weight = self.items.emb.weight
        offset = torch.zeros(weight.shape[0], device=weight.device)  # (cap+1,)
        offset[torch.as_tensor(rows, dtype=torch.int64, device=weight.device)] = NEG
        self.hole_offset = offset

    def reset_rows(self, rows: np.ndarray, optimizer: torch.optim.Optimizer) -> None:
        """Start the item rows ``rows`` afresh in every item table (``_ItemTable.reset``)."""
        idx = torch.as_tensor(rows, dtype=torch.int64, device=self.items.emb.weight.device)
        for table in self.item_tables():
            table.reset(idx, optimizer)

    def item_tables(self) -> list[_ItemTable]:
        """Return every per-item table: input rows, then the optional output rows and bias."""
        return [t for t in (self.items, self.out_items, self.out_bias) if t is not None]

    def live_copy(self, rows: list[torch.Tensor] | None = None) -> Generator:
        """A deep copy whose item tables hold rows 0..V only, no spare capacity (frozen:
        what ranks needs; at 1M items the capacity doubles what a deep copy clones).
        ``rows``: each item table's rows [V+1, dim] (``item_tables``' order) to take as
        they are instead of cloning G's."""
        n = self.n_items + 1
        tables = self.item_tables()
        if rows is None:
            rows = [t.emb.weight.detach()[:n].clone() for t in tables]
        assert [tuple(r.shape) for r in rows] == [(n, t.emb.weight.shape[1]) for t in tables]
        memo: dict[int, Any] = {id(t.emb.weight): nn.Parameter(r, requires_grad=False)
                                for t, r in zip(tables, rows, strict=True)}
        twin = copy.deepcopy(self, memo)
        for table in twin.item_tables():
            table.emb = nn.Embedding.from_pretrained(table.emb.weight.detach(), freeze=True,
                                                     padding_idx=0)
        return twin

    def grow(self, n_new: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Add ``n_new`` item rows keeping learned ones; return replaced parameters."""
        return [pair for table in self.item_tables() for pair in table.grow(n_new)]

    def set_sparse(self, on: bool) -> None:
        """Give every item table sparse gradients (sampled softmax) or dense ones."""
        for table in self.item_tables():
            table.sparse = on

    def candidate_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The scoring rows of candidates ``ids`` [...] -> [..., D] (sparse gradients when
        the tables are: sampled softmax scores a few rows, and touches only those)."""
        return (self.items if self.out_items is None else self.out_items).rows(ids)

    def item_table(self) -> torch.Tensor:
        """Return the live rows [V+1, D] that score candidates, row 0 (padding) included."""
        table = self.items if self.out_items is None else self.out_items
        return table.emb.weight[: self.n_items + 1]  # (V+1, D)

    def item_bias(self) -> torch.Tensor | None:
        """Return the live per-item score offsets [V+1] (row 0 is 0), or None without them."""
        if self.out_bias is None:
            return None
        return self.out_bias.emb.weight[: self.n_items + 1, 0]  # (V+1,)

    def embed(self, history: torch.Tensor) -> torch.Tensor:
        """Return the input embeddings of a history [B, L] -> [B, L, D] (what APR perturbs)."""
        # scaled by sqrt(D) as in SASRec: rows start at norm ~0.16 (std 0.02, D=64), and
        # the inputs then outweigh the position embeddings and sit on the scale APR's
        # epsilon ~1 is meant for
        return self.items.emb(history) * self.emb_scale  # (B, L, D)

    def _encode(self, history: torch.Tensor, emb: torch.Tensor | None,
                last_only: bool) -> torch.Tensor:
        L = static_dim(history, 1)
        assert L <= self.config.max_len, f"history length {L} > max_len {self.config.max_len}"
        if emb is None:
            emb = self.embed(history)  # (B, L, D)
        valid = (history > 0).long()  # (B, L)
        # positions 1..max_len, zeroed under padding; with left padding the newest item is
        # always at position max_len, so positions count back from the most recent click.
        # A history trimmed of all-padding columns (trim_padding) keeps the same positions.
        first = self.config.max_len - L + 1
        pos = torch.arange(first, first + L, device=history.device).unsqueeze(0) * valid  # (B, L)
        x = self.drop(emb + self.pos_emb(pos))  # (B, L, D)
        bias = attention_bias(history)  # (B, 1, L, L)
        for i, block in enumerate(self.blocks):
            x = block(x, bias, last_only=last_only and i == len(self.blocks) - 1)
        return self.ln_f(x)  # (B, L, D) or (B, 1, D)

    def encode(self, history: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """Return the hidden state of every position [B, L, D]."""
        return self._encode(history, emb, last_only=False)

    def last_hidden(self, history: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """Return the newest position's hidden state [B, D] (equals ``encode(...)[:, -1]``)."""
        return self._encode(history, emb, last_only=True)[:, 0]  # (B, D)

    def score(self, hidden: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Score every item: hidden [B, D] -> [B, V+1], padding column set to ``NEG``."""
        table = self.item_table() if table is None else table  # (V+1, D)
        # the padding column gets NEG through the bias of one fused matmul: concatenating a
        # column onto [B, V] copied the whole score matrix (~12% of a training step)
        item_bias = self.item_bias()  # (V+1,) or None
        offset = torch.zeros_like(table[:, 0]) if item_bias is None else item_bias  # (V+1,)
        offset = torch.cat([torch.full_like(offset[:1], NEG), offset[1:]])  # (V+1,)
        if self.hole_offset is not None:
            offset = offset + self.hole_offset[: static_dim(offset, 0)]  # (V+1,)
        return F.linear(hidden, table, offset)  # (B, V+1)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """Score every item for each history: [B, L] int64 -> [B, V+1] float32."""
        return self.score(self.last_hidden(history))

    def forward_from_embeddings(self, emb: torch.Tensor, history: torch.Tensor,
                                table: torch.Tensor | None = None) -> torch.Tensor:
        """Score from given (e.g. perturbed) input embeddings [B, L, D] -> [B, V+1]."""
        return self.score(self.last_hidden(history, emb), table)

    def resize(self, capacity: int, n_items: int) -> None:
        """Reshape the item tables to a saved capacity before ``load_state_dict``."""
        for table in self.item_tables():
            table.resize(capacity)
            table.n_items = n_items


# ---------------------------------------------------------------------------- discriminator


class Discriminator(nn.Module):
    """Score (history, item) pairs: logit that the item is the real next click.

    A factorisation model, as IRGAN's item recommender uses: the history is pooled (mean
    of its items plus a projection of the newest one) and dotted with the candidate's own
    embedding, plus a per-item bias. Cheap by design: IRGAN may cost at most 2x ``none``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_disc
        # rows start larger than G's (0.1 vs 0.02): D's logits are plain dot products and
        # must separate real from fake within its first batches; last column: item bias
        self.items = _ItemTable(config.n_items, d + 1, 0.1)
        self.last_proj = nn.Linear(d, d)  # the newest item says most about the next one
        self.bias = nn.Parameter(torch.zeros(()))

    @property
    def n_items(self) -> int:
        return self.items.n_items

    def grow(self, n_new: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Add ``n_new`` item rows keeping learned ones; return replaced parameters."""
        return self.items.grow(n_new)

    def set_sparse(self, on: bool) -> None:
        """Give the item table sparse gradients (sampled softmax) or dense ones."""
        self.items.sparse = on

    def reset_rows(self, rows: np.ndarray, optimizer: torch.optim.Optimizer) -> None:
        """Start the item rows ``rows`` afresh (``_ItemTable.reset``)."""
        self.items.reset(torch.as_tensor(rows, dtype=torch.int64,
                                         device=self.items.emb.weight.device), optimizer)

    def resize(self, capacity: int, n_items: int) -> None:
        """Reshape the item table to a saved capacity before ``load_state_dict``."""
        self.items.resize(capacity)
        self.items.n_items = n_items

    def forward(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Return logits [B, K] for history [B, L] and candidate rows [B, K]."""
        d = self.config.d_disc
        emb = self.items.emb(history)[..., :d]  # (B, L, d)
        valid = (history > 0).unsqueeze(-1).to(emb.dtype)  # (B, L, 1)
        mean = (emb * valid).sum(1) / valid.sum(1).clamp(min=1.0)  # (B, d); 0 if empty
        ctx = mean + self.last_proj(emb[:, -1])  # (B, d)
        cand = self.items.emb(items)  # (B, K, d+1)
        dot = (cand[..., :d] @ ctx.unsqueeze(-1)).squeeze(-1)  # (B, K)
        return dot + cand[..., d] + self.bias  # (B, K)


# ---------------------------------------------------------------------------- optimizer


def replace_param(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter) -> None:
    """Swap a reallocated table into ``optimizer``, zero-padding its per-row state (moments)."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    grown = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape[:1] == old.shape[:1] and value.dim() >= 1:
            pad = value.new_zeros((new.shape[0] - old.shape[0], *value.shape[1:]))
            value = torch.cat([value, pad], dim=0)
        grown[key] = value
    optimizer.state[new] = grown


class LazyAdam(torch.optim.Adam):
    """Adam that also takes sparse gradients: a table whose gradient is sparse (a lookup with
    ``sparse=True``) has only the rows looked up stepped, their moments updated and the
    others' left as they are (the "lazy" Adam of large embedding tables), so a step costs
    the rows a batch touches, not the table. Dense gradients step exactly as ``Adam``; the
    state keeps Adam's keys, so a checkpoint of one loads into the other and a table may
    switch between dense and sparse gradients (full and sampled softmax) as it grows.
    """

    @torch.no_grad()
    def step(self, closure: object = None) -> None:  # type: ignore[override]
        assert closure is None, "LazyAdam takes no closure"
        sparse = [(group, p) for group in self.param_groups for p in group["params"]
                  if p.grad is not None and p.grad.is_sparse]
        grads = [p.grad for _, p in sparse]
        for _, p in sparse:
            p.grad = None  # Adam skips them
        super().step()
        for (group, p), grad in zip(sparse, grads, strict=True):
            self._sparse_step(group, p, grad)
            p.grad = grad

    def _sparse_step(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        assert not group["amsgrad"] and not group["maximize"], "LazyAdam: plain Adam only"
        grad = grad.coalesce()
        idx, val = grad.indices()[0], grad.values()  # (K,), (K, ...)
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = float(state["step"])
        (b1, b2), lr, eps = group["betas"], float(group["lr"]), group["eps"]
        if group["weight_decay"]:
            val = val.add(p[idx], alpha=group["weight_decay"])
        m = state["exp_avg"][idx].mul_(b1).add_(val, alpha=1 - b1)  # (K, ...)
        v = state["exp_avg_sq"][idx].mul_(b2).addcmul_(val, val, value=1 - b2)  # (K, ...)
        state["exp_avg"][idx] = m
        state["exp_avg_sq"][idx] = v
        denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)  # (K, ...)
        p.index_add_(0, idx, m.div_(denom), alpha=-lr / (1 - b1 ** t))
