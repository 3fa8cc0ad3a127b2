"""Adapters that run the reference libraries on a bench problem and convert their scores.

Every adapter has the signature

    fn(model, problem, *, damping, measurement="margin", **settings) -> PeerResult

and returns ``PeerResult.scores`` as a ``[n_test, n_train]`` tensor in headwater's
convention (shared DESIGN.md):

    score[q, i] = grad m(q)^T (H + damping*I)^{-1} grad l(i)

with ``H`` the curvature of the *mean* training objective, mean CE +
(weight_decay/2)||theta||^2, and ``l(i)`` the per-example CE (no regulariser). Removing
training example i changes m(q) by about ``+score[q, i]/n``; with the loss as the
measurement a positive score means i helps q. ``measurement`` is ``"loss"`` (CE) or
``"margin"`` (logit_y - logsumexp of the other logits).

Two conversions are common to all peers (documented once here, again per adapter):

* **Regulariser.** Every peer is given the plain CE as its training loss (the L2 term
  must not enter the per-example gradients ``grad l(i)``). The Hessian/GGN/Fisher of the
  L2 term is exactly ``weight_decay * I``, so it is folded into the peer's damping:
  ``peer_damping = damping + weight_decay`` in mean-loss units (``settings["peer_damping"]``).
* **Mean vs. sum.** Peers whose curvature is that of the *summed* loss (Captum) get
  ``n * peer_damping`` and their scores are multiplied by ``n``.

The model passed in is never modified: adapters that install hooks or wrappers work on a
deep copy. Features are cast to the model's dtype; float64 is used where the peer allows
(``torch.set_default_dtype`` is set to the model dtype during the call so that tensors
the peers allocate themselves match). Failures (exceptions) give ``scores=None`` and a
note; non-finite scores are kept and flagged in the note.

Each adapter is checked by ``python -m bench.smoke_peers`` on the convex logreg problem
(float64, loss measurement, tiny damping) against ``bench.reference.exact_scores``:
the exact peers (Captum Naive, pyDVL CG) must give Pearson > 0.99 and scale ratio ~ 1.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata as _md
import tempfile
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.measure import measure
from bench.problems import Problem, margin_from_logits

__all__ = [
    "PEERS",
    "PeerResult",
    "captum_arnoldi",
    "captum_naive",
    "dattri_arnoldi",
    "dattri_cg",
    "dattri_lissa",
    "kronfluence_ekfac",
    "kronfluence_ekfac_heuristic",
    "pydvl_arnoldi",
    "pydvl_cg",
    "pydvl_ekfac",
    "pydvl_lissa",
    "run_all",
    "trak",
    "trak_damped",
]

MEASUREMENTS = ("loss", "margin")


@dataclass
class PeerResult:
    """One peer method's converted scores and cost.

    ``scores``: ``[n_test, n_train]`` in headwater's convention, or None on failure.
    ``settings``: everything passed to the peer (incl. ``peer_damping`` and the
    ``measurement`` actually used). ``note``: conversion caveats or the failure.
    """

    name: str
    library: str
    version: str
    settings: dict[str, Any]
    scores: torch.Tensor | None
    seconds: float
    peak_mb: float
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.scores is None or not bool(torch.isfinite(self.scores).all())

    @property
    def measurement(self) -> str:
        return self.settings.get("measurement", "?")


# --------------------------------------------------------------------------- helpers


def _version(dist: str) -> str:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return "not installed"


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _data(model: nn.Module, problem: Problem):
    dt = _dtype(model)
    return (problem.X_train.to(dt), problem.y_train, problem.X_test.to(dt), problem.y_test)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _quiet():
    """Silence warnings (pyDVL's imports emit FutureWarnings from its dependencies)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _check_measurement(measurement: str) -> None:
    if measurement not in MEASUREMENTS:
        raise ValueError(f"measurement must be one of {MEASUREMENTS}, got {measurement!r}")


def _run(
    name: str,
    library: str,
    dist: str,
    settings: dict[str, Any],
    fn: Callable[[], torch.Tensor],
    model: nn.Module,
    note: str = "",
) -> PeerResult:
    """Measure ``fn`` (returns converted scores); turn exceptions into a failed result."""
    version = _version(dist)
    notes = [note] if note else []
    scores: torch.Tensor | None
    try:
        with _default_dtype(_dtype(model)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores, seconds, peak = measure(fn)
        scores = scores.detach().cpu()
        if not torch.isfinite(scores).all():
            bad = int((~torch.isfinite(scores)).sum())
            notes.append(f"NON-FINITE: {bad} of {scores.numel()} scores are nan/inf")
    except Exception as e:  # a peer failing is a result, not a crash
        scores, seconds, peak = None, float("nan"), float("nan")
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {tb[-1].filename.split('site-packages/')[-1]}:{tb[-1].lineno}" if tb else ""
        notes.append(f"FAILED: {type(e).__name__}: {str(e)[:300]}{where}")
    return PeerResult(name, library, version, settings, scores, seconds, peak, "; ".join(notes))


def _base_settings(
    problem: Problem, model: nn.Module, damping: float, measurement: str, **kw
) -> dict[str, Any]:
    return dict(
        problem=problem.name,
        dtype=str(_dtype(model)).replace("torch.", ""),
        damping=float(damping),
        weight_decay=problem.weight_decay,
        peer_damping=float(damping) + problem.weight_decay,
        measurement=measurement,
        n_train=problem.n_train,
        n_test=problem.n_test,
        **kw,
    )


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _as_sequential(model: nn.Module) -> nn.Module:
    """Deep copy; a bare leaf layer (logreg's nn.Linear) is wrapped in nn.Sequential so
    that libraries which replace/hook *child* modules find it."""
    m = copy.deepcopy(model)
    if len(list(m.children())) == 0:
        m = nn.Sequential(m)
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def top_hessian_eigenvalue(
    model: nn.Module, problem: Problem, iters: int = 30, seed: int = 0
) -> float:
    """Largest eigenvalue of the full-batch Hessian of the mean CE (power iteration).

    Used to choose LiSSA's scale (it must exceed the top eigenvalue of every minibatch
    Hessian, so adapters take a multiple of this). Not a peer computation.
    """
    Xtr, ytr, _, _ = _data(model, problem)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    lam = 0.0
    for _ in range(iters):
        nrm = torch.sqrt(sum((t * t).sum() for t in v))
        v = [t / nrm for t in v]
        loss = F.cross_entropy(model(Xtr), ytr)
        gr = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(gr, params, grad_outputs=v)
        lam = float(sum((a * b).sum() for a, b in zip(hv, v)))
        v = [t.detach() for t in hv]
    return abs(lam) + problem.weight_decay


# ----------------------------------------------------------------------- kronfluence


def _kronfluence_scores(
    model: nn.Module,
    problem: Problem,
    *,
    damping_factor: float | None,
    measurement: str,
    train_batch_size: int,
    seed: int,
    empirical_fisher: bool = False,
) -> torch.Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    Xtr, ytr, Xte, yte = _data(model, problem)
    dt = _dtype(model)

    class _Task(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # true Fisher: labels drawn from the model's predictive distribution
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(-1)
            return F.cross_entropy(logits, y, reduction="sum")  # kronfluence wants the SUM

        def compute_measurement(self, batch, model):
            x, y = batch
            logits = model(x)
            if measurement == "loss":
                return F.cross_entropy(logits, y, reduction="sum")
            return margin_from_logits(logits, y).sum()  # +margin: no sign flip (see docstring)

    task = _Task()
    m = prepare_model(_as_sequential(model), task)
    fa = FactorArguments(
        strategy="ekfac",
        activation_covariance_dtype=dt,
        gradient_covariance_dtype=dt,
        per_sample_gradient_dtype=dt,
        lambda_dtype=dt,
        eigendecomposition_dtype=torch.float64,
        use_empirical_fisher=empirical_fisher,
    )
    sa = ScoreArguments(
        damping_factor=damping_factor,
        per_sample_gradient_dtype=dt,
        precondition_dtype=dt,
        score_dtype=dt,
    )
    with tempfile.TemporaryDirectory(prefix="bench-kronfluence-") as out:
        an = Analyzer(
            analysis_name="bench",
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
            dataset=TensorDataset(Xtr, ytr),
            per_device_batch_size=train_batch_size,
            factor_args=fa,
            overwrite_output_dir=True,
        )
        an.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name="ekfac",
            query_dataset=TensorDataset(Xte, yte),
            train_dataset=TensorDataset(Xtr, ytr),
            per_device_query_batch_size=len(yte),
            per_device_train_batch_size=train_batch_size,
            score_args=sa,
            overwrite_output_dir=True,
        )
        scores = an.load_pairwise_scores("pairwise")["all_modules"].clone()
    return scores


def kronfluence_ekfac(
    model: nn.Module,
    problem: Problem,
    *,
    damping: float,
    measurement: str = "margin",
    train_batch_size: int = 100,
    seed: int = 0,
    heuristic_damping: bool = False,
    empirical_fisher: bool = False,
) -> PeerResult:
    """Kronfluence EK-FAC (true Fisher, labels sampled from the model with ``seed``; with
    ``empirical_fisher=True`` the true labels: deterministic, headwater's ``kind="ef"``).

    Conversion: kronfluence's pairwise score is ``g_q^T (F_ekfac + d I)^{-1} g_i`` with the
    EK-FAC factors averaged over examples (curvature of the mean loss) and the train loss
    summed per batch; ``g_q`` is the gradient of ``compute_measurement``, which returns
    +loss or +margin here (kronfluence's own examples return ``-margin`` to make the
    margin behave like a loss; we do not, to get headwater's convention). Positive =
    helpful for the loss: same sign and scale as headwater, no rescaling. The damping is
    added per module to the eigenvalue-corrected diagonal: ``damping_factor =
    damping + weight_decay``. With ``heuristic_damping=True`` kronfluence's
    ``damping_factor=None`` is used instead (0.1 x mean eigenvalue of each module, and
    then neither ``damping`` nor the L2 term enters).
    """
    _check_measurement(measurement)
    s = _base_settings(
        problem,
        model,
        damping,
        measurement,
        train_batch_size=train_batch_size,
        seed=seed,
        strategy="ekfac",
        fisher="empirical" if empirical_fisher else "true (sampled labels)",
    )
    if heuristic_damping:
        s["peer_damping"] = None
        s["damping_factor"] = "heuristic: 0.1 * mean(lambda) per module"
        df = None
    else:
        df = s["peer_damping"]
        s["damping_factor"] = df
    name = (
        "kronfluence-ekfac"
        + ("-ef" if empirical_fisher else "")
        + ("-heuristic" if heuristic_damping else "")
    )
    return _run(
        name,
        "kronfluence",
        "kronfluence",
        s,
        lambda: _kronfluence_scores(
            model,
            problem,
            damping_factor=df,
            measurement=measurement,
            train_batch_size=train_batch_size,
            seed=seed,
            empirical_fisher=empirical_fisher,
        ),
        model,
        note="heuristic damping ignores `damping` and the L2 term" if heuristic_damping else "",
    )


def kronfluence_ekfac_heuristic(
    model: nn.Module, problem: Problem, *, damping: float, measurement: str = "margin", **kw
) -> PeerResult:
    """Kronfluence EK-FAC with its own heuristic damping (``damping_factor=None``)."""
    return kronfluence_ekfac(
        model, problem, damping=damping, measurement=measurement, heuristic_damping=True, **kw
    )


# ----------------------------------------------------------------------------- pyDVL


def _pydvl_loss(n_classes: int, measurement: str):
    """Loss callable for pyDVL: ``loss(outputs, target) -> scalar`` (mean over the batch).

    pyDVL uses one loss for the curvature, the training gradients and the query
    gradients. For the margin measurement, query targets are passed offset by
    ``n_classes``: targets >= n_classes select the margin of class ``target - n_classes``,
    other targets the CE. Training targets are never offset, so the curvature and
    ``grad l(i)`` are the plain CE. vmap-safe (no data-dependent control flow).
    """
    if measurement == "loss":
        return F.cross_entropy

    def loss(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        is_query = target >= n_classes
        t = torch.remainder(target, n_classes)
        ce = F.cross_entropy(outputs, t, reduction="none")
        mg = margin_from_logits(outputs, t)
        return torch.where(is_query, mg, ce).mean()

    return loss


def _pydvl_run(
    make: Callable[[Callable], Any],
    model: nn.Module,
    problem: Problem,
    measurement: str,
    fit_batch_size: int,
) -> torch.Tensor:
    with _quiet():
        from pydvl.influence import InfluenceMode

    Xtr, ytr, Xte, yte = _data(model, problem)
    n_classes = int(problem.y_train.max()) + 1
    m = copy.deepcopy(model)
    inf = make(_pydvl_loss(n_classes, measurement), m)
    inf = inf.fit(DataLoader(TensorDataset(Xtr, ytr), batch_size=fit_batch_size))
    yq = yte + n_classes if measurement == "margin" else yte
    return inf.influences(Xte, yq, Xtr, ytr, mode=InfluenceMode.Up)


def pydvl_cg(
    model: nn.Module,
    problem: Problem,
    *,
    damping: float,
    measurement: str = "margin",
    rtol: float = 1e-4,
    atol: float = 1e-6,
    maxiter: int | None = 100,
    fit_batch_size: int | None = None,
) -> PeerResult:
    """pyDVL ``CgInfluence`` with block CG (``solve_simultaneously=True``), exact Hessian HVPs.

    Conversion: pyDVL returns ``<(H + r I)^{-1} g_test, g_train>`` with H the Hessian of
    the *mean* loss over its data loader (batches averaged), positive = helpful; so
    ``regularization = damping + weight_decay`` and no rescaling. The margin measurement
    goes through the target-offset loss (see ``_pydvl_loss``). ``maxiter`` defaults to 100
    block iterations, as dattri CG (pyDVL's default, 10 x the number of right-hand sides,
    ran for over 10 minutes on the non-convex MLP); ``None`` restores pyDVL's default.
    """
    with _quiet():
        from pydvl.influence.torch import CgInfluence

    _check_measurement(measurement)
    bs = fit_batch_size or problem.n_train
    s = _base_settings(
        problem,
        model,
        damping,
        measurement,
        solve_simultaneously=True,
        rtol=rtol,
        atol=atol,
        maxiter=maxiter,
        fit_batch_size=bs,
        second_order_mode="hessian",
    )
    return _run(
        "pydvl-cg",
        "pydvl",
        "pyDVL",
        s,
        lambda: _pydvl_run(
            lambda loss, m: CgInfluence(
                m,
                loss,
                regularization=s["peer_damping"],
                rtol=rtol,
                atol=atol,
                maxiter=maxiter,
                solve_simultaneously=True,
                warn_on_max_iteration=False,
            ),
            model,
            problem,
            measurement,
            bs,
        ),
        model,
    )


def pydvl_lissa(
    model: nn.Module,
    problem: Problem,
    *,
    damping: float,
    measurement: str = "margin",
    scale: float | None = None,
    maxiter: int = 1000,
    batch_size: int = 50,
    rtol: float = 1e-4,
    seed: int = 0,
) -> PeerResult:
    """pyDVL ``LissaInfluence`` (minibatch Hessian HVPs, ``maxiter`` recursion steps).

    Conversion: pyDVL's LiSSA solves ``(H + r I) x = g_test`` with H of the mean loss (each
    step uses one shuffled minibatch of ``batch_size``) and divides by the scale itself, so
    ``regularization = damping + weight_decay``, ``dampen = 0``, no rescaling. ``scale``
    defaults to 3 x the top eigenvalue of the damped full-batch Hessian (LiSSA diverges if
    the scale is below the top eigenvalue of a damped minibatch Hessian); pyDVL's default
    scale is 10.
    """
    with _quiet():
        from pydvl.influence.torch import LissaInfluence

    _check_measurement(measurement)
    if scale is None:
        scale = 3.0 * (top_hessian_eigenvalue(model, problem) + damping)
    s = _base_settings(
        problem,
        model,
        damping,
        measurement,
        scale=scale,
        maxiter=maxiter,
        batch_size=batch_size,
        rtol=rtol,
        dampen=0.0,
        seed=seed,
    )

    def go():
        torch.manual_seed(seed)
        return _pydvl_run(
            lambda loss, m: LissaInfluence(
                m,
                loss,
                regularization=s["peer_damping"],
                maxiter=maxiter,
                dampen=0.0,
                scale=scale,
                rtol=rtol,
                warn_on_max_iteration=False,
            ),
            model,
            problem,
            measurement,
            batch_size,
        )

    return _run("pydvl-lissa", "pydvl", "pyDVL", s, go, model)


def pydvl_arnoldi(
    model: nn.Module,
    problem: Problem,
    *,
    damping: float,
    measurement: str = "margin",
    rank: int = 50,
    use_woodbury: bool = False,
) -> PeerResult:
    """pyDVL ``ArnoldiInfluence``: top-``rank`` eigenpairs (by |lambda|) of the mean-loss
    Hessian via ARPACK, inverse ``V (D + r)^{-1} V^T`` (discarded directions contribute 0
    unless ``use_woodbury``). Conversion: ``regularization = damping + weight_decay``,
    positive = helpful, no rescaling.
    """
    with _quiet():
        from pydvl.influence.torch import ArnoldiInfluence

    _check_measurement(measurement)
    s = _base_settings(problem, model, damping, measurement, rank=rank, use_woodbury=use_woodbury)
    return _run(
        "pydvl-arnoldi",
        "pydvl",
        "pyDVL",
        s,
        lambda: _pydvl_run(
            lambda loss, m: ArnoldiInfluence(
                m, loss, regularization=s["peer_damping"], rank=rank, use_woodbury=use_woodbury
            ),
            model,
            problem,
            measurement,
            problem.n_train,
        ),
        model,
    )


def pydvl_ekfac(
    model: nn.Module,
    problem: Problem,
    *,
    damping: float,
    measurement: str = "margin",
    fit_batch_size: int = 100,
    update_diagonal: bool = True,
) -> PeerResult:
    """pyDVL ``EkfacInfluence`` (``update_diagonal=True``: eigenvalue-corrected).

    Conversion: factors are averaged over examples (mean loss), ``hessian_regularization``
    is added to the EK-FAC diagonal: ``damping + weight_decay``; positive = helpful, no
    rescaling. ``EkfacInfluence`` fixes its loss to the CE; its factors are fitted with
    its own label-free loss, and ``.loss`` (the attribute set by pyDVL's base class) is
    used only for the per-example gradients. For the margin measurement ``.loss`` is
    replaced by the target-offset loss of ``_pydvl_loss`` (training gradients stay the
    CE, query gradients become the margin). Runs in float32 (pyDVL allocates its factors
    in the default dtype).
    """
    with _quiet():
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import EkfacInfluence

    _check_measurement(measurement)
    m32 = copy.deepcopy(model).float()
    s = _base_settings(
        problem,
        m32,
        damping,
        measurement,
        fit_batch_size=fit_batch_size,
        update_diagonal=update_diagonal,
    )
    n_classes = int(problem.y_train.max()) + 1

    def go():
        Xtr, ytr, Xte, yte = _data(m32, problem)
        inf = EkfacInfluence(
            _as_sequential(m32),
            update_diagonal=update_diagonal,
            hessian_regularization=s["peer_damping"],
        )
        if measurement == "margin":
            inf.loss = _pydvl_loss(n_classes, "margin")
        inf = inf.fit(DataLoader(TensorDataset(Xtr, ytr), batch_size=fit_batch_size))
        yq = yte + n_classes if measurement == "margin" else yte
        return inf.influences(Xte, yq, Xtr, ytr, mode=InfluenceMode.Up)

    return _run("pydvl-ekfac", "pydvl", "pyDVL", s, go, m32)


# ---------------------------------------------------------------------------- dattri


def _dattri_task(model: nn.Module, measurement: str):
    from dattri.task import AttributionTask

    dt = _dtype(model)

    def loss_func(params, data):
        # data: (x [B, d], y [B]); mean CE -> Hessian of the MEAN loss, per-example
        # gradients are taken by dattri on batches of one. Casts guard dattri's LiSSA
        # collate, which turns every data tensor into float32.
        x, y = data
        out = torch.func.functional_call(model, params, (x.to(dt),))
        return F.cross_entropy(out, y.long())

    def target_func(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x.to(dt),))
        if measurement == "loss":
            return F.cross_entropy(out, y.long())
        return margin_from_logits(out, y.long()).sum()

    return AttributionTask(
        loss_func=loss_func,
        model=model,
        checkpoints=copy.deepcopy(model.state_dict()),
        target_func=target_func,
    )


def _dattri_run(
    make: Callable[[Any], Any],
    model: nn.Module,
    problem: Problem,
    measurement: str,
    query_batch_size: int | None = None,
) -> torch.Tensor:
    Xtr, ytr, Xte, yte = _data(model, problem)
    m = copy.deepcopy(model)
    attributor = make(_dattri_task(m, measurement))
    qbs = min(query_batch_size or len(yte), len(yte))
    # dattri takes HVPs with torch.func at parameters that require grad; without an outer
    # no_grad, the *outer* autograd graph of every CG/LiSSA step is kept (LiSSA grew past
    # 11 GB on logreg). torch.func transforms ignore an outer no_grad, so results are equal.
    with torch.no_grad():
        # One full batch: dattri's CG/LiSSA *sum* inverse-HVPs over the loader's batches.
        attributor.cache(DataLoader(TensorDataset(Xtr, ytr), batch_size=len(ytr)))
        out = attributor.attribute(
            DataLoader(TensorDataset(Xtr, ytr), batch_size=len(ytr)),
            DataLoader(TensorDataset(Xte, yte), batch_size=qbs),
        )
    return out.T  # dattri returns [n_train, n_test]


def dattri_cg(
    model: nn.Module,
    problem: Problem,
    *,
    damping: float,
    measurement: str = "margin",
    max_iter: int = 100,
    query_batch_size: int = 50,
) -> PeerResult:
    """dattri ``IFAttributorCG`` (CG on exact HVPs of the mean loss, vmapped over queries,
    ``max_iter`` iterations, no early stop under vmap).

    Conversion: dattri returns ``g_train . (H + reg I)^{-1} g_test`` as [n_train, n_test]
    with H the Hessian of ``loss_func`` on the single full batch (mean CE here), positive
    = helpful: transpose, ``regularization = damping + weight_decay``, no rescaling.
    dattri sums IHVPs over the batches of the cached loader, so it gets one full batch.
    Queries go in batches of ``query_batch_size`` (dattri's vmapped CG holds the graphs of
    all queries of a batch at once: about 9 GB for 200 logreg queries).
    """
    from dattri.algorithm.influence_function import IFAttributorCG

    _check_measurement(measurement)
    s = _base_settings(
        problem,
        model,
        damping,
        measurement,
        max_iter=max_iter,
        mode="rev-rev",
        query_batch_size=query_batch_size,
    )
    return _run(
        "dattri-cg",
        "dattri",
        "dattri",
        s,
        lambda: _dattri_run(
            lambda t: IFAttributorCG(
                t, device="cpu", max_iter=max_iter, regularization=s["peer_damping"]
            ),
            model,
            problem,
            measurement,
            query_batch_size,
        ),
        model,
    )


def dattri_lissa(
    model: nn.Module,
    problem: Problem,
    *,
    damping: float,
    measurement: str = "margin",
    scale: float | None = None,
    recursion_depth: int = 1000,
    batch_size: int = 50,
    num_repeat: int = 1,
    seed: int = 0,
    query_batch_size: int = 50,
) -> PeerResult:
    """dattri ``IFAttributorLiSSA``.

    Its recursion is ``x <- v + (1 - d) x - H_batch x / s`` and it returns ``x / s``, whose
    fixed point is ``(H + s d I)^{-1} v``: so ``damping = (damping + weight_decay) / s``
    gives headwater's ``H + (damping + weight_decay) I``; no rescaling, positive = helpful.
    ``scale`` defaults to 3 x the top eigenvalue of the damped full-batch Hessian (dattri's
    default is 50); depth and batch size default to pyDVL LiSSA's (1000 steps of 50).
    """
    from dattri.algorithm.influence_function import IFAttributorLiSSA

    _check_measurement(measurement)
    if scale is None:
        scale = 3.0 * (top_hessian_eigenvalue(model, problem) + damping)
    s = _base_settings(
        problem,
        model,
        damping,
        measurement,
        scale=scale,
        recursion_depth=recursion_depth,
        batch_size=batch_size,
        num_repeat=num_repeat,
        seed=seed,
        query_batch_size=query_batch_size,
    )
    s["lissa_damping_d"] = s["peer_damping"] / scale

    def go():
        torch.manual_seed(seed)
        return _dattri_run(
            lambda t: IFAttributorLiSSA(
                t,
                device="cpu",
                batch_size=batch_size,
                num_repeat=num_repeat,
                recursion_depth=recursion_depth,
                damping=s["lissa_damping_d"],
                scaling=scale,
            ),
            model,
            problem,
            measurement,
            query_batch_size,
        )

    return _run("dattri-lissa", "dattri", "dattri", s, go, model)


def dattri_arnoldi(
    model: nn.Module,
    problem: Problem,
    *,
    damping: float,
    measurement: str = "margin",
    proj_dim: int = 50,
    max_iter: int = 200,
    seed: int = 0,
) -> PeerResult:
    """dattri ``IFAttributorArnoldi``: Arnoldi iteration (``max_iter`` Krylov steps) on HVPs
    of the mean loss + ``regularization * I``, top-``proj_dim`` eigenpairs by |lambda|;
    train and query gradients are projected and scaled by ``lambda^{-1/2}``.

    Conversion: ``regularization = damping + weight_decay``, transpose, no rescaling.
    Known to give non-finite scores when an eigenvalue estimate is negative (square root);
    that is recorded, not hidden.
    """
    from dattri.algorithm.influence_function import IFAttributorArnoldi

    _check_measurement(measurement)
    s = _base_settings(
        problem, model, damping, measurement, proj_dim=proj_dim, max_iter=max_iter, seed=seed
    )
    return _run(
        "dattri-arnoldi",
        "dattri",
        "dattri",
        s,
        lambda: _dattri_run(
            lambda t: IFAttributorArnoldi(
                t,
                device="cpu",
                proj_dim=proj_dim,
                max_iter=max_iter,
                regularization=s["peer_damping"],
                seed=seed,
            ),
            model,
            problem,
            measurement,
        ),
        model,
    )


# ---------------------------------------------------------------------------- captum


class _MarginLoss(nn.Module):
    """Per-example correct-class margin, shaped like a ``reduction='none'`` loss for Captum."""

    reduction = "none"

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return margin_from_logits(logits, y)


def _captum_run(
    cls, model: nn.Module, problem: Problem, measurement: str, batch_size: int | None, **kw
) -> torch.Tensor:
    Xtr, ytr, Xte, yte = _data(model, problem)
    batch_size = batch_size or len(ytr)  # one batch: fewest HVP/Hessian calls
    m = copy.deepcopy(model)
    test_loss = nn.CrossEntropyLoss(reduction="none") if measurement == "loss" else _MarginLoss()
    inf = cls(
        m,
        DataLoader(TensorDataset(Xtr, ytr), batch_size=batch_size),
        checkpoint="in-memory",
        checkpoints_load_func=lambda _m, _p: 1.0,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        test_loss_fn=test_loss,
        sample_wise_grads_per_batch=False,
        **kw,
    )
    scores = inf.influence((Xte, yte))
    return scores * problem.n_train  # summed-loss Hessian -> mean-loss convention


def captum_naive(
    model: nn.Module,
    problem: Problem,
    *,
    damping: float,
    measurement: str = "margin",
    projection_dim: int | None = None,
    batch_size: int | None = None,
    hessian_inverse_tol: float = 1e-5,
    max_params: int = 5000,
) -> PeerResult:
    """Captum ``NaiveInfluenceFunction``: the dense Hessian of the *summed* training loss,
    eigendecomposed; with ``projection_dim = P`` (the default here) it is exact.

    Conversion: Captum scores are ``g_q^T (H_sum + reg I)^{-1} g_i`` (eigenvalues below
    ``hessian_inverse_tol`` dropped) with ``H_sum = n H_mean``: so ``hessian_reg =
    n (damping + weight_decay)`` and scores are multiplied by n. Positive = helpful.
    The margin goes in as ``test_loss_fn``. Refuses models with more than ``max_params``
    parameters (a P x P general eigendecomposition).
    """
    from captum.influence import NaiveInfluenceFunction

    _check_measurement(measurement)
    P = _n_params(model)
    n = problem.n_train
    k = P if projection_dim is None else projection_dim
    s = _base_settings(
        problem,
        model,
        damping,
        measurement,
        projection_dim=k,
        hessian_reg=n * (damping + problem.weight_decay),
        hessian_inverse_tol=hessian_inverse_tol,
        batch_size=batch_size or problem.n_train,
    )
    if P > max_params:
        return PeerResult(
            "captum-naive",
            "captum",
            _version("captum"),
            s,
            None,
            float("nan"),
            float("nan"),
            f"SKIPPED: P={P} > max_params={max_params} (dense P x P eigendecomposition)",
        )
    return _run(
        "captum-naive",
        "captum",
        "captum",
        s,
        lambda: _captum_run(
            NaiveInfluenceFunction,
            model,
            problem,
            measurement,
            batch_size,
            projection_dim=k,
            hessian_reg=s["hessian_reg"],
            hessian_inverse_tol=hessian_inverse_tol,
        ),
        model,
    )


def captum_arnoldi(
    model: nn.Module,
    problem: Problem,
    *,
    damping: float,
    measurement: str = "margin",
    projection_dim: int = 50,
    arnoldi_dim: int = 200,
    batch_size: int | None = None,
    seed: int = 0,
) -> PeerResult:
    """Captum ``ArnoldiInfluenceFunction`` (Schioppa et al.): ``arnoldi_dim`` Arnoldi steps on
    HVPs of the *summed* loss, top ``projection_dim`` eigenpairs (+ ``hessian_reg``), the
    rest discarded.

    Conversion as for Captum Naive: ``hessian_reg = n (damping + weight_decay)``, scores x n.
    """
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

    _check_measurement(measurement)
    n = problem.n_train
    s = _base_settings(
        problem,
        model,
        damping,
        measurement,
        projection_dim=projection_dim,
        arnoldi_dim=arnoldi_dim,
        hessian_reg=n * (damping + problem.weight_decay),
        batch_size=batch_size or problem.n_train,
        seed=seed,
    )
    return _run(
        "captum-arnoldi",
        "captum",
        "captum",
        s,
        lambda: _captum_run(
            ArnoldiInfluenceFunction,
            model,
            problem,
            measurement,
            batch_size,
            projection_dim=projection_dim,
            arnoldi_dim=arnoldi_dim,
            hessian_reg=s["hessian_reg"],
            seed=seed,
        ),
        model,
    )


# ------------------------------------------------------------------------------ trak


def _trak_proj_dim(model: nn.Module, problem: Problem) -> int:
    """TRAK's default 2048 when the model has that many parameters, else 256 capped below
    n_train and P (a flat projection above P is not a projection)."""
    P = _n_params(model)
    return 2048 if P >= 2048 else min(256, P, problem.n_train - 1)


def _trak_scores(
    model: nn.Module,
    problem: Problem,
    *,
    measurement: str,
    proj_dim: int,
    lambda_reg: float,
    seed: int,
    batch_size: int,
    use_half_precision: bool,
    info: dict[str, Any],
) -> torch.Tensor:
    """Converted scores (``trak`` docstring); ``info["rescaled"]``: False when TRAK's
    normalisation could not be undone (singular kernel), the scale is then TRAK's."""
    import logging

    from trak import TRAKer

    Xtr, ytr, Xte, yte = _data(model, problem)
    m = copy.deepcopy(model).eval()
    n = problem.n_train
    with tempfile.TemporaryDirectory(prefix="bench-trak-") as out:
        tr = TRAKer(
            model=m,
            task="image_classification",
            train_set_size=n,
            save_dir=out,
            device="cpu",
            proj_dim=proj_dim,
            projector_seed=seed,
            lambda_reg=lambda_reg,
            use_half_precision=use_half_precision,
            logging_level=logging.ERROR,
        )
        tr.load_checkpoint(copy.deepcopy(m.state_dict()), model_id=0)
        for a in range(0, n, batch_size):
            tr.featurize(
                batch=(Xtr[a : a + batch_size], ytr[a : a + batch_size]),
                num_samples=len(ytr[a : a + batch_size]),
            )
        tr.finalize_features()
        # TRAK stores F = Phi X^{-1} / c with X = Phi^T Phi + lambda_reg I and c = mean|X^{-1}|:
        # recover c from F X = Phi / c on a few rows (O(r n k), no second inverse); where X is
        # numerically singular the identity fails and TRAK's scale is kept.
        phi = torch.as_tensor(tr.saver.current_store["grads"]).double()
        f_r = torch.as_tensor(tr.saver.current_store["features"][:32]).double()
        fx = (f_r @ phi.T) @ phi + lambda_reg * f_r
        phi_r = phi[:32]
        c = float((phi_r * phi_r).sum() / (fx * phi_r).sum())
        info["rescaled"] = c > 0 and float((c * fx - phi_r).norm() / phi_r.norm()) < 1e-2
        del phi, f_r, fx, phi_r
        tr.start_scoring_checkpoint(
            exp_name="bench",
            checkpoint=copy.deepcopy(m.state_dict()),
            model_id=0,
            num_targets=len(yte),
        )
        for a in range(0, len(yte), batch_size):
            tr.score(
                batch=(Xte[a : a + batch_size], yte[a : a + batch_size]),
                num_samples=len(yte[a : a + batch_size]),
            )
        tau = torch.as_tensor(tr.finalize_scores(exp_name="bench")).double().T.clone()
    if info["rescaled"]:
        tau = tau * (c * n)  # TRAK's normalisation undone; summed -> mean kernel
    if measurement == "margin":
        return -tau
    with torch.no_grad():
        p_q = torch.softmax(m(Xte).double(), -1).gather(1, yte[:, None]).squeeze(1)
    return (1.0 - p_q)[:, None] * tau


def trak(
    model: nn.Module,
    problem: Problem,
    *,
    damping: float,
    measurement: str = "margin",
    proj_dim: int | None = None,
    match_damping: bool = False,
    seed: int = 0,
    batch_size: int = 250,
    use_half_precision: bool = False,
) -> PeerResult:
    """TRAK (``traker``) with ONE model (the bench's trained model): its default
    classification model output (the margin ``f = logit_y - logsumexp_{c != y} logit_c``),
    the CPU ``BasicProjector`` (Gaussian, seed ``seed``), ``proj_dim`` (default 2048, 256
    for models with fewer parameters, e.g. logreg) and its default regularisation
    ``lambda_reg = 0``; with ``match_damping=True`` instead ``lambda_reg = n (damping +
    weight_decay)``, the damping headwater's projected methods get (below).

    What TRAK computes: with ``phi_i = Pi^T grad f(i) / sqrt(P)`` the projected margin
    gradients and ``Phi`` their ``[n, k]`` stack, ``tau[q, i] = (1 - p_i) phi_q^T
    (Phi^T Phi + lambda_reg I)^{-1} phi_i`` (``p_i`` the softmax probability of the true
    class, TRAK's "out-to-loss" weight), positive = i raises q's margin. Its kernel
    ``Phi^T Phi`` is the projected Gram matrix of the *margin* gradients, summed over
    examples and unweighted: an empirical-Fisher-like kernel, but neither headwater's
    projected EF (``grad l = -(1-p) grad f``: weights ``(1-p)^2``) nor its GGN (weights
    ``p(1-p)``, the CE being ``softplus(-f)``), and not the curvature of the mean loss.
    With ``lambda_reg = 0`` neither ``damping`` nor the L2 term enters, and ``Phi^T Phi``
    (rank <= n) is singular once ``proj_dim >= n_train`` (2048 on the MLP's 1,000
    examples): the inverse is then numerical noise.

    Conversion (exact given TRAK's kernel): ``grad l(i) = -(1-p_i) grad f(i)``, so
    headwater's margin score is ``-tau`` and its loss score ``(1-p_q) tau``. TRAK's
    division of the inverse kernel by ``c = mean|(Phi^T Phi + lambda_reg I)^{-1}|`` is
    undone (``c`` recovered from its stored features) and the scores are multiplied by n
    (summed -> mean kernel): they are then exactly
    ``grad m(q)^T Pi (Pi^T G Pi + P (lambda_reg/n) I_k)^{-1} Pi^T grad l(i)`` with ``G``
    the mean margin-gradient Gram and ``Pi`` TRAK's ``[P, k]`` projection (checked in
    float64 against TRAK's own projection matrix on logreg: Pearson 1.000000, ratio 1.0000).
    So ``lambda_reg = n (damping + weight_decay)`` is headwater's projected damping
    ``Pi^T (lambda I) Pi`` in expectation (``E Pi^T Pi = P I``), isotropic in the projected
    space. Remaining scale differences (kernel weights) do not matter for LDS or Pearson.
    ``use_half_precision=False``: float32 (TRAK's float16 default is meant for GPUs).
    """
    _check_measurement(measurement)
    k = _trak_proj_dim(model, problem) if proj_dim is None else proj_dim
    n = problem.n_train
    s = _base_settings(
        problem,
        model,
        damping,
        measurement,
        proj_dim=k,
        n_models=1,
        model_output="margin",
        projector="BasicProjector (normal)",
        seed=seed,
        batch_size=batch_size,
        precision="float16" if use_half_precision else "float32",
    )
    if match_damping:
        s["lambda_reg"] = n * s["peer_damping"]
    else:
        s["peer_damping"] = None
        s["lambda_reg"] = 0.0
    note = (
        "kernel: projected Gram of margin gradients, unweighted (not the GGN/EF of the "
        "mean loss), scores x (1-p_train); scale differs from headwater"
    )
    if not match_damping:
        note += "; undamped (TRAK default lambda_reg=0)"
        if k >= n:
            note += f"; proj_dim {k} >= n_train {n}: Phi^T Phi singular, scores are noise"
    name = "trak-1model" + ("-damped" if match_damping else "")
    info: dict[str, Any] = {}
    r = _run(
        name,
        "trak",
        "traker",
        s,
        lambda: _trak_scores(
            model,
            problem,
            measurement=measurement,
            proj_dim=k,
            lambda_reg=s["lambda_reg"],
            seed=seed,
            batch_size=batch_size,
            use_half_precision=use_half_precision,
            info=info,
        ),
        model,
        note=note,
    )
    if info.get("rescaled") is False:
        r.note += "; TRAK's normalisation not undone (singular kernel): its scale"
    return r


def trak_damped(
    model: nn.Module, problem: Problem, *, damping: float, measurement: str = "margin", **kw
) -> PeerResult:
    """TRAK with ``lambda_reg = n (damping + weight_decay)``: headwater's projected damping."""
    return trak(model, problem, damping=damping, measurement=measurement, match_damping=True, **kw)


# -------------------------------------------------------------------------- registry

PEERS: dict[str, Callable[..., PeerResult]] = {
    "kronfluence-ekfac": kronfluence_ekfac,
    "kronfluence-ekfac-heuristic": kronfluence_ekfac_heuristic,
    "pydvl-cg": pydvl_cg,
    "pydvl-lissa": pydvl_lissa,
    "pydvl-arnoldi": pydvl_arnoldi,
    "pydvl-ekfac": pydvl_ekfac,
    "dattri-cg": dattri_cg,
    "dattri-lissa": dattri_lissa,
    "dattri-arnoldi": dattri_arnoldi,
    "captum-naive": captum_naive,
    "captum-arnoldi": captum_arnoldi,
    "trak-1model": trak,
    "trak-1model-damped": trak_damped,
}

#: Peers that compute the exact (damped) inverse and must match bench.reference.
EXACT_PEERS = ("pydvl-cg", "captum-naive", "dattri-cg")


def run_all(
    model: nn.Module,
    problem: Problem,
    *,
    damping: float,
    measurement: str = "margin",
    only: list[str] | None = None,
    settings: dict[str, dict[str, Any]] | None = None,
) -> list[PeerResult]:
    """Run every registered peer (or those in ``only``); never raises for a peer failure.

    ``settings`` maps a peer name to extra keyword arguments for its adapter.
    """
    names = list(PEERS) if only is None else list(only)
    settings = settings or {}
    return [
        PEERS[n](model, problem, damping=damping, measurement=measurement, **settings.get(n, {}))
        for n in names
    ]
