"""Automatic damping selection against a few cheap ground-truth retrainings.

Influence scores depend strongly on the damping ``λ`` of ``(M + λI)⁻¹``: too small
and the low-curvature directions (noisy, badly estimated, or negative for a
Hessian) dominate; too large and the scores collapse to gradient similarity.
:func:`select_damping` removes a small held-out sample of training examples,
measures the actual change of every query's measurement (leave-one-out by real
retraining, or any precomputed ground truth such as the PBRF of Bae et al. 2022),
and for every candidate ``λ`` compares it with the first-order prediction

    predicted[q, j] = score_λ[q, i_j] / n = ∇m(z_q)ᵀ (M + λI)⁻¹ ∇ℓ(z_{i_j}) / n,

the sign and scale of DESIGN.md. Agreement is the Pearson (or Spearman)
correlation over the removed examples, averaged over queries (Koh & Liang 2017
compare LOO this way); the curve ``λ -> agreement`` is returned with its argmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from headwater.curvature import CURVATURES, Curvature
from headwater.curvature.base import check_damping
from headwater.data import DataLike, num_examples, subset
from headwater.evaluate.loo import LOOResult, TrainFn, leave_one_out
from headwater.gradients.per_example import Objective, stack_gradients
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = ["Agreement", "DampingCurve", "GroundTruth", "select_damping"]


class Agreement(str, Enum):
    """Correlation between predicted and actual changes, per query."""

    PEARSON = "pearson"
    SPEARMAN = "spearman"


@dataclass(frozen=True)
class GroundTruth:
    """Actual changes of the query measurements when training examples are removed.

    Attributes:
        actual: ``[n_query, n_removed]``, ``m(z_q; θ_{−i_j}) − m(z_q; θ)``.
        indices: ``[n_removed]`` removed training examples.
        model: the model at which influence is computed (LOO's full-data retrain,
            or the trained model for PBRF).
    """

    actual: Tensor
    indices: Tensor
    model: nn.Module

    @classmethod
    def from_loo(cls, result: LOOResult) -> GroundTruth:
        """From :func:`headwater.evaluate.leave_one_out` (influence at its ``base_model``)."""
        return cls(result.actual, result.indices, result.base_model)

    @classmethod
    def from_pbrf(cls, result: Any, model: nn.Module) -> GroundTruth:
        """From ``headwater.evaluate.pbrf`` (its ``response``, ``indices``) at the trained ``model``.

        Compute the PBRF at one *fixed* proximity damping: the PBRF at ``λ`` is what
        influence at ``λ`` approximates, so comparing each candidate with its own
        PBRF would only measure linearisation error.
        """
        return cls(result.response, result.indices, model)


@dataclass(frozen=True)
class DampingCurve:
    """Agreement of influence with the ground truth as a function of the damping.

    Attributes:
        dampings: ``[D]`` candidates, as given.
        agreement: ``[D]`` mean over queries of the per-query correlation (NaN rows,
            e.g. a query whose actual changes are all equal, are skipped).
        per_query: ``[D, n_query]`` the per-query correlations.
        best: the candidate with the highest agreement.
        metric: the correlation used.
        ground_truth: the :class:`GroundTruth` compared with (re-use it for other curvatures).
    """

    dampings: Tensor
    agreement: Tensor
    per_query: Tensor
    best: float
    metric: Agreement
    ground_truth: GroundTruth

    def as_dict(self) -> dict[float, float]:
        """``{damping: agreement}``, e.g. for a table or a plot."""
        return {float(d): float(a) for d, a in zip(self.dampings, self.agreement, strict=True)}


def _ranks(x: Tensor) -> Tensor:
    return x.argsort(dim=1).argsort(dim=1).to(x.dtype)


def _row_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``, ``[rows]``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denom = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(denom > 0, (a * b).sum(dim=1) / denom.clamp_min(1e-300), torch.nan)


def _make_curvature(
    curvature: str | Callable[[float], Curvature],
    damping: float,
    kind: str,
    options: dict[str, Any],
) -> Curvature:
    if callable(curvature) and not isinstance(curvature, str):
        made = curvature(damping)
        if not isinstance(made, Curvature):
            raise TypeError(
                f"curvature: the factory must return a Curvature, got {type(made).__name__}"
            )
        return made
    if curvature not in CURVATURES:
        raise ValueError(
            f"curvature: expected one of {sorted(CURVATURES)} or a factory, got {curvature!r}"
        )
    return CURVATURES[curvature](kind=kind, damping=damping, **options)


def _check_candidates(dampings: Sequence[float]) -> list[float]:
    values = [check_damping(d) for d in dampings]
    if not values or any(v is None for v in values):
        raise ValueError(
            f"dampings: expected a non-empty list of floats >= 0, got {list(dampings)!r}"
        )
    return values  # type: ignore[return-value]


def select_damping(
    model: nn.Module,
    task: Task,
    train: DataLike,
    query: DataLike,
    dampings: Sequence[float],
    *,
    curvature: str | Callable[[float], Curvature] = "cg",
    kind: str = "ggn",
    curvature_options: dict[str, Any] | None = None,
    ground_truth: GroundTruth | None = None,
    indices: Sequence[int] | Tensor | None = None,
    n_removed: int = 10,
    seed: int = 0,
    train_fn: TrainFn | None = None,
    metric: Agreement | str = Agreement.PEARSON,
    chunk_size: int = 64,
    progress: ProgressFn | None = None,
) -> DampingCurve:
    """Pick the damping whose influence best agrees with retraining on a held-out sample.

    Args:
        model, task, train, query: as for :class:`~headwater.methods.InfluenceFunction`;
            keep ``query`` small (a held-out sample of test points).
        dampings: candidate ``λ`` values (``>= 0``), e.g. a log-spaced grid.
        curvature: a name in ``CURVATURES`` (built with ``kind``, the candidate
            damping and ``curvature_options``) or a factory ``damping -> Curvature``.
        kind, curvature_options: see ``curvature``.
        ground_truth: precomputed actual changes (:meth:`GroundTruth.from_loo`,
            :meth:`GroundTruth.from_pbrf`); default: leave-one-out retraining of the
            removed examples now (``train_fn`` for non-convex models, else L-BFGS).
        indices: training examples to remove; default ``n_removed`` drawn with ``seed``.
        n_removed: size of the held-out sample (a handful suffices; each costs a retrain).
        seed: seed of the sample.
        train_fn: ``train_fn(model, train, weights) -> model``, see
            :func:`headwater.evaluate.leave_one_out`.
        metric: ``"pearson"`` (default; LOO) or ``"spearman"``.
        chunk_size: examples per gradient step.
        progress: optional ``progress(stage, done, total)`` callback.

    Returns:
        :class:`DampingCurve` with ``best`` and the whole curve.

    Raises:
        ValueError / TypeError naming the argument for bad input.
    """
    candidates = _check_candidates(dampings)
    try:
        metric = Agreement(metric)
    except ValueError as err:
        raise ValueError(
            f"metric: expected one of {[m.value for m in Agreement]}, got {metric!r}"
        ) from err
    n = num_examples(train, "train")
    if ground_truth is None:
        if indices is None:
            if (
                isinstance(n_removed, bool)
                or not isinstance(n_removed, int)
                or not 2 <= n_removed <= n
            ):
                raise ValueError(f"n_removed: must be an integer in [2, {n}], got {n_removed!r}")
            indices = (
                torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_removed]
                .sort()
                .values
            )
        result = leave_one_out(
            model, task, train, query, indices, train_fn=train_fn, progress=progress
        )
        ground_truth = GroundTruth.from_loo(result)
    elif not isinstance(ground_truth, GroundTruth):
        raise TypeError(f"ground_truth: expected a GroundTruth, got {type(ground_truth).__name__}")
    at = ground_truth.model
    g_removed = stack_gradients(
        at, task, subset(train, ground_truth.indices), chunk_size=chunk_size
    )  # [m, P]
    g_query = stack_gradients(
        at, task, query, objective=Objective.MEASUREMENT, chunk_size=chunk_size
    )  # [q, P]
    actual = ground_truth.actual.to(g_query.dtype)
    if actual.shape != (g_query.shape[0], g_removed.shape[0]):
        raise ValueError(
            f"ground_truth: actual has shape {tuple(actual.shape)}, expected "
            f"[n_query={g_query.shape[0]}, n_removed={g_removed.shape[0]}]"
        )
    if metric is Agreement.SPEARMAN:
        actual = _ranks(actual)
    options = dict(curvature_options or {})
    per_query = []
    fitted: Curvature | None = None
    for j, damping in enumerate(candidates):
        if fitted is None:
            fitted = _make_curvature(curvature, damping, kind, options).fit(at, task, train)
        else:  # re-derived, or refitted where the state depends on the damping (LiSSA, K-FAC, M-FAC)
            fitted = fitted.with_damping(damping, model=at, task=task, data=train)
        predicted = fitted.solve(g_query) @ g_removed.T / n  # [q, m]
        if metric is Agreement.SPEARMAN:
            predicted = _ranks(predicted)
        per_query.append(_row_correlation(predicted, actual))
        report(progress, "damping selection", j + 1, len(candidates))
    table = torch.stack(per_query)  # [D, q]
    agreement = table.nanmean(dim=1)
    if bool(torch.isnan(agreement).all()):
        raise ValueError(
            "ground_truth: the actual changes are constant for every query; remove other examples"
        )
    best = candidates[int(torch.nan_to_num(agreement, nan=-2.0).argmax())]
    return DampingCurve(
        torch.tensor(candidates, dtype=torch.float64), agreement, table, best, metric, ground_truth
    )
