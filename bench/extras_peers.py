"""The reference libraries' self-influence, TracIn and Laplace calls used by ``bench.extras``.

Every function takes plain tensors and a model, never modifies the model (peers that
hook or wrap a model get a deep copy; a bare leaf layer such as logreg's ``nn.Linear`` is
wrapped in ``nn.Sequential`` first, its checkpoint keys prefixed to match), and returns
numbers in headwater's convention (shared DESIGN.md; conversions in each docstring):

* self-influence ``s_i = ∇ℓ_iᵀ (M + λI)⁻¹ ∇ℓ_i`` with ``M`` the curvature of the *mean*
  training objective (the L2 term ``weight_decay·I`` folded into the peer's damping, as in
  ``bench.peers``), or TracIn's ``Σ_c η_c s_c ‖∇ℓ_i(θ_c)‖²``;
* TracIn scores ``Σ_c η_c s_c ∇m(q; θ_c)ᵀ∇ℓ(i; θ_c)``, ``[n_query, n_train]``.

A checkpoint is a :class:`headwater.methods.tracin.Checkpoint` (state, learning rate ``η``,
``steps`` it stands for); every peer gets the same states and the weight ``η·steps`` as its
"learning rate" (Captum's ``checkpoints_load_func`` return value, dattri's ``weight_list``).
Failures raise; ``bench.extras`` records them as error rows.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bench.peers import _default_dtype
from headwater.methods.tracin import Checkpoint

__all__ = [
    "captum_naive_self",
    "captum_tracin_scores",
    "captum_tracin_self",
    "dattri_ekfac_self",
    "dattri_explicit_self",
    "dattri_tracin_scores",
    "dattri_tracin_self",
    "kronfluence_ekfac_self",
    "laplace_torch",
    "pydvl_ekfac_self",
]


def _wrapped(model: nn.Module) -> tuple[nn.Module, str]:
    """Deep copy, a bare leaf layer wrapped in ``nn.Sequential``; the state-key prefix."""
    m = copy.deepcopy(model)
    prefix = ""
    if len(list(m.children())) == 0:
        m, prefix = nn.Sequential(m), "0."
    for p in m.parameters():
        p.requires_grad_(True)
    return m, prefix


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings, and dattri's progress bars (tqdm, on stderr) go nowhere."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _state(c: Checkpoint, prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v.clone() for k, v in c.state.items()}


# ------------------------------------------------------------------------------ Captum


def _captum_tracin(
    model: nn.Module, checkpoints: Sequence[Checkpoint], x: Tensor, y: Tensor, batch_size: int
):
    from captum.influence import TracInCP

    m, prefix = _wrapped(model)

    def load(module: nn.Module, c: Checkpoint) -> float:
        module.load_state_dict(_state(c, prefix))
        return float(c.lr * c.steps)  # Captum multiplies each checkpoint's products by this

    return TracInCP(
        m,
        DataLoader(TensorDataset(x, y), batch_size=batch_size),
        checkpoints=list(checkpoints),
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        sample_wise_grads_per_batch=True,
    )


def captum_tracin_self(
    model: nn.Module,
    checkpoints: Sequence[Checkpoint],
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 250,
) -> Tensor:
    """Captum ``TracInCP.self_influence()``: ``Σ_c lr_c ‖∇ℓ_i(θ_c)‖²`` with ``lr_c = η_c·s_c``.

    Captum's batched per-example gradients (``sample_wise_grads_per_batch=True``, Linear
    layers) need a summed loss: ``CrossEntropyLoss(reduction="sum")``; each example's
    gradient is then its own CE gradient. Same quantity as headwater, no conversion.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _captum_tracin(model, checkpoints, x, y, batch_size).self_influence().detach()


def captum_tracin_scores(
    model: nn.Module,
    checkpoints: Sequence[Checkpoint],
    x_train: Tensor,
    y_train: Tensor,
    x_query: Tensor,
    y_query: Tensor,
    *,
    batch_size: int = 250,
) -> Tensor:
    """Captum ``TracInCP.influence((x_query, y_query))`` ``[n_query, n_train]``: ``Σ_c lr_c
    ∇L(q; θ_c)ᵀ∇ℓ(i; θ_c)`` with the CE as the query loss. Positive = proponent, as in
    headwater; with ``lr_c = η_c·s_c`` it is headwater's TracIn score, no rescaling."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = _captum_tracin(model, checkpoints, x_train, y_train, batch_size)
        return tr.influence((x_query, y_query)).detach()


def captum_naive_self(
    model: nn.Module, x: Tensor, y: Tensor, *, damping: float, weight_decay: float
) -> Tensor:
    """Captum ``NaiveInfluenceFunction.self_influence()`` (dense Hessian of the *summed* CE,
    eigendecomposed, every direction kept): ``hessian_reg = n·(damping + weight_decay)``,
    self-influence × n (summed → mean-loss curvature). Small models only."""
    from captum.influence import NaiveInfluenceFunction

    n = x.shape[0]
    m, _ = _wrapped(model)
    p = sum(q.numel() for q in m.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = NaiveInfluenceFunction(
            m,
            DataLoader(TensorDataset(x, y), batch_size=n),
            checkpoint="in-memory",
            checkpoints_load_func=lambda _m, _p: 1.0,
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            sample_wise_grads_per_batch=False,
            projection_dim=p,
            hessian_reg=n * (damping + weight_decay),
            hessian_inverse_tol=1e-12,
        )
        return inf.self_influence().detach() * n


# -------------------------------------------------------------------------- Kronfluence


def kronfluence_ekfac_self(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    damping_factor: float | None,
    seed: int = 0,
    batch_size: int = 100,
) -> Tensor:
    """Kronfluence EK-FAC ``compute_self_scores``: ``∇ℓ_iᵀ (F_ekfac + d·I)⁻¹ ∇ℓ_i`` with the
    true Fisher (labels sampled from the model, ``seed``) averaged over examples (mean-loss
    scale), per-module damping ``d = damping + weight_decay`` (``None``: its heuristic,
    0.1 × mean eigenvalue). The train loss is summed per batch (kronfluence's rule), so each
    example's gradient is its own CE gradient: same scale as headwater, no conversion."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    dt = next(model.parameters()).dtype

    class _Task(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, targets = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    targets = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(-1)
            return F.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, targets = batch
            return F.cross_entropy(model(inputs), targets, reduction="sum")

    task = _Task()
    m = prepare_model(_wrapped(model)[0], task)
    fa = FactorArguments(
        strategy="ekfac",
        activation_covariance_dtype=dt,
        gradient_covariance_dtype=dt,
        per_sample_gradient_dtype=dt,
        lambda_dtype=dt,
        eigendecomposition_dtype=torch.float64,
    )
    sa = ScoreArguments(
        damping_factor=damping_factor,
        per_sample_gradient_dtype=dt,
        precondition_dtype=dt,
        score_dtype=dt,
    )
    data = TensorDataset(x, y)
    with (
        tempfile.TemporaryDirectory(prefix="bench-extras-kronfluence-") as out,
        _default_dtype(dt),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        an = Analyzer(
            analysis_name="extras",
            model=m,
            task=task,
            cpu=True,
            disable_tqdm=True,
            output_dir=out,
            log_level=40,
        )
        torch.manual_seed(seed)
        an.fit_all_factors(
            factors_name="ekfac",
            dataset=data,
            per_device_batch_size=batch_size,
            factor_args=fa,
            overwrite_output_dir=True,
        )
        an.compute_self_scores(
            scores_name="self",
            factors_name="ekfac",
            train_dataset=data,
            per_device_train_batch_size=batch_size,
            score_args=sa,
            overwrite_output_dir=True,
        )
        return an.load_self_scores("self")["all_modules"].clone()


# ------------------------------------------------------------------------------- dattri


def _dattri_task(model: nn.Module, checkpoints: list[dict[str, Tensor]]):
    from dattri.task import AttributionTask

    m = copy.deepcopy(model)
    dt = next(m.parameters()).dtype

    def loss_func(params, data):  # one example (vmapped) or a batch: mean CE either way
        inputs, targets = data
        return F.cross_entropy(
            torch.func.functional_call(m, params, (inputs.to(dt),)), targets.long()
        )

    return AttributionTask(loss_func=loss_func, model=m, checkpoints=checkpoints)


def _loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _dattri_tracin(model: nn.Module, checkpoints: Sequence[Checkpoint]):
    from dattri.algorithm.tracin import TracInAttributor

    task = _dattri_task(model, [{k: v.clone() for k, v in c.state.items()} for c in checkpoints])
    weights = torch.tensor([c.lr * c.steps for c in checkpoints])
    return TracInAttributor(task, weight_list=weights, normalized_grad=False, device="cpu")


def dattri_tracin_self(
    model: nn.Module,
    checkpoints: Sequence[Checkpoint],
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 250,
) -> Tensor:
    """dattri ``TracInAttributor.self_attribute``: ``Σ_c w_c ‖Π∇ℓ_i(θ_c)‖²`` with
    ``w_c = η_c·s_c``; dattri always projects the gradients randomly (its default
    ``proj_dim=512``, seed 0), so this is TracIn up to a Johnson-Lindenstrauss error."""
    with _quiet():
        return _dattri_tracin(model, checkpoints).self_attribute(_loader(x, y, batch_size)).detach()


def dattri_tracin_scores(
    model: nn.Module,
    checkpoints: Sequence[Checkpoint],
    x_train: Tensor,
    y_train: Tensor,
    x_query: Tensor,
    y_query: Tensor,
    *,
    batch_size: int = 250,
) -> Tensor:
    """dattri ``TracInAttributor.attribute`` (projected, as above), transposed to
    ``[n_query, n_train]``; positive = proponent, no rescaling."""
    with _quiet():
        out = _dattri_tracin(model, checkpoints).attribute(
            _loader(x_train, y_train, batch_size), _loader(x_query, y_query, batch_size)
        )
    return out.detach().T


def dattri_explicit_self(
    model: nn.Module, x: Tensor, y: Tensor, *, damping: float, weight_decay: float
) -> Tensor:
    """dattri ``IFAttributorExplicit.self_attribute``: the dense Hessian of the mean CE
    (one full batch) + ``regularization·I``, ``regularization = damping + weight_decay``;
    positive, mean-loss scale: no conversion. Small models only."""
    from dattri.algorithm.influence_function import IFAttributorExplicit

    task = _dattri_task(model, [copy.deepcopy(model.state_dict())])
    att = IFAttributorExplicit(task, device="cpu", regularization=damping + weight_decay)
    with torch.no_grad(), _quiet():
        att.cache(_loader(x, y, x.shape[0]))
        return att.self_attribute(_loader(x, y, x.shape[0])).detach()


def dattri_ekfac_self(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    damping: float,
    weight_decay: float,
    batch_size: int | None = None,
) -> Tensor:
    """dattri ``IFAttributorEKFAC.self_attribute`` (every Linear module, its Fisher from the
    mean CE with the true labels), ``damping = damping + weight_decay``; no conversion.
    One batch of all examples by default: with batches of 100 dattri 0.3.0's
    ``self_attribute`` fails (size mismatch 1000 vs 100 inside it)."""
    batch_size = batch_size or x.shape[0]
    from dattri.algorithm.influence_function import IFAttributorEKFAC

    task = _dattri_task(_wrapped(model)[0], [copy.deepcopy(_wrapped(model)[0].state_dict())])
    att = IFAttributorEKFAC(task, device="cpu", damping=damping + weight_decay)
    with _quiet():
        att.cache(_loader(x, y, batch_size))
        return att.self_attribute(_loader(x, y, batch_size)).detach()


# -------------------------------------------------------------------------------- pyDVL


def pydvl_ekfac_self(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    damping: float,
    weight_decay: float,
    batch_size: int = 100,
) -> Tensor:
    """pyDVL 0.10 has no self-influence call: the diagonal of its pairwise
    ``EkfacInfluence.influences(x, y, x, y)`` (``[n, n]``; mean-loss factors,
    ``hessian_regularization = damping + weight_decay``, positive = helpful: no conversion).
    Runs in float32 (pyDVL allocates its factors in the default dtype)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import EkfacInfluence

        m32 = _wrapped(model)[0].float()
        x32 = x.float()
        inf = EkfacInfluence(
            m32, update_diagonal=True, hessian_regularization=damping + weight_decay
        )
        inf = inf.fit(DataLoader(TensorDataset(x32, y), batch_size=batch_size))
        return inf.influences(x32, y, x32, y, mode=InfluenceMode.Up).diagonal().detach().clone()


# ------------------------------------------------------------------------ laplace-torch


def laplace_torch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    x_test: Tensor,
    *,
    prior_precision: float,
    last_layer: bool,
    optimize: bool = False,
) -> dict[str, Any]:
    """laplace-torch ``Laplace(..., "classification", hessian_structure="full")``, the full
    GGN (its default ``CurvlinopsGGN`` backend) of the *summed* CE over all weights or the
    last layer; linearised ("glm") predictive.

    Returns ``cov`` ``[N, C, C]`` (``J P⁻¹ Jᵀ``, from its ``_glm_predictive_distribution``,
    the one call that picks last-layer Jacobians when needed), ``probs`` (``link_approx="probit"``), ``lml`` (its
    ``log_marginal_likelihood()`` at ``prior_precision``) and, with ``optimize``, the
    scalar prior precision chosen by ``optimize_prior_precision(method="marglik")`` from
    ``prior_precision`` (Adam on log δ, its defaults: 100 steps, lr 0.1) and the evidence there. Same conventions as headwater's
    ``LinearizedLaplace`` with ``recenter=False`` (θ̂ kept as the posterior mean): no
    conversion.
    """
    from laplace import Laplace

    m, _ = _wrapped(model)
    la = Laplace(
        m,
        "classification",
        subset_of_weights="last_layer" if last_layer else "all",
        hessian_structure="full",
        prior_precision=float(prior_precision),
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=x.shape[0]))
    _, cov = la._glm_predictive_distribution(x_test)  # (f_mu, f_var); last-layer aware
    out: dict[str, Any] = {
        "cov": cov.detach(),
        "probs": la(x_test, pred_type="glm", link_approx="probit").detach(),
        "lml": float(la.log_marginal_likelihood()),
    }
    if optimize:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la.optimize_prior_precision(
                method="marglik",
                pred_type="glm",
                link_approx="probit",
                prior_structure="scalar",
                init_prior_prec=float(prior_precision),
            )
        out["prior"] = float(la.prior_precision.reshape(-1)[0])
        out["lml_opt"] = float(la.log_marginal_likelihood())
    return out
