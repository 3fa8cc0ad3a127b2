"""Score uncertainty: run any estimator over an ensemble of models (or checkpoints).

Given members ``θ_1..θ_M`` (independently trained models, retrained seeds from
:func:`~headwater.train.ensemble.train_ensemble`, or checkpoints of one run) and an
estimator ``score_fn(model) -> [n_query, n_train]``, returns

    mean[q, i]   = (1/M) Σ_m score_m[q, i]
    stderr[q, i] = std_m(score_m[q, i]) / √M          (unbiased std)

and a stability report: for each query, the mean over member pairs of the overlap
``|top_k(a) ∩ top_k(b)| / k`` of their ``k`` largest scores (proponents, DESIGN.md's
sign), the overlap of each member's top-k with the mean's top-k, and the mean
pairwise Spearman correlation of whole score rows. Scores keep the estimator's
convention (``score/n`` = change from removing an example).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headwater.evaluate.lds import spearman_rows
from headwater.progress import ProgressFn, report
from headwater.train.ensemble import Ensemble

__all__ = ["EnsembleScores", "Stability", "ensemble_scores", "stability"]

ScoreFn = Callable[[nn.Module], Tensor]
"""``score_fn(model) -> Tensor [n_query, n_train]``, e.g.
``lambda m: headwater.influence(m, train, query, curvature="exact").values``."""


@dataclass(frozen=True)
class Stability:
    """Rank agreement of the members' scores.

    Attributes:
        k: size of the top sets compared.
        pairwise_topk: ``[n_query]`` mean over member pairs of ``|top_k ∩ top_k| / k``.
        mean_topk: ``[n_query]`` mean over members of the overlap with the mean's top-k.
        pairwise_spearman: ``[n_query]`` mean pairwise Spearman of whole rows.
    """

    k: int
    pairwise_topk: Tensor
    mean_topk: Tensor
    pairwise_spearman: Tensor

    def summary(self) -> dict[str, float]:
        return {
            "k": self.k,
            "pairwise_topk": float(self.pairwise_topk.mean()),
            "mean_topk": float(self.mean_topk.mean()),
            "pairwise_spearman": float(self.pairwise_spearman.nanmean()),
        }


@dataclass(frozen=True)
class EnsembleScores:
    """``mean`` and ``stderr`` ``[n_query, n_train]``, ``members [M, n_query, n_train]``
    and the :class:`Stability` report."""

    mean: Tensor
    stderr: Tensor
    members: Tensor
    stability: Stability


def _topk_sets(scores: Tensor, k: int) -> Tensor:
    """``[..., n_query, n_train]`` bool membership of each row's ``k`` largest scores."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def stability(members: Tensor, k: int = 10) -> Stability:
    """Stability report of ``members [M, n_query, n_train]`` (module docstring).

    Raises:
        ValueError: naming ``members`` or ``k`` when the shapes do not allow it.
    """
    if members.dim() != 3 or members.shape[0] < 2:
        raise ValueError(
            f"members: expected [M >= 2, n_query, n_train], got {tuple(members.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= members.shape[2]:
        raise ValueError(f"k: must be an integer in [1, n_train={members.shape[2]}], got {k!r}")
    count = members.shape[0]
    tops = _topk_sets(members, k)  # [M, Q, N]
    mean_top = _topk_sets(members.mean(dim=0), k)
    pair_top, pair_rho = [], []
    for a, b in itertools.combinations(range(count), 2):
        pair_top.append((tops[a] & tops[b]).sum(dim=-1).double() / k)
        pair_rho.append(spearman_rows(members[a], members[b]))
    mean_topk = (tops & mean_top).sum(dim=-1).double().mean(dim=0) / k
    return Stability(
        k, torch.stack(pair_top).mean(dim=0), mean_topk, torch.stack(pair_rho).nanmean(dim=0)
    )


def ensemble_scores(
    score_fn: ScoreFn,
    models: Sequence[nn.Module] | tuple[nn.Module, Ensemble],
    *,
    k: int = 10,
    progress: ProgressFn | None = None,
) -> EnsembleScores:
    """Run ``score_fn`` on every member and summarise (module docstring).

    Args:
        score_fn: the estimator, ``model -> [n_query, n_train]``.
        models: a list of trained models (or checkpoints loaded into models), or a
            ``(template_model, Ensemble)`` pair whose members are materialised one
            at a time with ``Ensemble.member``.
        k: top-k size of the stability report.
        progress: optional ``progress(stage, done, total)`` callback.

    Returns:
        :class:`EnsembleScores`.

    Raises:
        ValueError: naming ``models`` if there are fewer than two members, or
            ``score_fn`` if members return different shapes or NaN/inf.
    """
    if isinstance(models, tuple) and len(models) == 2 and isinstance(models[1], Ensemble):
        template, ensemble = models
        count = len(ensemble)

        def get(m: int) -> nn.Module:
            return ensemble.member(template, m)

    else:
        models = list(models)
        count = len(models)
        get = models.__getitem__
    if count < 2:
        raise ValueError(f"models: need at least two members for an uncertainty, got {count}")
    rows = []
    for m in range(count):
        scores = score_fn(get(m))
        if not isinstance(scores, Tensor) or scores.dim() != 2:
            raise ValueError(
                f"score_fn: must return a Tensor [n_query, n_train], got {type(scores).__name__}"
            )
        if rows and scores.shape != rows[0].shape:
            raise ValueError(
                f"score_fn: member {m} returned shape {tuple(scores.shape)}, "
                f"member 0 {tuple(rows[0].shape)}"
            )
        if not torch.isfinite(scores).all():
            raise ValueError(f"score_fn: member {m} returned NaN/inf scores")
        rows.append(scores.detach())
        report(progress, "ensemble scores", m + 1, count)
    members = torch.stack(rows)  # [M, Q, N]
    mean = members.mean(dim=0)
    stderr = members.std(dim=0, unbiased=True) / count**0.5
    return EnsembleScores(mean, stderr, members, stability(members, k))
