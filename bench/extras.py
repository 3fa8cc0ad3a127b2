"""``make bench-extras``: headwater's other capabilities beside the reference libraries.

Same process, same trained model for every library; wall time and peak RSS by
``bench.measure.measure``; problems from ``bench/problems.py`` (digits, 1,000 train x 200
test; ``logreg`` = L2 logistic regression at its exact optimum, ``mlp`` = 64-128-64-10 tanh
MLP trained by minibatch Adam). Four sections, each states its settings in the results:

1. ``mislabel`` -- flip a seeded 5% of the training labels, train the bench's logreg and MLP
   recipes on the flipped labels (cached), rank training examples by self-influence and
   report the AUPRC of finding the flipped ones (``headwater.evaluate.detection.auprc``):
   headwater exact / EK-FAC / CG influence, renormalised influence, TracIn (and its
   renormalised GAS form), the loss, and the peers' self-influence calls.
2. ``tracin`` -- headwater TracIn vs Captum TracInCP (and dattri TracIn) on the same
   checkpoints of a short SGD run: Pearson and max relative difference of the score
   matrices and self-influences, and time.
3. ``laplace`` -- linearised Laplace (full GGN; the MLP's last layer) vs laplace-torch and
   a dense closed-form reference: predictive covariance, probit probabilities and log
   marginal likelihood at the MAP-matched prior, the prior each library's evidence
   maximisation picks, time.
4. ``unlearning`` -- remove seeded sets of 10 / 50 training examples; fraction of the
   parameter (and test-margin) change left versus exact retraining, for headwater's
   Newton-step ``unlearn`` and for a few epochs of fine-tuning on the remaining data.

A failing method (or peer) is an error row, never a crash. Writes ``bench/extras_results.md``.

    python -m bench.extras [--sections mislabel tracin laplace unlearning]
                           [--problems logreg mlp] [--no-peers] [--warmup] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata as md
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from bench.measure import measure
from bench.problems import (
    Problem,
    _build_logreg,
    _build_mlp,
    _load_or_train,
    _train_logreg,
    _train_mlp,
    cached,
    get_problem,
    margin,
    objective,
    per_example_loss,
)
from headwater.curvature import CG, EKFAC, Exact
from headwater.evaluate.detection import auprc, recall_at_fraction
from headwater.methods import InfluenceFunction, RenormalizedInfluence, TracIn, unlearn
from headwater.methods.tracin import Checkpoint
from headwater.task import ClassificationTask
from headwater.train import minimize_objective
from headwater.uncertainty import LinearizedLaplace

RESULTS = Path(__file__).resolve().parent / "extras_results.md"
SECTIONS = ("mislabel", "tracin", "laplace", "unlearning")
PROBLEMS = ("logreg", "mlp")
DAMPING = {"logreg": 0.0, "mlp": 1e-3}  # as bench.run: λ on the mean objective (wd is in it)

FLIP_FRACTION, FLIP_SEED = 0.05, 0
MLP_CHECKPOINT_EVERY = 40  # epochs of the MLP's own Adam run between TracIn checkpoints
# TracIn checkpoints of the logreg (its L-BFGS fit has no trajectory): minibatch SGD from zero.
LOGREG_SGD = {"optimizer": "SGD", "lr": 0.1, "batch_size": 50, "epochs": 20, "every": 4, "seed": 0}
# Section 2: a short SGD run from the bench recipe's initialisation, a checkpoint per epoch.
AGREEMENT_SGD = {
    "optimizer": "SGD",
    "lr": 0.05,
    "batch_size": 50,
    "epochs": 5,
    "every": 1,
    "seed": 0,
}
FORGET_SIZES, FORGET_SEED = (10, 50), 0
FINETUNE_EPOCHS = (1, 5)
RETRAIN_TOL = 1e-10
WARMUP_REPEAT_BELOW = 5.0  # seconds: with --warmup, faster calls are timed on a second run
CG_SELF = {
    "preconditioner_rank": 200,
    "tol": 0.1,
}  # bench.run's cg-nystrom200 (plain CG: 87 s on the MLP)
LAST_LAYER = {"logreg": None, "mlp": ["4"]}  # analysed parameters in sections 3 and 4


@dataclass
class Row:
    """One result line; ``metrics`` hold the section's quality numbers."""

    section: str
    problem: str
    method: str
    library: str
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    peak_mb: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""
    error: str = ""
    group: str = ""  # rows of one comparison (time ratios in the summary)


def _run(row: Row, fn: Callable[[], Any], warmup: bool) -> Any:
    """Time ``fn``; with ``warmup`` a call faster than ``WARMUP_REPEAT_BELOW`` seconds is timed
    again and the second call kept (the first pays imports and lazy initialisation; for
    slower calls that overhead is negligible and they are not repeated). An exception
    becomes ``row.error``."""
    print(
        f"[extras] {row.section}/{row.problem}: {row.method} ({row.library}) ...",
        file=sys.stderr,
        flush=True,
    )
    try:
        result, row.seconds, row.peak_mb = measure(fn)
        if warmup and row.seconds < WARMUP_REPEAT_BELOW:
            result, row.seconds, row.peak_mb = measure(fn)
        return result
    except Exception as err:  # a failing method is a result, not a crash
        row.error = f"{type(err).__name__}: {err}".replace("\n", " ")[:300]
        print(f"[extras]   FAILED {row.error}", file=sys.stderr, flush=True)
        return None


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def _cached(name: str, settings: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """``compute()`` once per settings, kept in ``bench/.cache``."""
    return cached(f"extras-{name}-{_key(settings)}", compute)


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _labels_hash(y: Tensor) -> str:
    return hashlib.sha256(y.numpy().tobytes()).hexdigest()[:16]


def _max_rel(a: Tensor, b: Tensor) -> float:
    """``max|a − b| / max|b|``."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _pearson(a: Tensor, b: Tensor) -> float:
    return float(
        np.corrcoef(a.detach().double().flatten().numpy(), b.detach().double().flatten().numpy())[
            0, 1
        ]
    )


# ------------------------------------------------------------------ training runs with checkpoints


def sgd_checkpoints(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    weight_decay: float,
    *,
    lr: float,
    batch_size: int,
    epochs: int,
    every: int,
    seed: int,
    **_: Any,
) -> list[Checkpoint]:
    """Minibatch SGD on mean CE + (wd/2)‖θ‖² **in place**; a checkpoint after every ``every``
    epochs, with the learning rate and the ``every · ⌈n/batch_size⌉`` steps it stands for."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = x.shape[0]
    steps = every * -(-n // batch_size)
    out = []
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            opt.zero_grad()
            objective(model, x[idx], y[idx], weight_decay).backward()
            opt.step()
        if epoch % every == 0:
            out.append(Checkpoint(_state(model), lr, steps))
    for p in model.parameters():
        p.grad = None
    return out


def _restore(ckpts: list[tuple[dict[str, Tensor], float, int]]) -> list[Checkpoint]:
    return [Checkpoint(s, lr, steps) for s, lr, steps in ckpts]


def _plain(ckpts: list[Checkpoint]) -> list[tuple[dict[str, Tensor], float, int]]:
    return [(dict(c.state), c.lr, c.steps) for c in ckpts]


# ------------------------------------------------------------------ 1. mislabel detection


def flip_labels(
    y: Tensor, fraction: float = FLIP_FRACTION, seed: int = FLIP_SEED, n_classes: int = 10
) -> tuple[Tensor, Tensor]:
    """A seeded ``fraction`` of the labels moved to another class (uniform among the other
    ``n_classes − 1``); returns ``(labels, flagged)``."""
    g = torch.Generator().manual_seed(seed)
    n = y.shape[0]
    idx = torch.randperm(n, generator=g)[: round(fraction * n)]
    shift = torch.randint(1, n_classes, (idx.numel(),), generator=g)
    flipped = y.clone()
    flipped[idx] = (y[idx] + shift) % n_classes
    flagged = torch.zeros(n, dtype=torch.bool)
    flagged[idx] = True
    return flipped, flagged


@dataclass(frozen=True)
class Flipped:
    """A bench problem retrained on flipped labels (``problem.y_train``), the ground truth,
    and TracIn checkpoints with a description of the run that made them."""

    problem: Problem
    flagged: Tensor
    checkpoints: list[Checkpoint]
    trajectory: dict[str, Any]


def flipped_problem(name: str) -> Flipped:
    """The bench recipe trained on the flipped labels (cached in ``bench/.cache``)."""
    base = get_problem(name)
    y, flagged = flip_labels(base.y_train)
    x = base.X_train
    settings = {
        **base.settings,
        "flip_fraction": FLIP_FRACTION,
        "flip_seed": FLIP_SEED,
        "labels": _labels_hash(y),
    }
    if name == "logreg":
        model = _load_or_train(
            "logreg-flipped",
            settings,
            lambda: _build_logreg(torch.float64),
            lambda m: _train_logreg(m, x, y, base.weight_decay, settings["grad_tol"]),
            True,
        )
        ckpts = _restore(
            _cached(
                "logreg-flipped-sgd",
                {**settings, **LOGREG_SGD},
                lambda: _plain(
                    sgd_checkpoints(
                        _build_logreg(torch.float64), x, y, base.weight_decay, **LOGREG_SGD
                    )
                ),
            )
        )
        trajectory = {
            "run": "separate minibatch SGD from zero (the L-BFGS fit has no trajectory)",
            **LOGREG_SGD,
        }
    else:
        s = base.settings
        steps = MLP_CHECKPOINT_EVERY * -(-base.n_train // s["batch_size"])

        def train() -> dict[str, Any]:
            m = _build_mlp(torch.float32, s["seed"])
            states: list[dict[str, Tensor]] = []

            def record(epoch: int, module: nn.Module) -> None:
                if epoch % MLP_CHECKPOINT_EVERY == 0:
                    states.append(_state(module))

            _train_mlp(
                m,
                x,
                y,
                base.weight_decay,
                s["epochs"],
                s["batch_size"],
                s["lr"],
                s["seed"],
                on_epoch=record,
            )
            return {"final": _state(m), "checkpoints": states}

        blob = _cached("mlp-flipped", {**settings, "every": MLP_CHECKPOINT_EVERY}, train)
        model = _build_mlp(torch.float32, s["seed"])
        model.load_state_dict(blob["final"])
        model.eval()
        ckpts = [Checkpoint(st, s["lr"], steps) for st in blob["checkpoints"]]
        trajectory = {
            "run": "the model's own Adam training (lr = Adam's step size)",
            "every": MLP_CHECKPOINT_EVERY,
            "lr": s["lr"],
            "steps": steps,
        }
    problem = Problem(
        f"{name}-flipped", x, y, base.X_test, base.y_test, model, base.weight_decay, settings
    )
    return Flipped(problem, flagged, ckpts, {**trajectory, "n_checkpoints": len(ckpts)})


def _influence_self(problem: Problem, curvature: Any) -> Tensor:
    task = ClassificationTask(weight_decay=problem.weight_decay)
    train = (problem.X_train, problem.y_train)
    return InfluenceFunction(problem.model, task, curvature).fit(train).self_influence(train)


def _renormalized_self(problem: Problem, curvature: Any) -> Tensor:
    """Diagonal of Hammoudeh & Lowd's renormalised influence on the training set:
    ``∇ℓ_iᵀ (M + λI)⁻¹ ∇ℓ_i / ‖∇ℓ_i‖`` (the train side renormalised, the query side not)."""
    task = ClassificationTask(weight_decay=problem.weight_decay)
    train = (problem.X_train, problem.y_train)
    inf = InfluenceFunction(problem.model, task, curvature).fit(train)
    return RenormalizedInfluence(inf).scores(train, train).diagonal().clone()


def _tracin_self(fp: Flipped, renormalize: bool) -> Tensor:
    p = fp.problem
    task = ClassificationTask(weight_decay=p.weight_decay)
    return TracIn(p.model, task, fp.checkpoints, renormalize=renormalize).self_influence(
        (p.X_train, p.y_train)
    )


def _peers() -> Any:
    """``bench.extras_peers`` or None (the peers live in the bench environment only)."""
    try:
        from bench import extras_peers
    except ImportError as err:
        print(
            f"[extras] peers unavailable ({err}); run `make bench-extras` to set them up",
            file=sys.stderr,
        )
        return None
    return extras_peers


def mislabel_entries(
    fp: Flipped, damping: float
) -> list[tuple[str, str, dict[str, Any], Callable[[], Tensor]]]:
    """``(method, library, settings, run)``; ``run()`` returns a suspicion score per example."""
    p = fp.problem
    x, y, wd = p.X_train, p.y_train, p.weight_decay
    base = p.name.split("-")[0]
    d = {"damping": damping}
    peer = {"peer_damping": damping + wd}
    ek = {"ggn_estimator": "auto"}

    def loss() -> Tensor:
        with torch.no_grad():
            return per_example_loss(p.model, x, y)

    entries = [("loss", "baseline", {}, loss)]
    if base == "logreg":  # the MLP's dense 17k x 17k GGN: minutes and ~7 GB (as in bench.run)
        entries.append(
            (
                "if-exact-ggn",
                "headwater",
                {**d, "curvature": "exact"},
                lambda: _influence_self(p, Exact(damping=damping)),
            )
        )
    entries += [
        (
            "if-ekfac",
            "headwater",
            {**d, "curvature": "ekfac", **ek},
            lambda: _influence_self(p, EKFAC(damping=damping, **ek)),
        ),
        (
            "if-cg-nystrom200",
            "headwater",
            {**d, "curvature": "cg", **CG_SELF},
            lambda: _influence_self(p, CG(damping=damping, **CG_SELF)),
        ),
        (
            "renormalized-ekfac",
            "headwater",
            {**d, "curvature": "ekfac", "norm": "gradient"},
            lambda: _renormalized_self(p, EKFAC(damping=damping, **ek)),
        ),
        ("tracin", "headwater", {"checkpoints": fp.trajectory}, lambda: _tracin_self(fp, False)),
        ("tracin-gas", "headwater", {"renormalize": True}, lambda: _tracin_self(fp, True)),
    ]
    ep = _peers()
    if ep is None:
        return entries
    entries += [
        (
            "captum-tracincp",
            "captum",
            {"checkpoints": "same as tracin", "sample_wise_grads_per_batch": True},
            lambda: ep.captum_tracin_self(p.model, fp.checkpoints, x, y),
        ),
        (
            "kronfluence-ekfac",
            "kronfluence",
            {**peer, "fisher": "true (sampled labels, seed 0)"},
            lambda: ep.kronfluence_ekfac_self(p.model, x, y, damping_factor=damping + wd),
        ),
        (
            "dattri-tracin",
            "dattri",
            {"checkpoints": "same as tracin", "proj_dim": 512},
            lambda: ep.dattri_tracin_self(p.model, fp.checkpoints, x, y),
        ),
        (
            "pydvl-ekfac",
            "pydvl",
            {**peer, "dtype": "float32", "how": "diagonal of n x n pairwise (no self API)"},
            lambda: ep.pydvl_ekfac_self(p.model, x, y, damping=damping, weight_decay=wd),
        ),
    ]
    if base == "logreg":
        entries += [
            (
                "captum-naive",
                "captum",
                {**peer, "hessian": "dense, summed loss, all directions"},
                lambda: ep.captum_naive_self(p.model, x, y, damping=damping, weight_decay=wd),
            ),
            (
                "dattri-explicit",
                "dattri",
                {**peer, "hessian": "dense"},
                lambda: ep.dattri_explicit_self(p.model, x, y, damping=damping, weight_decay=wd),
            ),
        ]
    else:
        entries.append(
            (
                "dattri-ekfac",
                "dattri",
                {**peer, "batch_size": p.n_train},
                lambda: ep.dattri_ekfac_self(
                    p.model, x, y, damping=damping, weight_decay=wd, batch_size=p.n_train
                ),
            )
        )
    return entries


def mislabel_rows(problems: list[str], peers: bool, warmup: bool) -> list[Row]:
    rows = []
    for name in problems:
        fp = flipped_problem(name)
        with torch.no_grad():
            train_acc = float(
                (fp.problem.model(fp.problem.X_train).argmax(-1) == fp.problem.y_train)
                .double()
                .mean()
            )
            test_acc = fp.problem.test_accuracy()
        print(
            f"[extras] {name} on flipped labels: train acc {train_acc:.3f} (of the flipped labels), "
            f"test acc {test_acc:.3f}",
            file=sys.stderr,
        )
        for method, library, settings, fn in mislabel_entries(fp, DAMPING[name]):
            if not peers and library not in ("headwater", "baseline"):
                continue
            row = Row("mislabel", name, method, library, settings)
            scores = _run(row, fn, warmup)
            if scores is not None:
                scores = scores.detach().double().cpu().reshape(-1)
                if torch.isfinite(scores).all():
                    row.metrics = {
                        "auprc": auprc(scores, fp.flagged),
                        "recall@10%": recall_at_fraction(scores, fp.flagged, 0.1),
                    }
                    spread = float((scores.max() - scores.min()) / scores.abs().max())
                    if spread < 1e-5:  # float32 rounding of unit norms summed over checkpoints
                        row.note = (
                            f"the same score for every example up to rounding (relative spread "
                            f"{spread:.0e}): the order is rounding noise"
                        )
                else:
                    row.error = f"non-finite scores ({int((~torch.isfinite(scores)).sum())} of {scores.numel()})"
            rows.append(row)
        rows.append(
            Row(
                "mislabel",
                name,
                "random order (expected)",
                "-",
                {},
                metrics={"auprc": float(fp.flagged.double().mean()), "recall@10%": 0.1},
                note=f"train acc on flipped labels {train_acc:.3f}, test acc {test_acc:.3f}",
            )
        )
    return rows


# ------------------------------------------------------------------ 2. TracIn agreement


def agreement_run(name: str) -> tuple[Problem, nn.Module, list[Checkpoint]]:
    """The bench problem's data, its recipe's initialisation (logreg: zeros), and the
    checkpoints of a short SGD run (``AGREEMENT_SGD``), cached."""
    p = get_problem(name)
    build = (
        (lambda: _build_logreg(torch.float64))
        if name == "logreg"
        else (lambda: _build_mlp(torch.float32, p.settings["seed"]))
    )
    ckpts = _restore(
        _cached(
            f"{name}-tracin-agreement",
            {**p.settings, **AGREEMENT_SGD},
            lambda: _plain(
                sgd_checkpoints(build(), p.X_train, p.y_train, p.weight_decay, **AGREEMENT_SGD)
            ),
        )
    )
    model = build()
    model.load_state_dict(ckpts[-1].state)
    model.eval()
    return p, model, ckpts


def tracin_rows(problems: list[str], peers: bool, warmup: bool) -> list[Row]:
    return [row for name in problems for row in _tracin_problem_rows(name, peers, warmup)]


def _tracin_problem_rows(name: str, peers: bool, warmup: bool) -> list[Row]:
    rows = []
    p, model, ckpts = agreement_run(name)
    task = ClassificationTask(weight_decay=p.weight_decay)
    train, query = (p.X_train, p.y_train), (p.X_test, p.y_test)
    settings = {**AGREEMENT_SGD, "n_checkpoints": len(ckpts), "measurement": "loss"}
    entries: list[tuple[str, str, dict[str, Any], Callable[[], Tensor], Callable[[], Tensor]]] = [
        (
            "tracin",
            "headwater",
            settings,
            lambda: TracIn(model, task, ckpts).scores(query, train),
            lambda: TracIn(model, task, ckpts).self_influence(train),
        ),
    ]
    ep = _peers() if peers else None
    if ep is not None:
        entries += [
            (
                "tracincp",
                "captum",
                {"lr": "η·steps per checkpoint", "sample_wise_grads_per_batch": True},
                lambda: ep.captum_tracin_scores(model, ckpts, *train, *query),
                lambda: ep.captum_tracin_self(model, ckpts, *train),
            ),
            (
                "tracin",
                "dattri",
                {"weight_list": "η·steps per checkpoint", "proj_dim": 512},
                lambda: ep.dattri_tracin_scores(model, ckpts, *train, *query),
                lambda: ep.dattri_tracin_self(model, ckpts, *train),
            ),
        ]
    ref: dict[str, Tensor] = {}
    for method, library, st, scores_fn, self_fn in entries:
        for what, fn in (("scores", scores_fn), ("self-influence", self_fn)):
            row = Row("tracin", name, f"{method} {what}", library, st)
            out = _run(row, fn, warmup)
            if out is not None:
                out = out.detach().double().cpu()
                if library == "headwater":
                    ref[what] = out
                elif what in ref:
                    row.metrics = {
                        "pearson": _pearson(out, ref[what]),
                        "max_rel": _max_rel(out, ref[what]),
                    }
            rows.append(row)
    return rows


# ------------------------------------------------------------------ 3. linearised Laplace


def _laplace_task(problem: Problem) -> ClassificationTask:
    return ClassificationTask(weight_decay=problem.weight_decay, modules=LAST_LAYER[problem.name])


def dense_laplace(problem: Problem, prior: float) -> dict[str, Any]:
    """Closed form: ``P = Σ_i J_iᵀΛ_iJ_i + δI`` from dense ``torch.func`` Jacobians of the
    analysed parameters (``Λ_i = diag(p_i) − p_ip_iᵀ``), ``Σ_f = J* P⁻¹ J*ᵀ``, probit
    probabilities and ``log p(D|δ) = −Σℓ_i − ½δ‖θ‖² + ½P·log δ − ½ log det P``."""
    model = problem.model
    names = list(_laplace_task(problem).parameters(model))
    params = {k: v.detach() for k, v in model.named_parameters()}
    shapes = [params[k].shape for k in names]
    theta = torch.cat([params[k].reshape(-1) for k in names])

    def f(th: Tensor, x: Tensor) -> Tensor:
        ps, o = dict(params), 0
        for k, s in zip(names, shapes, strict=True):
            c = int(np.prod(s))
            ps[k] = th[o : o + c].reshape(s)
            o += c
        return functional_call(model, ps, (x,))

    jac = jacrev(f)(theta, problem.X_train)  # [n, C, P]
    probs = torch.softmax(f(theta, problem.X_train), -1)  # [n, C]
    lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    precision = torch.einsum("ncp,ncd,ndq->pq", jac, lam, jac) + prior * torch.eye(
        theta.numel(), dtype=theta.dtype
    )
    jt = jacrev(f)(theta, problem.X_test)  # [N, C, P]
    solved = torch.linalg.solve(precision, jt.flatten(0, 1).T).T.reshape(
        jt.shape
    )  # J* P⁻¹: [N, C, P]
    cov = torch.einsum("ncp,ndp->ncd", jt, solved)
    mean = f(theta, problem.X_test)
    p_probit = torch.softmax(
        mean / torch.sqrt(1 + torch.pi / 8 * torch.diagonal(cov, dim1=1, dim2=2)), -1
    )
    with torch.no_grad():
        loss_sum = per_example_loss(model, problem.X_train, problem.y_train).sum()
    lml = (
        -loss_sum
        - 0.5 * prior * theta @ theta
        + 0.5 * theta.numel() * np.log(prior)
        - 0.5 * torch.linalg.slogdet(precision.detach())[1]
    )
    return {"cov": cov.detach(), "probs": p_probit.detach(), "lml": float(lml.detach())}


def headwater_laplace(problem: Problem, prior: float, optimize: bool = False) -> dict[str, Any]:
    """``LinearizedLaplace`` on the exact GGN (``Exact(kind="ggn")``; its damping is unused:
    the prior takes its place), ``recenter=False`` (θ̂ is the posterior mean, as
    laplace-torch), probit probabilities."""
    task = _laplace_task(problem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # stationarity (the MLP is not a MAP)
        la = LinearizedLaplace(
            problem.model, task, Exact(damping=1e-12), prior_precision=prior, recenter=False
        ).fit((problem.X_train, problem.y_train))
        out = {
            "cov": la.predict(problem.X_test).covariance,
            "probs": la.probabilities(problem.X_test),
            "lml": float(la.log_marginal_likelihood()),
        }
        if optimize:
            la.optimize_prior()
            out["prior"] = float(la.prior_precision[0])
            out["lml_opt"] = float(la.log_marginal_likelihood())
    return out


def laplace_rows(problems: list[str], peers: bool, warmup: bool) -> list[Row]:
    return [row for name in problems for row in _laplace_problem_rows(name, peers, warmup)]


def _laplace_problem_rows(name: str, peers: bool, warmup: bool) -> list[Row]:
    rows = []
    p = get_problem(name, torch.float64)
    prior = p.n_train * p.weight_decay  # the prior under which the trained θ̂ is the MAP
    last = LAST_LAYER[name] is not None
    what = {
        "weights": "last layer (650)" if last else "all (650)",
        "prior_precision": prior,
        "dtype": "float64",
        "curvature": "full GGN",
    }
    entries: list[tuple[str, str, dict[str, Any], Callable[[], dict[str, Any]]]] = [
        ("dense closed form", "reference", what, lambda: dense_laplace(p, prior)),
        (
            "linearized-laplace",
            "headwater",
            {**what, "recenter": False},
            lambda: headwater_laplace(p, prior),
        ),
    ]
    ep = _peers() if peers else None
    if ep is not None:
        entries.append(
            (
                "laplace (glm, probit)",
                "laplace-torch",
                {
                    **what,
                    "subset_of_weights": "last_layer" if last else "all",
                    "backend": "CurvlinopsGGN",
                },
                lambda: ep.laplace_torch(
                    p.model, p.X_train, p.y_train, p.X_test, prior_precision=prior, last_layer=last
                ),
            )
        )
    results: dict[str, dict[str, Any]] = {}
    for method, library, st, fn in entries:
        row = Row("laplace", name, method, library, st, group="posterior")
        out = _run(row, fn, warmup)
        if out is not None:
            results[library] = out
            row.metrics["lml"] = out["lml"]
            if "reference" in results and library != "reference":
                ref = results["reference"]
                row.metrics.update(
                    cov_vs_dense=_max_rel(out["cov"], ref["cov"]),
                    prob_vs_dense=_max_rel(out["probs"], ref["probs"]),
                    lml_vs_dense=abs(out["lml"] - ref["lml"]) / abs(ref["lml"]),
                )
        rows.append(row)
    if "headwater" in results and "laplace-torch" in results:
        hw, lt = results["headwater"], results["laplace-torch"]
        rows[-1].metrics.update(
            cov_vs_headwater=_max_rel(lt["cov"], hw["cov"]),
            prob_vs_headwater=_max_rel(lt["probs"], hw["probs"]),
        )
    # evidence maximisation over a scalar prior, from the MAP-matched prior
    opt_entries = [
        ("optimize_prior (L-BFGS)", "headwater", lambda: headwater_laplace(p, prior, True))
    ]
    if ep is not None:
        opt_entries.append(
            (
                "optimize_prior_precision (marglik, Adam 100 x 0.1)",
                "laplace-torch",
                lambda: ep.laplace_torch(
                    p.model,
                    p.X_train,
                    p.y_train,
                    p.X_test,
                    prior_precision=prior,
                    last_layer=last,
                    optimize=True,
                ),
            )
        )
    for method, library, fn in opt_entries:
        row = Row("laplace", name, method, library, {**what, "start": prior}, group="optimize")
        out = _run(row, fn, warmup)
        if out is not None:
            row.metrics = {"prior": out["prior"], "lml": out["lml_opt"]}
            row.note = "time includes the fit"
        rows.append(row)
    return rows


# ------------------------------------------------------------------ 4. unlearning


def unlearning_problem(name: str) -> tuple[Problem, ClassificationTask, str]:
    """float64 model at an exact optimum of the analysed parameters: the logreg as it is;
    the MLP's last layer re-optimised by full-batch L-BFGS with the hidden layers fixed (the
    Adam-trained net is not a stationary point, and retraining the whole net is not convex)."""
    p = get_problem(name, torch.float64)
    task = ClassificationTask(weight_decay=p.weight_decay, modules=LAST_LAYER[name])
    if LAST_LAYER[name] is None:
        return p, task, "all weights (650), exact optimum"
    model = p.fresh_model()
    minimize_objective(model, task, (p.X_train, p.y_train), tol=RETRAIN_TOL)
    return (
        Problem(
            p.name, p.X_train, p.y_train, p.X_test, p.y_test, model, p.weight_decay, p.settings
        ),
        task,
        "last layer (650), hidden layers fixed, last layer re-optimised by L-BFGS",
    )


def finetune(
    model: nn.Module,
    task: ClassificationTask,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> nn.Module:
    """A copy of ``model`` after ``epochs`` of minibatch Adam on the analysed parameters
    (the bench MLP's recipe: lr 1e-3, batch 50) over ``(x, y)``."""
    m = copy.deepcopy(model)
    params = list(task.parameters(m).values())
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            opt.zero_grad()
            loss = per_example_loss(m, x[idx], y[idx]).mean() + 0.5 * task.weight_decay * sum(
                (q * q).sum() for q in params
            )
            loss.backward()
            opt.step()
    for q in m.parameters():
        q.grad = None
    return m


def _flat(model: nn.Module, task: ClassificationTask) -> Tensor:
    return torch.cat([q.detach().reshape(-1) for q in task.parameters(model).values()])


def _margins(model: nn.Module, p: Problem) -> Tensor:
    with torch.no_grad():
        return margin(model, p.X_test, p.y_test)


def unlearning_rows(problems: list[str], warmup: bool) -> list[Row]:
    rows = []
    for name in problems:
        p, task, analysed = unlearning_problem(name)
        order = torch.randperm(p.n_train, generator=torch.Generator().manual_seed(FORGET_SEED))
        for k in FORGET_SIZES:
            rows += _unlearning_set_rows(p, task, analysed, order[:k], warmup)
    return rows


def _unlearning_set_rows(
    p: Problem, task: ClassificationTask, analysed: str, forget: Tensor, warmup: bool
) -> list[Row]:
    train, n, k, damping = (p.X_train, p.y_train), p.n_train, forget.numel(), DAMPING[p.name]
    keep = torch.ones(n, dtype=torch.bool)
    keep[forget] = False
    common = {"k": k, "analysed": analysed, "forget_seed": FORGET_SEED}

    def retrain() -> nn.Module:
        m = copy.deepcopy(p.model)
        minimize_objective(m, task, train, weights=keep.double() / (n - k), tol=RETRAIN_TOL)
        return m

    ref = Row(
        "unlearning",
        p.name,
        "retrain (reference)",
        "-",
        {**common, "how": f"L-BFGS on the remaining objective from θ̂ to ‖∇‖ < {RETRAIN_TOL:g}"},
    )
    truth = _run(ref, retrain, warmup)
    if truth is None:
        return [ref]
    theta0, m0 = _flat(p.model, task), _margins(p.model, p)
    theta_r, m_r = _flat(truth, task), _margins(truth, p)
    ref.metrics = {
        "param_change": float((theta0 - theta_r).norm()),
        "margin_change": float((m0 - m_r).norm()),
    }

    def fitted(curvature: Any, correction: bool) -> nn.Module:
        curvature.fit(p.model, task, train)
        return unlearn(p.model, task, train, forget, curvature=curvature, correction=correction)

    def tune(epochs: int) -> Callable[[], nn.Module]:
        return lambda: finetune(
            p.model,
            task,
            p.X_train[keep],
            p.y_train[keep],
            epochs=epochs,
            lr=1e-3,
            batch_size=50,
            seed=0,
        )

    entries: list[tuple[str, str, dict[str, Any], Callable[[], nn.Module]]] = [
        (
            "unlearn exact Newton",
            "headwater",
            {"curvature": None, "kind": "hessian", "tol": 1e-10},
            lambda: unlearn(p.model, task, train, forget),
        ),
        (
            "unlearn influence step (exact GGN of all data)",
            "headwater",
            {"curvature": "exact", "damping": damping, "correction": False},
            lambda: fitted(Exact(damping=damping), False),
        ),
        (
            "unlearn EK-FAC",
            "headwater",
            {"curvature": "ekfac", "damping": damping, "correction": False},
            lambda: fitted(EKFAC(damping=damping), False),
        ),
        (
            "unlearn EK-FAC refitted on the remaining data",
            "headwater",
            {"curvature": "ekfac", "damping": damping, "correction": True},
            lambda: fitted(EKFAC(damping=damping), True),
        ),
    ] + [
        (
            f"fine-tune {e} epoch{'s' if e > 1 else ''}",
            "baseline",
            {"optimizer": "Adam", "lr": 1e-3, "batch_size": 50, "epochs": e, "seed": 0},
            tune(e),
        )
        for e in FINETUNE_EPOCHS
    ]
    rows = [ref]
    for method, library, st, fn in entries:
        row = Row("unlearning", p.name, method, library, {**common, **st})
        new = _run(row, fn, warmup)
        if new is not None:
            row.metrics = {
                "param_left": float(
                    (_flat(new, task) - theta_r).norm() / (theta0 - theta_r).norm()
                ),
                "margin_left": float((_margins(new, p) - m_r).norm() / (m0 - m_r).norm()),
            }
            if st.get("curvature"):
                row.note = "time includes fitting the curvature"
        rows.append(row)
    return rows


# ------------------------------------------------------------------ report

COLUMNS: dict[str, list[tuple[str, str, str]]] = {  # (metric key, header, format)
    "mislabel": [("auprc", "AUPRC", ".3f"), ("recall@10%", "flips found in top 10%", ".2f")],
    "tracin": [
        ("pearson", "Pearson vs headwater", ".6f"),
        ("max_rel", "max rel. diff vs headwater", ".1e"),
    ],
    "laplace": [
        ("cov_vs_dense", "Σ_f max rel. diff vs dense", ".1e"),
        ("prob_vs_dense", "p (probit) max rel. diff vs dense", ".1e"),
        ("cov_vs_headwater", "Σ_f max rel. diff vs headwater", ".1e"),
        ("prior", "prior δ", ".4g"),
        ("lml", "log marginal lik.", ".6f"),
        ("lml_vs_dense", "log ML rel. diff vs dense", ".1e"),
    ],
    "unlearning": [
        ("param_left", "param. change left", ".4f"),
        ("margin_left", "test-margin change left", ".4f"),
        ("param_change", "‖Δθ‖ retrain", ".4f"),
        ("margin_change", "‖Δmargin‖ retrain", ".4f"),
    ],
}

INTRO: dict[str, str] = {
    "mislabel": (
        f"## 1. Mislabel detection by self-influence\n\n"
        f"A seeded {FLIP_FRACTION:.0%} of the 1,000 training labels (seed {FLIP_SEED}) are moved to another "
        "class; the bench's recipes are retrained on the flipped labels (logreg: L-BFGS to the exact optimum; "
        "MLP: Adam, 200 epochs) and every training example is ranked by its self-influence "
        "`∇ℓ_iᵀ(M + λI)⁻¹∇ℓ_i` (larger = more suspicious). Quality: AUPRC of finding the flipped examples "
        "(`headwater.evaluate.detection.auprc`; chance = 0.05) and the fraction found in the top 10%. "
        f"Damping λ as `make bench` (logreg {DAMPING['logreg']}, MLP {DAMPING['mlp']}; the L2 term is in M), "
        "folded with the weight decay into each peer's own damping. TracIn checkpoints: for the MLP, its own "
        f"Adam run, every {MLP_CHECKPOINT_EVERY} epochs (5 checkpoints, weight = Adam's lr × steps); for logreg "
        f"(an L-BFGS fit has no trajectory) a separate minibatch SGD run from zero ({LOGREG_SGD}). Every TracIn "
        "implementation sees the same checkpoints and weights. `renormalized-ekfac` is Hammoudeh & Lowd's "
        "renormalised influence of each example on itself (`∇ℓ_iᵀ(M + λI)⁻¹∇ℓ_i / ‖∇ℓ_i‖`); `tracin-gas` is "
        "TracIn with renormalised (unit) gradients, whose self-influence is the same for every example by "
        "construction (so `headwater.methods.detect_mislabels` refuses it). CG runs as `make bench`'s "
        "`cg-nystrom200` (rank-200 Nyström preconditioner, tol 0.1; plain CG to tol 1e-2 took 87 s on the MLP "
        "for the same AUPRC). pyDVL has no self-influence call: the diagonal of its n x n pairwise scores. "
        "dattri's EK-FAC runs on one batch of 1,000 (with batches of 100 its `self_attribute` fails inside "
        "dattri 0.3.0). Time includes fitting."
    ),
    "tracin": (
        "## 2. TracIn: headwater vs Captum TracInCP (and dattri)\n\n"
        f"Checkpoints of a short minibatch SGD run from the bench recipe's initialisation ({AGREEMENT_SGD}); "
        "the states after every epoch, each standing for the 20 steps of an epoch. headwater gets "
        "`Checkpoint(state, lr=η, steps=20)` (score `Σ_c η_c s_c ∇ℓ(q)ᵀ∇ℓ(i)`); Captum's "
        "`checkpoints_load_func` and dattri's `weight_list` return `η·steps` per checkpoint, the same "
        "weight: no other conversion (both use positive = proponent, the CE as the query loss). 1,000 train "
        "x 200 test. Captum runs its batched per-example gradients (`sample_wise_grads_per_batch=True`, "
        "summed CE); dattri always projects gradients to 512 dimensions (its default), so it agrees only up "
        "to that projection."
    ),
    "laplace": (
        "## 3. Linearised Laplace: headwater vs laplace-torch vs dense closed form\n\n"
        "Full (dense) GGN posterior precision `P = Σ_i J_iᵀΛ_iJ_i + δI` at the trained θ̂ (posterior mean θ̂: "
        "headwater `recenter=False`, laplace-torch's only choice), float64. logreg: all 650 weights; MLP: "
        "the last layer (650 weights; the full network's 17k x 17k GGN does not fit the time budget, and "
        "laplace-torch's own `last_layer` mode is the common practice). δ = n·wd = 1.0 (the prior under which "
        "the trained weights are the MAP). Compared on the 200 test points: function-space covariance "
        "`Σ_f = J P⁻¹ Jᵀ`, probit probabilities `softmax(μ/√(1 + π/8·diag Σ_f))`, and the Laplace log "
        "marginal likelihood; then each library's evidence maximisation over a scalar prior from δ = 1 "
        "(headwater: L-BFGS on log δ; laplace-torch: its default Adam, 100 steps of lr 0.1). The reference "
        "forms `P` from `torch.func` Jacobians and solves densely. laplace-torch 0.3 is installed with "
        "`--no-deps` (its torchvision requirement is unused at run time; see bench/requirements-peers.txt)."
    ),
    "unlearning": (
        "## 4. Unlearning: removing training examples\n\n"
        f"Seeded sets of {' / '.join(map(str, FORGET_SIZES))} training examples (seed {FORGET_SEED}; the "
        "smaller set is part of the larger) are removed. Reference: retraining on the remaining data "
        "(objective `(1/(n−k))Σ_{j∉S}ℓ_j + (wd/2)‖θ‖²`) by L-BFGS from θ̂ to convergence — the unique "
        "optimum for the convex problems here. logreg: all weights at its exact optimum; MLP: the last layer "
        "(the paper's selected parameter subset; hidden layers fixed, last layer re-optimised first so that θ̂ "
        "is an optimum; float64). Quality: `‖θ_method − θ_retrain‖ / ‖θ̂ − θ_retrain‖` (fraction of the "
        "parameter change left: 0 = as retraining, 1 = nothing done) and the same for the 200 test margins. "
        "headwater `unlearn` (Mehta et al. 2022): one Newton step on the remaining objective, exact "
        "(Hessian-vector products, CG), with a fitted curvature of all the data (plain influence step), or "
        "with EK-FAC of the remaining data (`correction=True`: the fitted EK-FAC is refitted without the "
        "removed examples; subtracting their exact curvature from EK-FAC, as an earlier version did, left an "
        "indefinite matrix: 10x overshoot at k = 10, CG failure at k = 50 on logreg). The plain step's "
        "half-left on logreg is not a bug: the removed examples carry much of the small curvature of this "
        "nearly separable problem, so H and H_{-S} differ far more than k/n. Baseline: a few epochs of the MLP recipe's Adam (lr 1e-3, batch 50) "
        "on the remaining data. Time includes fitting a curvature where one is fitted; the retraining time is "
        "that of the warm-started L-BFGS reference."
    ),
}


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _versions() -> str:
    out = []
    for dist in (
        "captum",
        "kronfluence",
        "dattri",
        "pyDVL",
        "laplace-torch",
        "curvlinops-for-pytorch",
    ):
        try:
            out.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            out.append(f"{dist} not installed")
    return ", ".join(out)


def write_markdown(rows: list[Row], path: Path = RESULTS, seconds: float | None = None) -> None:
    lines = [
        "# headwater benchmark results: mislabels, TracIn, Laplace, unlearning",
        "",
        f"Written by `make bench-extras` (python -m bench.extras) on {time.strftime('%Y-%m-%d')}; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Same process, same trained model for every library.",
        f"Peers: {_versions()}.",
        "Peak = largest RSS increase during the call (MiB). With `--warmup` (as `make bench-extras`) a call "
        f"faster than {WARMUP_REPEAT_BELOW:g} s is timed on a second run (the first pays imports and lazy "
        "initialisation). Errors are results: the message is in the last column."
        + (f" Whole run: {seconds:.0f} s." if seconds is not None else ""),
        "",
    ]
    for section in SECTIONS:
        sec_rows = [r for r in rows if r.section == section]
        if not sec_rows:
            continue
        cols = COLUMNS[section]
        lines += [
            INTRO[section],
            "",
            "| problem | method | library | time (s) | peak (MiB) | "
            + " | ".join(h for _, h, _ in cols)
            + " | settings / note |",
            "|---|---|---|---:|---:|" + "---:|" * len(cols) + "---|",
        ]
        for r in sec_rows:
            vals = " | ".join(_fmt(r.metrics.get(k), f) for k, _, f in cols)
            note = f"ERROR: {r.error}" if r.error else r.note
            settings = f"`{json.dumps(r.settings, default=str)}` " if r.settings else ""
            lines.append(
                f"| {r.problem} | {r.method} | {r.library} | {_fmt(r.seconds, '.2f')} | "
                f"{_fmt(r.peak_mb, '.0f')} | {vals} | {settings}{note} |"
            )
        lines += ["", *_summary(section, sec_rows), ""]
    path.write_text("\n".join(lines).rstrip() + "\n")


def _summary(section: str, rows: list[Row]) -> list[str]:
    """Time ratios peer / headwater where both ran."""
    out = []
    if section == "tracin":
        for prob in dict.fromkeys(r.problem for r in rows):
            for what in ("scores", "self-influence"):
                hw = next(
                    (
                        r
                        for r in rows
                        if r.problem == prob
                        and r.library == "headwater"
                        and r.method.endswith(what)
                        and r.seconds
                    ),
                    None,
                )
                for r in rows:
                    if (
                        hw
                        and r.problem == prob
                        and r.library != "headwater"
                        and r.method.endswith(what)
                        and r.seconds
                    ):
                        out.append(
                            f"- {prob} {what}: {r.library} / headwater time = {r.seconds / hw.seconds:.2f}"
                        )
    if section == "laplace":
        for prob in dict.fromkeys(r.problem for r in rows):
            for group in ("posterior", "optimize"):
                hw = next(
                    (
                        r
                        for r in rows
                        if (r.problem, r.group, r.library) == (prob, group, "headwater")
                        and r.seconds
                    ),
                    None,
                )
                lt = next(
                    (
                        r
                        for r in rows
                        if (r.problem, r.group, r.library) == (prob, group, "laplace-torch")
                        and r.seconds
                    ),
                    None,
                )
                if hw and lt:
                    out.append(
                        f"- {prob} {group}: laplace-torch / headwater time = {lt.seconds / hw.seconds:.2f}"
                    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--no-peers", action="store_true", help="headwater and baselines only")
    parser.add_argument("--warmup", action="store_true", help="run each method once untimed first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows: list[Row] = []
    peers = not args.no_peers
    for section in args.sections:
        if section == "mislabel":
            rows += mislabel_rows(args.problems, peers, args.warmup)
        elif section == "tracin":
            rows += tracin_rows(args.problems, peers, args.warmup)
        elif section == "laplace":
            rows += laplace_rows(args.problems, peers, args.warmup)
        else:
            rows += unlearning_rows(args.problems, args.warmup)
    write_markdown(rows, args.output, time.perf_counter() - start)
    print(f"[extras] wrote {args.output} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
