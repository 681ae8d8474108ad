"""Trainer checkpoints: the learner's full state in one file, replaced atomically."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from trainer.learner import OnlineLearner

__all__ = ["load_checkpoint", "load_checkpoint_with_detector", "read_extra", "save_checkpoint"]

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path | str, learner: OnlineLearner,
                    extra: dict[str, Any] | None = None,
                    detector: dict[str, Any] | None = None) -> None:
    """Write the learner's state (and ``extra``: plain values only; ``detector``: the
    training filter's ``state_dict``, when it runs) to ``path`` atomically.

    The file is written under a temporary name, fsynced, then renamed over ``path``, so a
    crash mid-save leaves the previous checkpoint intact. ``extra`` also goes to
    ``<path>.json``, written the same way after it, so ``read_extra`` need not load the
    model to tell where a checkpoint resumes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the learner's own tensors: serialized here, before it trains again
    payload = {"format": CHECKPOINT_FORMAT, "learner": learner.state_dict(keep=False),
               "extra": dict(extra or {}), "detector": detector}
    _replace(path, lambda fh: torch.save(payload, fh))
    _replace(_extra_path(path), lambda fh: fh.write(json.dumps(dict(extra or {})).encode()))


def _extra_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.json")


def _replace(path: Path, write: Any) -> None:
    """Write ``path`` atomically: a temporary name unique to this call, fsync, rename."""
    # a unique name, not the pid: two containers sharing a volume may both run as pid 1
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def read_extra(path: Path | str) -> dict[str, Any]:
    """Return the ``extra`` of the checkpoint at ``path`` (from its JSON beside it if it is
    as new as the checkpoint, else from the checkpoint itself)."""
    path = Path(path)
    side = _extra_path(path)
    if side.exists() and side.stat().st_mtime_ns >= path.stat().st_mtime_ns:
        return json.loads(side.read_text())
    return load_checkpoint(path)[1]


def load_checkpoint(path: Path | str, *,
                    device: str | None = None) -> tuple[OnlineLearner, dict[str, Any]]:
    """Read a checkpoint: return the resumed learner and the ``extra`` saved with it.

    ``device`` overrides the saved one (e.g. "cpu" for a checkpoint made on a GPU).
    """
    learner, extra, _ = load_checkpoint_with_detector(path, device=device)
    return learner, extra


def load_checkpoint_with_detector(path: Path | str, *, device: str | None = None
                                  ) -> tuple[OnlineLearner, dict[str, Any], dict[str, Any] | None]:
    """``load_checkpoint``, and the training filter's state (None: the detector was off)."""
    # weights_only: a checkpoint holds tensors and plain values, never code to run
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an advrec trainer checkpoint (format "
                         f"{payload.get('format') if isinstance(payload, dict) else None!r})")
    state = payload["learner"]
    if device is not None:
        state = dict(state, train_config=dict(state["train_config"], device=device))
    return (OnlineLearner.from_state_dict(state, keep=False), payload["extra"],
            payload.get("detector"))
