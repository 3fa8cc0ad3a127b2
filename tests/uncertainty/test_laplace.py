"""Linearised Laplace vs Bayesian linear regression in closed form, and a tiny classifier."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from cases import mlp
from oracles import assert_close, dense_ggn
from scipy.optimize import minimize
from torch import nn

from headwater.curvature import KFAC, Exact, Lanczos
from headwater.task import ClassificationTask, RegressionTask
from headwater.train import minimize_objective
from headwater.uncertainty import LinearizedLaplace

N, SIGMA2, DELTA = 30, 0.25, 2.0


def _blr():
    """Linear regression 4 -> 1 trained as the MAP of prior N(0, 1/δ) and noise σ²."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    y = x @ torch.randn(4, 1, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        N, 1, generator=g, dtype=torch.float64
    )
    model = nn.Linear(4, 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    task = RegressionTask(weight_decay=SIGMA2 * DELTA / N)
    minimize_objective(model, task, (x, y), tol=1e-9)
    phi = torch.cat(
        [x, torch.ones(N, 1, dtype=torch.float64)], dim=1
    )  # parameter order: weight, bias
    return model, task, (x, y), phi


def _closed_form(phi, y, prior, sigma2):
    """Posterior covariance and mean and log evidence with prior precisions ``prior [P]``."""
    precision = phi.T @ phi / sigma2 + torch.diag(prior)
    cov = torch.linalg.inv(precision)
    mean = cov @ phi.T @ y[:, 0] / sigma2
    marg = sigma2 * torch.eye(len(y), dtype=torch.float64) + phi @ torch.diag(1 / prior) @ phi.T
    evidence = torch.distributions.MultivariateNormal(
        torch.zeros(len(y), dtype=torch.float64), marg
    ).log_prob(y[:, 0])
    return cov, mean, evidence


@pytest.fixture(scope="module")
def blr():
    return _blr()


def _laplace(model, task, train, **kw):
    return LinearizedLaplace(model, task, Exact(damping=1e-9), noise_variance=SIGMA2, **kw).fit(
        train
    )


def test_matches_bayesian_linear_regression(blr):
    model, task, train, phi = blr
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # θ̂ is the MAP: no stationarity warning
        la = _laplace(model, task, train)
    assert_close(la.prior_precision, torch.tensor([DELTA], dtype=torch.float64), rtol=1e-12)
    cov, mean, evidence = _closed_form(
        phi, train[1], torch.full((5,), DELTA, dtype=torch.float64), SIGMA2
    )
    assert_close(la.covariance(), cov, rtol=1e-8, atol=1e-12, what="posterior covariance")
    assert_close(la.mean(), mean, rtol=1e-8, atol=1e-10, what="posterior mean")
    assert_close(la.log_marginal_likelihood(), evidence, rtol=1e-8, what="evidence")
    x_new = torch.randn(7, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    phi_new = torch.cat([x_new, torch.ones(7, 1, dtype=torch.float64)], dim=1)
    pred = la.predict(x_new)
    f_var = ((phi_new @ cov) * phi_new).sum(1)
    assert_close(pred.covariance[:, 0, 0], f_var, rtol=1e-8, what="function variance")
    assert_close(pred.variance()[:, 0], f_var + SIGMA2, rtol=1e-8, what="predictive variance")
    assert_close(pred.mean[:, 0], phi_new @ mean, rtol=1e-8, atol=1e-10, what="predictive mean")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_evidence_at_other_priors_and_noise(blr):
    """Recentred, the evidence is exact for every (δ, σ²), not only the training prior."""
    model, task, train, phi = blr
    la = _laplace(model, task, train)
    for prior, sigma2 in ((0.3, 0.25), (7.0, 1.3)):
        _, _, evidence = _closed_form(
            phi, train[1], torch.full((5,), prior, dtype=torch.float64), sigma2
        )
        assert_close(
            la.log_marginal_likelihood(prior, sigma2), evidence, rtol=1e-8, what=f"δ={prior}"
        )
    grouped = _laplace(model, task, train, prior_groups="parameter")
    assert grouped.state.group_names == ("weight", "bias")
    _, _, evidence = _closed_form(
        phi, train[1], torch.tensor([0.5] * 4 + [4.0], dtype=torch.float64), 0.4
    )
    assert_close(
        grouped.log_marginal_likelihood([0.5, 4.0], 0.4), evidence, rtol=1e-8, what="groups"
    )


@pytest.mark.parametrize("groups", ["all", "parameter"])
def test_optimize_prior_matches_closed_form(blr, groups):
    model, task, train, phi = blr
    la = _laplace(model, task, train, prior_groups=groups).optimize_prior(optimize_noise=True)
    n_groups = 1 if groups == "all" else 2

    def negative(z):
        prior = torch.tensor(np.exp(z[:n_groups]), dtype=torch.float64)
        full = prior.expand(5) if n_groups == 1 else torch.cat([prior[0].expand(4), prior[1:]])
        return -float(_closed_form(phi, train[1], full, float(np.exp(z[-1])))[2])

    best = minimize(
        negative,
        np.zeros(n_groups + 1),
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 20000},
    )
    assert_close(la.prior_precision.log(), torch.tensor(best.x[:n_groups]), rtol=1e-4, atol=1e-4)
    assert abs(math.log(la.noise_variance) - best.x[-1]) < 1e-4
    assert float(la.log_marginal_likelihood()) >= -best.fun - 1e-8


def test_optimize_prior_on_a_parameter_subset():
    """Regression: with ``modules`` selecting a subset, the fitted state held an autograd graph
    to the other (trainable) parameters and the second L-BFGS evaluation raised."""
    case = mlp()
    task = ClassificationTask(weight_decay=case.task.weight_decay, modules=["2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the case is not trained: not stationary
        la = LinearizedLaplace(case.model, task, Exact(damping=1e-9), prior_precision=1.0).fit(
            case.train
        )
        assert not any(
            t.requires_grad for t in (la.state.eigvals, la.state.eigvecs, la.state.grad_sum)
        )
        before = float(la.log_marginal_likelihood())
        la.optimize_prior()
    assert float(la.log_marginal_likelihood()) >= before


def test_lanczos_full_rank_equals_exact(blr):
    model, task, train, _ = blr
    exact = _laplace(model, task, train)
    lanczos = LinearizedLaplace(
        model, task, Lanczos(rank=5, n_iter=5, damping=1e-9, residual=False), noise_variance=SIGMA2
    ).fit(train)
    assert_close(lanczos.log_marginal_likelihood(), exact.log_marginal_likelihood(), rtol=1e-8)
    assert_close(lanczos.covariance(), exact.covariance(), rtol=1e-6, atol=1e-10)
    low = LinearizedLaplace(
        model, task, Lanczos(rank=2, damping=1e-9, residual=False), noise_variance=SIGMA2
    ).fit(train)
    # the discarded directions keep only the prior: larger variance than the exact posterior
    assert bool(
        (torch.diagonal(low.covariance()) >= torch.diagonal(exact.covariance()) - 1e-12).all()
    )


def test_stationarity_warning(blr):
    model, task, train, _ = blr
    untrained = copy.deepcopy(model)
    with torch.no_grad():
        untrained.weight.add_(0.3)
    with pytest.warns(RuntimeWarning, match="stationary"):
        LinearizedLaplace(
            untrained, task, Exact(damping=1e-9), noise_variance=SIGMA2, recenter=False
        ).fit(train)
    la = _laplace(model, task, train, recenter=False)
    with pytest.warns(RuntimeWarning, match="stationary"):
        la.optimize_prior()


def test_classifier():
    case = mlp()
    model, task, train = case.model, case.task, case.train
    minimize_objective(model, task, train, tol=1e-9)
    la = LinearizedLaplace(model, task, Exact(damping=1e-9)).fit(train)
    n = train[0].shape[0]
    # the default prior n·wd makes the posterior precision n × the mean objective's GGN
    cov = torch.linalg.inv(n * dense_ggn(model, task, train))
    assert_close(la.covariance(), cov, rtol=1e-7, atol=1e-10, what="classifier covariance")
    assert la.stationarity() < 1e-6
    x = case.query[0]
    pred = la.predict(x)
    jac = torch.stack(
        [
            torch.cat(
                [
                    t.reshape(-1)
                    for t in torch.autograd.grad(
                        model(x[i : i + 1])[0, c], list(model.parameters())
                    )
                ]
            )
            for i in range(len(x))
            for c in range(3)
        ]
    )
    jac = jac.reshape(len(x), 3, -1)
    assert_close(
        pred.covariance, jac @ cov @ jac.transpose(1, 2), rtol=1e-7, atol=1e-12, what="Σ_f"
    )
    assert pred.noise_variance is None
    probit = la.probabilities(x)
    mc = la.probabilities(x, method="mc", n_samples=4000, seed=1)
    map_probs = torch.softmax(model(x).detach(), dim=-1)
    assert_close(probit.sum(1), torch.ones(len(x), dtype=torch.float64), rtol=1e-12)
    # MC vs an independent MC over the logits' Gaussian (same distribution, other draws)
    draws = torch.distributions.MultivariateNormal(
        pred.mean, pred.covariance + 1e-12 * torch.eye(3)
    )
    reference = torch.softmax(draws.sample((4000,)), dim=-1).mean(0)
    assert (mc - reference).abs().max() < 0.03
    # the probit approximation is close to MC when the function variance is small (a tight prior)
    tight = LinearizedLaplace(
        model, task, la.curvature, prior_precision=50.0 * n, recenter=False, stationarity_tol=10.0
    ).fit(train)
    assert tight.predict(x).variance().max() < 0.5
    assert (
        tight.probabilities(x) - tight.probabilities(x, method="mc", n_samples=4000)
    ).abs().max() < 0.02

    def entropy(p):
        return -(p * p.log()).sum(1)

    assert bool((entropy(probit) >= entropy(map_probs) - 1e-9).all())  # integrating spreads mass
    before = float(la.log_marginal_likelihood())
    assert float(la.optimize_prior().log_marginal_likelihood()) >= before


def test_errors(blr):
    model, task, train, _ = blr
    with pytest.raises(ValueError, match="curvature"):
        LinearizedLaplace(model, task, Exact(kind="hessian"))
    with pytest.raises(TypeError, match="curvature"):
        LinearizedLaplace(model, task, KFAC())
    with pytest.raises(ValueError, match="noise_variance"):
        LinearizedLaplace(model, ClassificationTask(), Exact(), noise_variance=1.0)
    with pytest.raises(ValueError, match="prior_precision"):
        LinearizedLaplace(model, RegressionTask(), Exact(damping=1e-9)).fit(train)
    with pytest.raises(ValueError, match="prior_precision"):
        LinearizedLaplace(model, task, Exact(damping=1e-9), prior_precision=[1.0, 2.0]).fit(train)
    with pytest.raises(ValueError, match="prior_groups"):
        LinearizedLaplace(model, task, Exact(damping=1e-9), prior_groups=[["weight"]]).fit(train)
    with pytest.raises(RuntimeError, match="fit"):
        LinearizedLaplace(model, task, Exact()).mean()
