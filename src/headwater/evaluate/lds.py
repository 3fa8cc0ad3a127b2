"""Linear Datamodeling Score (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale").

Draw ``m`` random subsets ``S_j`` of the training set, each of ``round(alpha·n)``
examples (seeded), retrain on each (optionally several seeds, averaged), and
measure every query: ``actual[j, q] = m(z_q; θ_{S_j})``. An attribution predicts
the subset's output additively. With headwater's convention (DESIGN.md) removing
example ``i`` changes ``m`` by ``+score[q, i]/n``, so *including* it changes ``m``
by ``−score[q, i]/n`` and the linear prediction is

    predicted[j, q] = const − (1/n) Σ_{i∈S_j} score[q, i].

The LDS of query ``q`` is the Spearman rank correlation over the ``m`` subsets
between ``predicted[:, q]`` and ``actual[:, q]`` (so ``const`` and ``1/n`` do not
matter); the reported LDS is its mean over queries, with the standard error of
that mean. A sign error turns the LDS negative.

The ground truth is measured with ``task.measurement``; Park et al. use the
correct-class margin for classification: pass
``ClassificationTask(measurement="margin")`` both here and to the estimator.
It is cached in the store keyed by everything that determines it (data, task,
training configuration, subsets, seeds), so every estimator is compared with the
same retrained models.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from headwater.data import DataLike, as_tensors, num_examples
from headwater.progress import ProgressFn
from headwater.store.cached import cached_tensors, fingerprint
from headwater.task import Task
from headwater.train.ensemble import TrainConfig, ensemble_measurements, train_ensemble

__all__ = [
    "LDSGroundTruth",
    "LDSResult",
    "lds",
    "lds_ground_truth",
    "settings_key",
    "spearman_rows",
    "subset_masks",
]


@dataclass(frozen=True)
class LDSGroundTruth:
    """Retrained measurements on random subsets.

    Attributes:
        masks: ``[m, n_train]`` bool, subset ``j`` keeps the examples marked True.
        actual: ``[m, n_query]`` measurement of each query after training on subset ``j``
            (mean over seeds).
        per_seed: ``[m, seeds_per_subset, n_query]``.
        settings: everything that determined it.
    """

    masks: Tensor
    actual: Tensor
    per_seed: Tensor
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LDSResult:
    """``mean`` ± ``stderr`` of the per-query Spearman correlations ``per_query [n_query]``
    (queries whose actual output is constant over subsets are NaN and left out)."""

    mean: float
    stderr: float
    per_query: Tensor


def subset_masks(n_train: int, n_subsets: int, alpha: float, seed: int) -> Tensor:
    """``[n_subsets, n_train]`` bool masks, each with exactly ``round(alpha·n_train)`` True
    entries drawn uniformly without replacement (``torch.Generator`` seeded by ``seed``).

    Raises:
        ValueError: naming ``alpha`` or ``n_subsets`` when out of range.
    """
    if not isinstance(alpha, int | float) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: must lie in (0, 1), got {alpha!r}")
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, int) or n_subsets < 2:
        raise ValueError(
            f"n_subsets: must be an integer >= 2 (a rank correlation), got {n_subsets!r}"
        )
    size = round(alpha * n_train)
    if not 0 < size < n_train:
        raise ValueError(
            f"alpha: alpha * n_train = {alpha * n_train:g} leaves an empty or full subset"
        )
    gen = torch.Generator().manual_seed(int(seed))
    masks = torch.zeros(n_subsets, n_train, dtype=torch.bool)
    for j in range(n_subsets):
        masks[j, torch.randperm(n_train, generator=gen)[:size]] = True
    return masks


def lds_ground_truth(
    model: nn.Module,
    task: Task,
    train: DataLike,
    query: DataLike,
    *,
    n_subsets: int = 100,
    alpha: float = 0.5,
    seeds_per_subset: int = 1,
    seed: int = 0,
    config: TrainConfig | None = None,
    store_dir: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
) -> LDSGroundTruth:
    """Retrain on ``n_subsets`` random subsets and measure every query.

    Each subset is trained ``seeds_per_subset`` times by
    :func:`~headwater.train.ensemble.train_ensemble` (member seeds
    ``seed·10⁶ + k``), with the weighted-mean objective on the subset (subset mask as
    weights, ``config.normalization``). For a convex model pass
    ``TrainConfig(optimizer="lbfgs", init="copy")`` for exact optima.

    Args:
        model: the architecture / trained model (never modified).
        task: loss, weight decay and the measurement of the queries.
        train, query: the data (``(inputs, targets)``, Dataset or DataLoader).
        n_subsets: ``m``, number of random subsets.
        alpha: subset fraction.
        seeds_per_subset: independent retrainings averaged per subset.
        seed: seeds the subsets and the members.
        config: training of each member; default ``TrainConfig()``.
        store_dir: folder of the cache; the ground truth (and the models, resumably)
            are stored under a key of every setting; a rerun loads it.
        progress: optional ``progress(stage, done, total)`` callback.

    Returns:
        :class:`LDSGroundTruth`.
    """
    config = TrainConfig() if config is None else config
    if (
        isinstance(seeds_per_subset, bool)
        or not isinstance(seeds_per_subset, int)
        or seeds_per_subset < 1
    ):
        raise ValueError(f"seeds_per_subset: must be a positive integer, got {seeds_per_subset!r}")
    n = num_examples(train, "train")
    masks = subset_masks(n, n_subsets, alpha, seed)
    x_q, y_q = as_tensors(query, "query")
    x_t, y_t = as_tensors(train, "train")
    settings = {
        "kind": "lds_ground_truth",
        "n_subsets": n_subsets,
        "alpha": float(alpha),
        "seeds_per_subset": seeds_per_subset,
        "seed": int(seed),
        "config": config.to_dict(),
        "task": task.to_dict(),
        "train": fingerprint(x_t, y_t),
        "query": fingerprint(x_q, y_q),
        "model": _model_key(model, config),
    }
    path = None if store_dir is None else Path(store_dir) / f"lds-{settings_key(settings)}"

    def retrain() -> dict[str, Tensor]:
        weights = masks.repeat_interleave(seeds_per_subset, dim=0)  # [m*s, n]
        member_seeds = [int(seed) * 1_000_000 + k for k in range(weights.shape[0])]
        ensemble = train_ensemble(
            model,
            task,
            (x_t, y_t),
            weights,
            config=config,
            seeds=member_seeds,
            store_path=None if path is None else path.with_name(path.name + ".models"),
            progress=progress,
        )
        measured = ensemble_measurements(model, task, ensemble, (x_q, y_q))  # [m*s, n_query]
        per_seed = measured.reshape(n_subsets, seeds_per_subset, -1)
        return {
            "masks": masks.to(torch.uint8),
            "actual": per_seed.mean(dim=1),
            "per_seed": per_seed,
        }

    tensors = cached_tensors(path, settings, retrain)
    return LDSGroundTruth(tensors["masks"].bool(), tensors["actual"], tensors["per_seed"], settings)


def settings_key(settings: dict[str, Any]) -> str:
    """A short hash of JSON settings (store file names)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _model_key(model: nn.Module, config: TrainConfig) -> str:
    """The architecture always; the values too when members start from them."""
    state = model.state_dict()
    names = ",".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in state.items())
    if config.to_dict()["init"] == "copy":
        return names + "|" + fingerprint(*state.values())
    return names


def spearman_rows(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` (``[R, m]`` each);
    ties get average ranks; a constant row gives NaN."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(
            f"expected two [R, m] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    ra = torch.from_numpy(rankdata(a.detach().cpu().double().numpy(), axis=1))
    rb = torch.from_numpy(rankdata(b.detach().cpu().double().numpy(), axis=1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = ra.norm(dim=1) * rb.norm(dim=1)
    out = (ra * rb).sum(dim=1) / denom
    return torch.where(denom > 0, out, torch.full_like(out, float("nan")))


def lds(scores: Tensor, ground_truth: LDSGroundTruth) -> LDSResult:
    """The Linear Datamodeling Score of ``scores [n_query, n_train]`` (module docstring).

    ``predicted[j, q] = −Σ_{i∈S_j} score[q, i]`` (headwater's sign: ``score/n`` is the
    change from *removing* ``i``), Spearman against ``ground_truth.actual[:, q]`` over
    the subsets, averaged over queries.

    Raises:
        ValueError: naming ``scores`` if its shape does not match the ground truth.
    """
    if not isinstance(scores, Tensor):
        raise TypeError(
            f"scores: expected a Tensor [n_query, n_train], got {type(scores).__name__}"
        )
    n_query = ground_truth.actual.shape[1]
    n_train = ground_truth.masks.shape[1]
    if scores.shape != (n_query, n_train):
        raise ValueError(
            f"scores: expected shape [{n_query}, {n_train}] (n_query, n_train) to match the "
            f"ground truth, got {tuple(scores.shape)}"
        )
    if not torch.isfinite(scores).all():
        raise ValueError("scores: contains NaN/inf")
    masks = ground_truth.masks.to(torch.float64)
    predicted = -(masks @ scores.detach().cpu().double().T)  # [m, n_query]
    per_query = spearman_rows(predicted.T, ground_truth.actual.detach().cpu().double().T)
    valid = per_query[~torch.isnan(per_query)]
    if valid.numel() == 0:
        raise ValueError("ground_truth: every query's actual output is constant over the subsets")
    mean = float(valid.mean())
    stderr = (
        float(valid.std(unbiased=True) / np.sqrt(valid.numel()))
        if valid.numel() > 1
        else float("nan")
    )
    return LDSResult(mean, stderr, per_query)
