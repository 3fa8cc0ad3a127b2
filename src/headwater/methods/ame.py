"""Average Marginal Effect (Lin et al. 2022, "Measuring the Effect of Training Data on Deep
Learning Predictions via Randomized Experiments").

The AME of training example ``i`` on query ``q`` is the expected change of the
measurement when ``i`` is *added* to a random subset:

    AME_i = E_{p∼P} E_{S∼Bernoulli(p)^{n−1}} [ m_q(S ∪ {i}) − m_q(S) ].

Estimator: train ``K`` submodels; submodel ``k`` first draws an inclusion
probability ``p_k ∼ P`` and then keeps every example independently with
probability ``p_k``. With the centred, scaled indicators

    X_ki = (1[i∈S_k] − p_k) / (p_k (1 − p_k))   (= 1/p_k if kept, −1/(1−p_k) if not),

``E[X_ki] = 0``, ``E[X_ki²] = v := E_p[1/(p(1−p))]`` and ``E[X_ki Y_k] = AME_i``, so the
regression of ``Y_k = m_q(S_k)`` on ``X / v`` has coefficients ``AME``. The
regression is a Lasso (scikit-learn ``LassoCV``, penalty by cross-validation):
under sparsity (``k`` examples with a large AME) it recovers them from

    K ≳ c · k · log n   submodels   (Lin et al. 2022, Theorem on the Lasso's sample
                                     complexity; headwater's default c = AME_C = 8).

``P`` is the grid ``{0.2, 0.4, 0.6, 0.8}`` (uniform) by default, as in the paper.
Shapley special case: with ``p ∼ Uniform(0, 1)`` the AME *is* the Shapley value
(a uniform ``p`` gives every subset size the same total weight, ``1/n``, and every
subset of a size the same weight within it, which is Shapley's weighting
``|S|!(n−|S|−1)!/n!``). Since ``v = ∞`` for ``Uniform(0, 1)``, ``"shapley"`` draws
``p ∼ Uniform(ε, 1 − ε)`` (``ε = 0.05`` by default), the truncated version the
paper uses; it approximates the Shapley value up to the truncated extremes.

Sign and scale: AME is the effect of *including* an example, so in DESIGN.md's
convention (``score/n`` = change from removing it) ``score = −n · AME``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from torch import Tensor, nn

from headwater.data import DataLike, num_examples
from headwater.progress import ProgressFn, report
from headwater.task import Task
from headwater.train.ensemble import TrainConfig, ensemble_measurements, train_ensemble

__all__ = [
    "AME_C",
    "DEFAULT_P_GRID",
    "AMEResult",
    "PDistribution",
    "ame",
    "ame_design",
    "ame_estimate",
    "ame_features",
    "ame_num_models",
]

AME_C = 8.0
"""Constant c in the default number of submodels ``ceil(c · k · ln n)``."""

DEFAULT_P_GRID = (0.2, 0.4, 0.6, 0.8)


class PDistribution(str, Enum):
    """Distribution of the per-submodel inclusion probability ``p``."""

    GRID = "grid"  # uniform over a grid (default {0.2, 0.4, 0.6, 0.8})
    SHAPLEY = "shapley"  # Uniform(eps, 1 - eps): the (truncated) Shapley value


@dataclass(frozen=True)
class AMEResult:
    """AME estimates.

    Attributes:
        ame: ``[n_query, n_train]`` effect of *including* each example.
        scores: ``[n_query, n_train]`` ``= −n · ame`` (DESIGN.md's convention).
        masks: ``[K, n_train]`` the submodels' subsets.
        p: ``[K]`` their inclusion probabilities.
        outcomes: ``[K, n_query]`` the submodels' measurements.
        penalties: ``[n_query]`` the Lasso penalties chosen by cross-validation.
    """

    ame: Tensor
    scores: Tensor
    masks: Tensor
    p: Tensor
    outcomes: Tensor
    penalties: Tensor

    def support(self, query: int = 0, threshold: float = 0.0) -> Tensor:
        """Indices of the examples with ``|AME| > threshold`` for one query (``0``: every
        example the Lasso kept; the CV penalty optimises prediction and keeps some small
        false effects, so pass the smallest effect that counts as large)."""
        return (self.ame[query].abs() > threshold).nonzero().reshape(-1)


def ame_num_models(n_train: int, k: int, c: float = AME_C) -> int:
    """``ceil(c · k · ln n)``: submodels needed to recover ``k`` large AMEs among ``n``."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(
            f"k: must be a positive integer (expected number of large effects), got {k!r}"
        )
    if not isinstance(c, int | float) or not c > 0:
        raise ValueError(f"c: must be > 0, got {c!r}")
    return max(2, math.ceil(c * k * math.log(max(n_train, 2))))


def ame_design(
    n_train: int,
    n_models: int,
    *,
    distribution: PDistribution | str = PDistribution.GRID,
    grid: tuple[float, ...] = DEFAULT_P_GRID,
    shapley_eps: float = 0.05,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Random subsets: ``masks [n_models, n_train]`` (bool) and ``p [n_models]``.

    Raises:
        ValueError: naming the argument when out of range.
    """
    try:
        distribution = PDistribution(distribution)
    except ValueError as err:
        raise ValueError(
            f"distribution: expected one of {[d.value for d in PDistribution]}, "
            f"got {distribution!r}"
        ) from err
    if isinstance(n_models, bool) or not isinstance(n_models, int) or n_models < 2:
        raise ValueError(f"n_models: must be an integer >= 2, got {n_models!r}")
    gen = torch.Generator().manual_seed(int(seed))
    if distribution is PDistribution.GRID:
        values = torch.tensor(grid, dtype=torch.float64)
        if values.numel() == 0 or not ((values > 0) & (values < 1)).all():
            raise ValueError(f"grid: probabilities must lie in (0, 1), got {grid!r}")
        p = values[torch.randint(0, values.numel(), (n_models,), generator=gen)]
    else:
        if not 0 < shapley_eps < 0.5:
            raise ValueError(f"shapley_eps: must lie in (0, 0.5), got {shapley_eps!r}")
        p = shapley_eps + (1 - 2 * shapley_eps) * torch.rand(
            n_models, generator=gen, dtype=torch.float64
        )
    masks = torch.rand(n_models, n_train, generator=gen, dtype=torch.float64) < p[:, None]
    empty = masks.sum(dim=1) == 0
    masks[empty, 0] = True  # an empty subset cannot be trained on (probability ~0 for real n)
    return masks, p


def ame_features(masks: Tensor, p: Tensor) -> Tensor:
    """``X / v`` with ``X_ki = (1[i∈S_k] − p_k) / (p_k(1−p_k))`` and ``v = mean_k 1/(p_k(1−p_k))``,
    ``[K, n_train]`` float64: the regression on it has the AMEs as coefficients."""
    p = p.to(torch.float64)[:, None]
    x = (masks.to(torch.float64) - p) / (p * (1 - p))
    v = (1 / (p * (1 - p))).mean()
    return x / v


def ame_estimate(
    masks: Tensor, p: Tensor, outcomes: Tensor, *, cv: int = 5, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Lasso (``LassoCV``) estimates of the AMEs from submodel outcomes.

    Args:
        masks: ``[K, n_train]`` subsets.
        p: ``[K]`` inclusion probabilities.
        outcomes: ``[K]`` or ``[K, n_query]`` measurements of the submodels.
        cv: cross-validation folds for the penalty.
        seed: seeds the folds' coordinate descent.

    Returns:
        ``(ame [n_query, n_train], penalties [n_query])``.
    """
    from sklearn.linear_model import LassoCV

    if masks.dim() != 2 or p.shape != (masks.shape[0],):
        raise ValueError(
            f"masks/p: expected [K, n] and [K], got {tuple(masks.shape)} and {tuple(p.shape)}"
        )
    y = outcomes.reshape(masks.shape[0], -1).detach().cpu().double().numpy()
    if not np.isfinite(y).all():
        raise ValueError("outcomes: contains NaN/inf")
    features = ame_features(masks.cpu(), p.cpu()).numpy()
    coefs, penalties = [], []
    for q in range(y.shape[1]):
        fit = LassoCV(cv=cv, random_state=seed, alphas=50, max_iter=5000).fit(features, y[:, q])
        coefs.append(torch.from_numpy(fit.coef_.copy()))
        penalties.append(float(fit.alpha_))
    return torch.stack(coefs), torch.tensor(penalties, dtype=torch.float64)


def ame(
    model: nn.Module,
    task: Task,
    train: DataLike,
    query: DataLike,
    *,
    k: int = 10,
    c: float = AME_C,
    n_models: int | None = None,
    distribution: PDistribution | str = PDistribution.GRID,
    config: TrainConfig | None = None,
    cv: int = 5,
    seed: int = 0,
    store_path: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
) -> AMEResult:
    """AME of every training example on every query, by retraining submodels.

    Args:
        model: architecture / start of each submodel (see ``config.init``); never modified.
        task: loss, weight decay, measurement.
        train, query: the data.
        k: expected number of examples with a large effect (sets the default ``n_models``).
        c: the constant of ``n_models = ceil(c · k · ln n)``.
        n_models: overrides the default number of submodels.
        distribution: ``"grid"`` (AME) or ``"shapley"`` (truncated-uniform ``p``).
        config: training of each submodel (``normalization="mean"``: each subset is
            trained as a data set of its own); default ``TrainConfig()``.
        cv: Lasso cross-validation folds.
        seed: seeds the design, the submodels (``seed·10⁶ + j``) and the folds.
        store_path: folder of the resumable submodel store.
        progress: optional ``progress(stage, done, total)`` callback.

    Returns:
        :class:`AMEResult` (``scores = −n·ame``).
    """
    n = num_examples(train, "train")
    n_models = ame_num_models(n, k, c) if n_models is None else n_models
    masks, p = ame_design(n, n_models, distribution=distribution, seed=seed)
    ensemble = train_ensemble(
        model,
        task,
        train,
        masks,
        config=config,
        seeds=[int(seed) * 1_000_000 + j for j in range(n_models)],
        store_path=store_path,
        progress=progress,
    )
    outcomes = ensemble_measurements(model, task, ensemble, query)  # [K, n_query]
    values, penalties = ame_estimate(masks, p, outcomes, cv=cv, seed=seed)
    report(progress, "ame lasso", 1, 1)
    values = values.to(outcomes.dtype)
    return AMEResult(values, -n * values, masks, p, outcomes, penalties)
