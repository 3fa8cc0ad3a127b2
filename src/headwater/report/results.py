"""What an attribution run keeps: scores, labels, optional images, settings, timings."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from headwater import store

__all__ = ["RESULT_NAME", "RunResult", "load_result", "save_result", "top_indices"]

RESULT_NAME = "results"
"""Store name (``results.safetensors`` + ``results.json``) inside an output folder."""

_TENSORS = (
    "scores",
    "train_labels",
    "query_labels",
    "query_predictions",
    "self_influence",
    "train_images",
    "query_images",
    "flipped",
)


@dataclass(frozen=True)
class RunResult:
    """One run's attribution output.

    Attributes:
        scores: ``[n_query, n_train]``; ``score[q, i] > 0`` means training example ``i``
            helps query ``q`` (removing it raises ``q``'s loss by about ``score/n``).
        train_labels, query_labels: ``[n_train]``, ``[n_query]`` targets.
        query_predictions: ``[n_query]`` predicted classes (classification), or ``None``.
        self_influence: ``[n_train]``, or ``None``.
        train_images, query_images: ``[n, H, W]`` (larger = darker, as raw digit pixels)
            or ``[n, H, W, 3]`` RGB for image data, as people see them (not standardised
            model inputs), else ``None``.
        flipped: ``[n_train]`` bool, training labels known to be corrupted (demo), or ``None``.
        shown: query indices the report details.
        settings: the estimator's settings (``Scores.settings``).
        config: the run configuration (command, arguments, versions).
        timings: seconds per stage.
        class_names: display names of the classes, or empty.
    """

    scores: Tensor
    train_labels: Tensor
    query_labels: Tensor
    query_predictions: Tensor | None = None
    self_influence: Tensor | None = None
    train_images: Tensor | None = None
    query_images: Tensor | None = None
    flipped: Tensor | None = None
    shown: tuple[int, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.scores.dim() != 2:
            raise ValueError(
                f"scores: expected [n_query, n_train], got shape {tuple(self.scores.shape)}"
            )
        n_query, n_train = self.scores.shape
        if self.train_labels.shape[0] != n_train:
            raise ValueError(
                f"train_labels: expected {n_train} labels, got {self.train_labels.shape[0]}"
            )
        if self.query_labels.shape[0] != n_query:
            raise ValueError(
                f"query_labels: expected {n_query} labels, got {self.query_labels.shape[0]}"
            )
        for q in self.shown:
            if not 0 <= q < n_query:
                raise ValueError(f"shown: query index {q} is outside [0, {n_query})")

    @property
    def n_query(self) -> int:
        return self.scores.shape[0]

    @property
    def n_train(self) -> int:
        return self.scores.shape[1]

    def label_name(self, label: Any) -> str:
        value = label.item() if isinstance(label, Tensor) else label
        if isinstance(value, float) and not value.is_integer():
            return f"{value:.3g}"
        if self.class_names and 0 <= int(value) < len(self.class_names):
            return self.class_names[int(value)]
        return str(int(value)) if isinstance(value, int | float) else str(value)


def top_indices(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Proponents (largest scores) and opponents (smallest) per query, each ``[n_query, k]``
    of training indices, best first."""
    k = min(k, scores.shape[1])
    return scores.topk(k, dim=1).indices, scores.topk(k, dim=1, largest=False).indices


def save_result(folder: str | os.PathLike, result: RunResult) -> Path:
    """Write ``result`` to ``folder/results.{safetensors,json}``; returns the store path."""
    path = Path(folder) / RESULT_NAME
    tensors = {}
    for name in _TENSORS:
        value = getattr(result, name)
        if value is not None:
            tensors[name] = value.detach().cpu()
    meta = {
        "shown": list(result.shown),
        "settings": result.settings,
        "config": result.config,
        "timings": result.timings,
        "class_names": list(result.class_names),
    }
    store.save(path, tensors, meta)
    return path


def load_result(folder: str | os.PathLike) -> RunResult:
    """Read a result written by :func:`save_result`.

    Raises:
        FileNotFoundError: if ``folder`` holds no complete result.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder: {folder} is not a folder with headwater results")
    tensors, meta = store.load(folder / RESULT_NAME)
    missing = [n for n in ("scores", "train_labels", "query_labels") if n not in tensors]
    if missing:
        raise ValueError(f"folder: the results in {folder} lack {missing}")
    fields = {f.name for f in dataclasses.fields(RunResult)}
    kwargs: dict[str, Any] = {k: v for k, v in tensors.items() if k in fields}
    if "flipped" in kwargs:
        kwargs["flipped"] = kwargs["flipped"].to(torch.bool)
    return RunResult(
        **kwargs,
        shown=tuple(int(q) for q in meta.get("shown", ())),
        settings=meta.get("settings", {}),
        config=meta.get("config", {}),
        timings={k: float(v) for k, v in meta.get("timings", {}).items()},
        class_names=tuple(meta.get("class_names", ())),
    )
