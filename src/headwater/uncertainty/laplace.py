"""Linearised Laplace: a Gaussian posterior over the analysed parameters from the GGN.

Linearise the model at the trained θ̂, ``f_lin(x; θ) = f(x; θ̂) + J(x)(θ − θ̂)``, with a
Gaussian prior ``θ ~ N(0, D⁻¹)``, ``D = diag(δ_g)`` (one precision per parameter
group). The training loss is the negative log-likelihood, ``−log p(y|f) = ℓ(f, y)/σ²
+ const`` (``σ²`` is the noise variance of a :class:`~headwater.task.RegressionTask`,
whose loss is ``½‖f − y‖²``; ``σ² = 1`` and no constant for cross-entropy). The
posterior precision of the *summed* loss (Immer et al. 2021, "Scalable Marginal
Likelihood Estimation for Model Selection in Deep Learning"; Antorán et al. 2022,
"Adapting the Linearised Laplace Model Evidence for Modern Deep Learning") is

    P = Σ_i J_iᵀ Λ_i J_i / σ² + D,      Λ_i = ∂²ℓ_i/∂f²      (the GGN, never the Hessian)

obtained from any fitted curvature with ``eigen()``: headwater's GGN ``M`` is that of
the *mean* objective plus the weight decay, so ``Σ_i J_iᵀΛ_iJ_i = n (M − wd·I)``; with
the eigenpairs ``(m_j, u_j)`` kept by the curvature, ``Σ_i J_iᵀΛ_iJ_i ≈ Σ_j s_j u_j u_jᵀ``,
``s_j = n (m_j − wd)`` (exact for ``Exact``; for low rank the discarded directions get
the prior only). ``P`` is applied and log-determined through the Woodbury identity and
the matrix-determinant lemma in the ``k``-dimensional kept subspace.

The MAP of the training objective ``(1/n)Σℓ_i + (wd/2)‖θ‖²`` is the posterior mode for
``δ = n·wd/σ²`` (the default prior). For another prior, θ̂ is no longer stationary for
the linearised model; with ``recenter=True`` (default) the posterior mean is the MAP of
the (quadratically expanded) linearised model, one exact Newton step

    θ_δ = θ̂ + Δ,    Δ = −P⁻¹ (Σ_i ∇ℓ_i(θ̂)/σ² + D θ̂),

(exact for squared error, where the linearised objective is quadratic; a second-order
expansion of the linearised loss for cross-entropy). The log marginal likelihood
(evidence) by the Laplace approximation is

    log p(D|δ, σ²) ≈ −NLL_lin(θ_δ) − ½ θ_δᵀ D θ_δ + ½ log det D − ½ log det P,
    NLL_lin(θ_δ) = (L + gᵀΔ + ½ ΔᵀGΔ)/σ² + (n C/2) log(2πσ²)   (regression; no log term otherwise)

with ``L = Σℓ_i(θ̂)``, ``g = Σ∇ℓ_i(θ̂)``, ``G = Σ J_iᵀΛ_iJ_i`` and ``C`` outputs per example.
For Bayesian linear regression it is the exact evidence. ``recenter=False`` keeps θ̂
(``Δ = 0``), the usual practice, and warns when θ̂ is not (near) stationary for the
linear model with the current prior (Antorán et al. 2022).

Predictions: the function-space covariance ``Σ_f(x) = J(x) P⁻¹ J(x)ᵀ`` around the
linearised mean ``f(x; θ̂) + J(x)Δ``; regression adds ``σ² I``; classification uses the
probit approximation ``softmax(μ_c / √(1 + π/8 Σ_f,cc))`` (MacKay 1992; the multi-class
form of Daxberger et al. 2021, "Laplace Redux") or a Monte-Carlo average of softmax over
``N(μ, Σ_f)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import torch
from torch import Tensor, nn

from headwater.curvature.base import Curvature
from headwater.curvature.operators import MatrixKind
from headwater.data import DataLike, iter_batches, num_examples
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import bind, detached, evaluation_mode, prepare_batch
from headwater.gradients.per_example import per_example_gradients
from headwater.progress import ProgressFn
from headwater.task import ClassificationTask, RegressionTask, Task
from headwater.uncertainty._jacobians import (
    check_curvature_layout,
    flat_parameters,
    output_jacobians,
)

__all__ = [
    "LaplacePredictive",
    "LaplaceState",
    "LinearizedLaplace",
    "PriorGroups",
    "ProbabilityMethod",
]


class PriorGroups(str, Enum):
    """How parameters share a prior precision."""

    ALL = "all"  # one precision for every analysed parameter
    PARAMETER = "parameter"  # one per parameter tensor (weight, bias, ...)
    MODULE = "module"  # one per module (the name up to the last dot)


class ProbabilityMethod(str, Enum):
    """How class probabilities integrate over the function-space Gaussian."""

    PROBIT = "probit"
    MC = "mc"


@dataclass(frozen=True)
class LaplaceState:
    """What :meth:`LinearizedLaplace.fit` computes (float64, prior-independent).

    Attributes:
        theta: ``[P]`` the trained θ̂.
        eigvals: ``[k]`` eigenvalues ``s_j >= 0`` of ``Σ_i J_iᵀΛ_iJ_i`` (loss scale, σ² = 1).
        eigvecs: ``[k, P]`` their orthonormal eigenvectors (rows).
        loss_sum: ``L = Σ_i ℓ_i(θ̂)``.
        grad_sum: ``[P]`` ``g = Σ_i ∇ℓ_i(θ̂)``.
        n_examples: ``n``.
        n_outputs: ``C``, model outputs per example.
        group_index: ``[P]`` prior group of each parameter entry.
        group_names: the groups' names.
    """

    theta: Tensor
    eigvals: Tensor
    eigvecs: Tensor
    loss_sum: float
    grad_sum: Tensor
    n_examples: int
    n_outputs: int
    group_index: Tensor
    group_names: tuple[str, ...]


@dataclass(frozen=True)
class LaplacePredictive:
    """The linearised predictive in function space.

    Attributes:
        mean: ``[N, C]`` ``f(x; θ̂) + J(x)Δ``.
        covariance: ``[N, C, C]`` ``J(x) P⁻¹ J(x)ᵀ`` (epistemic, without noise).
        noise_variance: ``σ²`` for regression, ``None`` otherwise.
    """

    mean: Tensor
    covariance: Tensor
    noise_variance: float | None

    def variance(self, include_noise: bool = True) -> Tensor:
        """``[N, C]`` marginal predictive variances (``+ σ²`` for regression if asked)."""
        var = torch.diagonal(self.covariance, dim1=-2, dim2=-1)
        if include_noise and self.noise_variance is not None:
            var = var + self.noise_variance
        return var


def _group_labels(layout: ParamLayout, groups: PriorGroups | str | Sequence) -> list[str]:
    """One group label per parameter tensor."""
    if isinstance(groups, str):
        try:
            kind = PriorGroups(groups)
        except ValueError as err:
            raise ValueError(
                f"prior_groups: expected one of {[g.value for g in PriorGroups]} or a "
                f"list of name-prefix lists, got {groups!r}"
            ) from err
        if kind is PriorGroups.ALL:
            return ["all"] * len(layout.names)
        if kind is PriorGroups.PARAMETER:
            return list(layout.names)
        return [name.rsplit(".", 1)[0] if "." in name else "" for name in layout.names]
    labels = []
    for name in layout.names:
        hits = [
            j
            for j, prefixes in enumerate(groups)
            for prefix in ([prefixes] if isinstance(prefixes, str) else prefixes)
            if name == prefix or name.startswith(prefix + ".")
        ]
        if len(set(hits)) != 1:
            raise ValueError(
                f"prior_groups: parameter {name!r} must match exactly one group, "
                f"matches {sorted(set(hits))}"
            )
        labels.append(f"group{hits[0]}")
    return labels


def _positive(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name}: must be a finite float > 0, got {value!r}")
    return float(value)


_Self = TypeVar("_Self", bound="LinearizedLaplace")


class LinearizedLaplace:
    """Linearised Laplace posterior, predictive and evidence (see the module docstring).

    Args:
        model: the trained model (never modified).
        task: a :class:`~headwater.task.RegressionTask` (Gaussian likelihood) or
            :class:`~headwater.task.ClassificationTask` (categorical); other tasks are
            treated as ``NLL = loss`` (no noise); the analysed parameters get the posterior.
        curvature: fitted or unfitted, ``kind="ggn"``, with ``eigen()`` (``Exact``,
            ``Lanczos``, ``Arnoldi``, ``Nystrom``); its damping is not used (the prior
            takes its place).
        prior_groups: ``"all"`` (one precision), ``"parameter"``, ``"module"`` or a
            list of groups, each a list of parameter-name prefixes.
        prior_precision: ``δ``, a float or one per group; default ``n·wd/σ²``, the prior
            under which the trained θ̂ is the MAP.
        noise_variance: ``σ²`` of a regression task (default 1, the scale of its loss).
        recenter: use the linearised model's MAP ``θ̂ + Δ`` for the current prior.
        stationarity_tol: warn when ``‖Δ‖/‖θ̂‖`` exceeds this.
        chunk_size: examples per vectorised step.

    Raises:
        TypeError/ValueError: naming the argument.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        curvature: Curvature,
        *,
        prior_groups: PriorGroups | str | Sequence[Sequence[str] | str] = PriorGroups.ALL,
        prior_precision: float | Sequence[float] | Tensor | None = None,
        noise_variance: float | None = None,
        recenter: bool = True,
        stationarity_tol: float = 1e-3,
        chunk_size: int = 64,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(task, Task):
            raise TypeError(f"task: expected a headwater Task, got {type(task).__name__}")
        if not isinstance(curvature, Curvature):
            raise TypeError(
                f"curvature: expected a headwater Curvature, got {type(curvature).__name__}"
            )
        if not curvature.has_eigen:
            raise TypeError(
                f"curvature: {type(curvature).__name__} has no eigendecomposition; use "
                "Exact, Lanczos, Arnoldi or Nystrom"
            )
        if curvature.kind is not MatrixKind.GGN:
            raise ValueError(
                f"curvature: the Laplace posterior precision needs kind='ggn', got "
                f"{curvature.kind.value!r} (the Hessian is indefinite away from a minimum)"
            )
        self.gaussian = isinstance(task, RegressionTask)
        if noise_variance is not None and not self.gaussian:
            raise ValueError("noise_variance: only a RegressionTask has a noise variance")
        if not isinstance(recenter, bool):
            raise TypeError(f"recenter: expected a bool, got {type(recenter).__name__}")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
        self.model, self.task, self.curvature = model, task, curvature
        self.noise_variance = (
            1.0 if noise_variance is None else _positive("noise_variance", noise_variance)
        )
        self.prior_groups, self.recenter, self.chunk_size = prior_groups, recenter, chunk_size
        self.stationarity_tol = _positive("stationarity_tol", stationarity_tol)
        self._prior_arg = prior_precision
        self.prior_precision: Tensor | None = None  # [G], set by fit
        self.state: LaplaceState | None = None

    # -- fitting -------------------------------------------------------------------
    def fit(self: _Self, train: DataLike, *, progress: ProgressFn | None = None) -> _Self:
        """Fit the curvature (if needed) and the prior-independent sums on ``train``."""
        n = num_examples(train, "train")
        theta, layout = flat_parameters(self.model, self.task)
        if self.curvature.state is None:
            self.curvature.fit(self.model, self.task, train, progress=progress)
        check_curvature_layout(self.curvature.layout, layout)
        if self.curvature.n_examples != n:
            raise ValueError(
                f"curvature: fitted on {self.curvature.n_examples} examples, train has {n}"
            )
        eigvals, eigvecs = self.curvature.eigen()
        wd = self.task.weight_decay
        s = (n * (eigvals.to(torch.float64) - wd)).clamp_min(0.0)  # [k]
        grad_sum = sum(
            g.sum(0)
            for g in per_example_gradients(
                self.model,
                self.task,
                train,
                chunk_size=self.chunk_size,
                name="train",
                progress=progress,
            )
        )
        params = detached(self.task.parameters(self.model))
        loss_sum, n_outputs = 0.0, 1
        with torch.no_grad(), evaluation_mode(self.model):
            for batch in iter_batches(train, self.chunk_size, "train"):
                x, y = prepare_batch(batch, theta)
                out = self.task.output(bind(self.model, params), x)
                n_outputs = out[0].numel()
                loss_sum += float(self.task.loss(out, y).sum())
        labels = _group_labels(layout, self.prior_groups)
        names = tuple(dict.fromkeys(labels))
        index = torch.cat(
            [
                torch.full((size,), names.index(lab), dtype=torch.long)
                for lab, size in zip(labels, layout.sizes, strict=True)
            ]
        ).to(theta.device)
        self.state = LaplaceState(
            theta.to(torch.float64),
            s,
            eigvecs.to(torch.float64).contiguous(),
            loss_sum,
            grad_sum.to(torch.float64),
            n,
            n_outputs,
            index,
            names,
        )
        self.prior_precision = self._initial_prior(len(names), n)
        self._warn_if_not_stationary("the initial prior")
        return self

    def _initial_prior(self, n_groups: int, n: int) -> Tensor:
        value = self._prior_arg
        if value is None:
            if self.task.weight_decay <= 0:
                raise ValueError(
                    "prior_precision: the task has no weight decay, so no prior makes the "
                    "trained θ̂ the MAP; give prior_precision > 0"
                )
            value = n * self.task.weight_decay / self.noise_variance
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [_positive("prior_precision", value)] * n_groups
        prior = torch.as_tensor(value, dtype=torch.float64).reshape(-1).clone()
        if prior.numel() != n_groups or not bool(torch.isfinite(prior).all() and (prior > 0).all()):
            raise ValueError(
                f"prior_precision: expected a float or {n_groups} finite values > 0 (one per "
                f"group), got {value!r}"
            )
        return prior.to(self.state.theta.device)

    def _check_fitted(self) -> LaplaceState:
        if self.state is None:
            raise RuntimeError("LinearizedLaplace is not fitted: call .fit(train) first")
        return self.state

    # -- the posterior in the kept subspace ------------------------------------------
    def _posterior(self, prior: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """Per-entry prior ``d [P]``, Woodbury pieces, ``log det P`` and ``Δ`` (differentiable)."""
        s = self.state
        d = prior[s.group_index]  # [P]
        root = (s.eigvals / noise).sqrt()  # [k]
        b_dinv = root[:, None] * s.eigvecs / d  # B D⁻¹, B = diag(√λ) U: [k, P]
        inner = (
            torch.eye(root.numel(), dtype=d.dtype, device=d.device)
            + b_dinv @ (root[:, None] * s.eigvecs).T
        )
        chol = torch.linalg.cholesky(inner)  # K = I + B D⁻¹ Bᵀ
        logdet = d.log().sum() + 2 * chol.diagonal().log().sum()
        parts = {"d": d, "b_dinv": b_dinv, "chol": chol, "logdet": logdet}
        rhs = s.grad_sum / noise + d * s.theta
        parts["delta"] = -self._solve(parts, rhs.unsqueeze(0))[0]
        return parts

    @staticmethod
    def _solve(parts: dict[str, Tensor], v: Tensor) -> Tensor:
        """``V P⁻¹`` for rows ``V [m, P]``: ``V D⁻¹ − (V D⁻¹Bᵀ) K⁻¹ (B D⁻¹)``."""
        coeff = torch.cholesky_solve((v @ parts["b_dinv"].T).T, parts["chol"]).T  # [m, k]
        return v / parts["d"] - coeff @ parts["b_dinv"]

    def _current(self) -> dict[str, Tensor]:
        self._check_fitted()
        noise = torch.tensor(
            self.noise_variance, dtype=torch.float64, device=self.state.theta.device
        )
        return self._posterior(self.prior_precision, noise)

    def _delta(self, parts: dict[str, Tensor]) -> Tensor:
        return parts["delta"] if self.recenter else torch.zeros_like(parts["delta"])

    def _log_evidence(self, prior: Tensor, noise: Tensor) -> Tensor:
        s = self.state
        parts = self._posterior(prior, noise)
        delta = self._delta(parts)
        quad = (s.eigvals * (s.eigvecs @ delta) ** 2).sum()  # ΔᵀGΔ
        nll = (s.loss_sum + s.grad_sum @ delta + 0.5 * quad) / noise
        if self.gaussian:
            nll = nll + 0.5 * s.n_examples * s.n_outputs * torch.log(2 * math.pi * noise)
        mean = s.theta + delta
        return (
            -nll
            - 0.5 * (parts["d"] * mean**2).sum()
            + 0.5 * parts["d"].log().sum()
            - 0.5 * parts["logdet"]
        )

    # -- public reading ------------------------------------------------------------
    def log_marginal_likelihood(
        self,
        prior_precision: float | Sequence[float] | Tensor | None = None,
        noise_variance: float | Tensor | None = None,
    ) -> Tensor:
        """The Laplace log evidence ``log p(D | δ, σ²)`` (scalar, float64).

        Args:
            prior_precision: ``δ`` (a float or one per group); default the current one.
                A tensor requiring grad gives a differentiable result.
            noise_variance: ``σ²`` (regression only); default the current one.
        """
        s = self._check_fitted()
        if prior_precision is None:
            prior = self.prior_precision
        elif isinstance(prior_precision, Tensor):
            prior = prior_precision.to(torch.float64).reshape(-1).expand(len(s.group_names))
        else:
            saved, self._prior_arg = self._prior_arg, prior_precision
            try:
                prior = self._initial_prior(len(s.group_names), s.n_examples)
            finally:
                self._prior_arg = saved
        if noise_variance is not None and not self.gaussian:
            raise ValueError("noise_variance: only a RegressionTask has a noise variance")
        if noise_variance is None:
            noise = torch.tensor(self.noise_variance, dtype=torch.float64, device=s.theta.device)
        elif isinstance(noise_variance, Tensor):
            noise = noise_variance.to(torch.float64).reshape(())
        else:
            noise = torch.tensor(
                _positive("noise_variance", noise_variance),
                dtype=torch.float64,
                device=s.theta.device,
            )
        return self._log_evidence(prior, noise)

    def stationarity(self) -> float:
        """``‖Δ‖/‖θ̂‖``: how far θ̂ is from the linearised model's MAP under the current prior."""
        delta = self._current()["delta"]
        return float(delta.norm() / self.state.theta.norm().clamp_min(1e-12))

    def _warn_if_not_stationary(self, what: str) -> None:
        rel = self.stationarity()
        if rel > self.stationarity_tol:
            action = (
                "the posterior mean is recentred by a Newton step"
                if self.recenter
                else "evidence and predictions use θ̂ anyway; pass recenter=True"
            )
            warnings.warn(
                f"LinearizedLaplace: θ̂ is not stationary for the linearised model with {what} "
                f"(Newton step ‖Δ‖/‖θ̂‖ = {rel:.3g} > stationarity_tol={self.stationarity_tol:g}); "
                f"{action}, or retrain to convergence with weight decay = prior·σ²/n",
                RuntimeWarning,
                stacklevel=3,
            )

    def mean(self) -> Tensor:
        """Posterior mean ``[P]``: ``θ̂ + Δ`` (``θ̂`` with ``recenter=False``)."""
        parts = self._current()
        return self.state.theta + self._delta(parts)

    def covariance(self) -> Tensor:
        """Dense posterior covariance ``P⁻¹`` ``[P, P]`` (small models only)."""
        parts = self._current()
        p = self.state.theta.numel()
        return self._solve(parts, torch.eye(p, dtype=torch.float64, device=self.state.theta.device))

    def optimize_prior(
        self: _Self, *, optimize_noise: bool = False, max_iter: int = 100, tol: float = 1e-9
    ) -> _Self:
        """Set ``δ`` (and ``σ²`` with ``optimize_noise``) to maximise the log evidence.

        Optimises ``log δ`` per group (and ``log σ²``) by L-BFGS on
        :meth:`log_marginal_likelihood`; returns ``self``.

        Raises:
            ValueError: for ``optimize_noise`` without a regression task, bad settings.
            RuntimeError: if the optimum is not finite.
        """
        s = self._check_fitted()
        if optimize_noise and not self.gaussian:
            raise ValueError("optimize_noise: only a RegressionTask has a noise variance")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter <= 0:
            raise ValueError(f"max_iter: must be a positive integer, got {max_iter!r}")
        log_prior = self.prior_precision.log().clone().requires_grad_(True)
        log_noise = torch.tensor(
            math.log(self.noise_variance),
            dtype=torch.float64,
            device=s.theta.device,
            requires_grad=optimize_noise,
        )
        variables = [log_prior] + ([log_noise] if optimize_noise else [])
        opt = torch.optim.LBFGS(
            variables,
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=tol,
            tolerance_change=0.0,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            opt.zero_grad()
            loss = -self._log_evidence(log_prior.exp(), log_noise.exp())
            loss.backward()
            return loss

        opt.step(closure)
        prior, noise = log_prior.detach().exp(), float(log_noise.detach().exp())
        if not (bool(torch.isfinite(prior).all()) and math.isfinite(noise)):
            raise RuntimeError(
                "optimize_prior: the evidence has no finite maximum; fix the prior "
                "or noise by hand (prior_precision=, noise_variance=)"
            )
        self.prior_precision, self.noise_variance = prior, noise
        if not self.recenter:
            self._warn_if_not_stationary("the optimised prior")
        return self

    # -- predictions ---------------------------------------------------------------
    def predict(self, data: Tensor | DataLike) -> LaplacePredictive:
        """Linearised predictive mean ``[N, C]`` and function-space covariance ``[N, C, C]``.

        Args:
            data: inputs ``[N, ...]`` or an ``(inputs, targets)`` pair, Dataset or DataLoader.
        """
        parts = self._current()
        delta = self._delta(parts)
        means, covs = [], []
        for outputs, jac in output_jacobians(
            self.model, self.task, data, chunk_size=self.chunk_size, name="data"
        ):
            j = jac.to(torch.float64)  # [B, C, P]
            b, c, p = j.shape
            pj = self._solve(parts, j.reshape(b * c, p)).reshape(b, c, p)
            covs.append(torch.einsum("bcp,bdp->bcd", j, pj))
            means.append(outputs.to(torch.float64) + j @ delta)
        return LaplacePredictive(
            torch.cat(means), torch.cat(covs), self.noise_variance if self.gaussian else None
        )

    def probabilities(
        self,
        data: Tensor | DataLike,
        *,
        method: ProbabilityMethod | str = ProbabilityMethod.PROBIT,
        n_samples: int = 1000,
        seed: int = 0,
    ) -> Tensor:
        """Class probabilities ``[N, C]`` integrated over the linearised posterior.

        Args:
            data: inputs (as :meth:`predict`).
            method: ``"probit"`` (``softmax(μ/√(1 + π/8·diag Σ_f))``) or ``"mc"``
                (mean softmax over ``n_samples`` draws from ``N(μ, Σ_f)``, seeded by ``seed``).

        Raises:
            TypeError: if the task is not a ClassificationTask.
            ValueError: for a bad ``method`` or ``n_samples``.
        """
        if not isinstance(self.task, ClassificationTask):
            raise TypeError("task: class probabilities need a ClassificationTask")
        try:
            method = ProbabilityMethod(method)
        except ValueError as err:
            raise ValueError(f"method: expected 'probit' or 'mc', got {method!r}") from err
        pred = self.predict(data)
        if method is ProbabilityMethod.PROBIT:
            scale = (1 + math.pi / 8 * pred.variance(include_noise=False)).rsqrt()
            return torch.softmax(pred.mean * scale, dim=-1)
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples <= 0:
            raise ValueError(f"n_samples: must be a positive integer, got {n_samples!r}")
        evals, evecs = torch.linalg.eigh(pred.covariance)
        root = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)  # Σ_f = R Rᵀ, [N, C, C]
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n_samples, *pred.mean.shape, generator=gen, dtype=torch.float64)
        logits = pred.mean + torch.einsum("ncd,snd->snc", root, z.to(root.device))
        return torch.softmax(logits, dim=-1).mean(dim=0)
