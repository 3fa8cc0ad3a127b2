"""Leave-one-out ground truth for non-convex models, by paired retraining of many models.

For each seed ``s`` and removed example ``i``, two members share the seed (so the same
initialisation and the same batch order): one trained on all data, one with
``w_i = 0``. With ``normalization="n"`` (the default here, DESIGN.md's view) the
other examples keep weight ``1/n``, so ``score/n`` estimates the change; the
estimate is

    actual[q, j] = (1/S) Σ_s [ m(z_q; θ_{−i_j, s}) − m(z_q; θ_s) ],

with its standard error over seeds. Pairing removes most of the seed-to-seed noise
that dominates a single example's effect on a non-convex model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from headwater.data import DataLike, as_tensors, check_indices, num_examples
from headwater.progress import ProgressFn
from headwater.task import Task
from headwater.train.ensemble import (
    Normalization,
    TrainConfig,
    ensemble_measurements,
    train_ensemble,
)

__all__ = ["RetrainLOOResult", "retrain_leave_one_out"]


@dataclass(frozen=True)
class RetrainLOOResult:
    """``actual[q, j]``: mean over seeds of ``m(z_q; θ_{−i_j}) − m(z_q; θ)`` for
    ``i_j = indices[j]``.

    Attributes:
        actual: ``[n_query, n_removed]``.
        stderr: ``[n_query, n_removed]`` standard error over seeds (NaN for one seed).
        base: ``[n_query]`` mean measurement of the full-data models.
        per_seed: ``[n_seeds, n_query, n_removed]`` paired differences.
        indices: ``[n_removed]``.
    """

    actual: Tensor
    stderr: Tensor
    base: Tensor
    per_seed: Tensor
    indices: Tensor


def retrain_leave_one_out(
    model: nn.Module,
    task: Task,
    train: DataLike,
    query: DataLike,
    indices: Sequence[int] | Tensor,
    *,
    config: TrainConfig | None = None,
    n_seeds: int = 3,
    seed: int = 0,
    store_path: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
) -> RetrainLOOResult:
    """Retrain without each chosen example, ``n_seeds`` paired seeds each, and measure.

    Args:
        model: architecture (``init="reset"``) or start (``init="copy"``, a warm start as
            Koh & Liang 2017 do); never modified.
        task: loss, weight decay and measurement.
        train, query: the data.
        indices: training examples to remove, one at a time.
        config: training; default ``TrainConfig(normalization="n")``.
        n_seeds: paired seeds averaged.
        seed: member seeds are ``seed·10⁶ + s``.
        store_path: folder for the resumable ensemble store.
        progress: optional ``progress(stage, done, total)`` callback.

    Returns:
        :class:`RetrainLOOResult`.

    Raises:
        ValueError: naming ``indices`` or ``n_seeds`` when out of range.
    """
    config = TrainConfig(normalization=Normalization.N) if config is None else config
    n = num_examples(train, "train")
    idx = check_indices(indices, n)
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ValueError(f"n_seeds: must be a positive integer, got {n_seeds!r}")
    k = idx.numel()
    rows = torch.ones(k + 1, n, dtype=torch.float64)  # row 0: all data
    rows[torch.arange(1, k + 1), idx] = 0.0
    weights = rows.repeat(n_seeds, 1)  # [(k+1)*S, n], seed-major
    seeds = [int(seed) * 1_000_000 + s for s in range(n_seeds) for _ in range(k + 1)]
    data = as_tensors(train, "train")
    ensemble = train_ensemble(
        model,
        task,
        data,
        weights,
        config=replace(config),
        seeds=seeds,
        store_path=store_path,
        progress=progress,
    )
    measured = ensemble_measurements(model, task, ensemble, query).reshape(n_seeds, k + 1, -1)
    base = measured[:, 0]  # [S, n_query]
    per_seed = (measured[:, 1:] - base[:, None]).transpose(1, 2)  # [S, n_query, k]
    actual = per_seed.mean(dim=0)
    if n_seeds > 1:
        stderr = per_seed.std(dim=0, unbiased=True) / n_seeds**0.5
    else:
        stderr = torch.full_like(actual, float("nan"))
    return RetrainLOOResult(actual, stderr, base.mean(dim=0), per_seed, idx)
