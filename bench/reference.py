"""Exact dense influence scores, computed independently of headwater and of the peers.

Convention (headwater's, see shared DESIGN.md):

    score[q, i] = grad m(q)^T (H + damping*I)^{-1} grad l(i)

- ``l(i)`` is the per-example cross-entropy of training example i (no regulariser:
  removing i leaves the L2 term in place);
- ``H`` is the curvature of the *mean* training objective
  ``(1/n) sum_i l(i) + (weight_decay/2) ||theta||^2``, i.e. the Hessian (or GGN) of the
  mean CE plus ``weight_decay * I``;
- ``m(q)`` is the query measurement, the loss or the correct-class margin.

Removing training example i changes m(q) by about ``+score[q, i] / n``; with the loss
as measurement a positive score means i helps q.

Everything is dense and in the problem's dtype (use float64 for verification):
the Hessian comes from ``torch.func.hessian`` on the flat parameter vector (or
row-chunked ``jacrev`` of the gradient for larger models), per-example gradients from a
plain autograd loop. Intended for the logreg problem (P = 650); the MLP (P = 17,226)
works but takes minutes and a few GB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bench.problems import Problem, margin_from_logits

__all__ = [
    "compare",
    "dense_ggn",
    "dense_hessian",
    "exact_scores",
    "flat_params",
    "pearson",
    "per_example_grads",
    "scale_ratio",
]


def _names_shapes(model: nn.Module) -> tuple[list[str], list[torch.Size]]:
    names, shapes = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            names.append(n)
            shapes.append(p.shape)
    return names, shapes


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def _unflatten(theta: torch.Tensor, names, shapes) -> dict[str, torch.Tensor]:
    out, o = {}, 0
    for n, s in zip(names, shapes):
        k = 1
        for d in s:
            k *= d
        out[n] = theta[o : o + k].reshape(s)
        o += k
    return out


def per_example_grads(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, kind: str = "loss"
) -> torch.Tensor:
    """[B, P] gradients of the per-example loss (``kind="loss"``) or margin, by a loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for b in range(X.shape[0]):
        out = model(X[b : b + 1])
        if kind == "loss":
            v = F.cross_entropy(out, y[b : b + 1])
        elif kind == "margin":
            v = margin_from_logits(out, y[b : b + 1]).sum()
        else:
            raise ValueError(f"kind must be 'loss' or 'margin', got {kind!r}")
        g = torch.autograd.grad(v, params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


def dense_hessian(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    weight_decay: float,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """[P, P] Hessian of mean CE + (weight_decay/2)||theta||^2 at the model's parameters.

    ``chunk_size=None`` uses ``torch.func.hessian`` (forward-over-reverse, all at once);
    an integer computes the rows with ``jacrev(grad)`` in chunks of that many rows
    (bounded memory for larger models).
    """
    names, shapes = _names_shapes(model)
    theta0 = flat_params(model)

    def f(theta):
        out = functional_call(model, _unflatten(theta, names, shapes), (X,))
        return F.cross_entropy(out, y) + 0.5 * weight_decay * (theta * theta).sum()

    if chunk_size is None:
        H = torch.func.hessian(f)(theta0)
    else:
        H = torch.func.jacrev(torch.func.grad(f), chunk_size=chunk_size)(theta0)
    return 0.5 * (H + H.T)


def dense_ggn(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, weight_decay: float, chunk: int = 100
) -> torch.Tensor:
    """[P, P] GGN of mean CE (sum_i J_i^T (diag p_i - p_i p_i^T) J_i / n) + weight_decay*I.

    Equals the Hessian for a linear model (logreg). Accumulated over example chunks.
    """
    names, shapes = _names_shapes(model)
    theta0 = flat_params(model)
    P = theta0.numel()
    n = X.shape[0]
    G = torch.zeros(P, P, dtype=theta0.dtype)

    def logits_one(theta, x):
        return functional_call(model, _unflatten(theta, names, shapes), (x.unsqueeze(0),))[0]

    jac = torch.func.vmap(torch.func.jacrev(logits_one), in_dims=(None, 0))
    for s in range(0, n, chunk):
        xb = X[s : s + chunk]
        J = jac(theta0, xb)  # [b, C, P]
        with torch.no_grad():
            p = torch.softmax(model(xb), dim=-1)  # [b, C]
        Hout = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # [b, C, C]
        G += torch.einsum("bcp,bcd,bdq->pq", J, Hout, J)
    G /= n
    G += weight_decay * torch.eye(P, dtype=G.dtype)
    return 0.5 * (G + G.T)


def exact_scores(
    problem: Problem,
    *,
    damping: float = 0.0,
    measurement: str = "loss",
    curvature: str = "hessian",
    model: nn.Module | None = None,
    chunk_size: int | None = None,
    rank: int | None = None,
) -> torch.Tensor:
    """Exact ``[n_test, n_train]`` scores ``G_q (H + damping I)^{-1} G_train^T``.

    ``curvature``: ``"hessian"`` (default) or ``"ggn"``; both include the L2 term.
    ``rank``: if given, the truncated inverse ``V_k (D_k + damping)^{-1} V_k^T`` over the
    top-``rank`` eigenpairs of H by |eigenvalue| (discarded directions contribute zero),
    which is what a converged Arnoldi method with that rank computes.
    """
    model = problem.model if model is None else model
    dtype = next(model.parameters()).dtype
    Xtr, ytr = problem.X_train.to(dtype), problem.y_train
    Xte, yte = problem.X_test.to(dtype), problem.y_test
    if curvature == "hessian":
        H = dense_hessian(model, Xtr, ytr, problem.weight_decay, chunk_size=chunk_size)
    elif curvature == "ggn":
        H = dense_ggn(model, Xtr, ytr, problem.weight_decay)
    else:
        raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
    Gtr = per_example_grads(model, Xtr, ytr, "loss")
    Gq = per_example_grads(model, Xte, yte, measurement)
    if rank is not None:
        evals, evecs = torch.linalg.eigh(H)
        keep = evals.abs().argsort(descending=True)[:rank]
        V, D = evecs[:, keep], evals[keep] + damping
        return (((Gq @ V) / D) @ (Gtr @ V).T).detach()
    H = H + damping * torch.eye(H.shape[0], dtype=H.dtype)
    # H is symmetric positive definite for logreg; use a symmetric solve when possible.
    try:
        L = torch.linalg.cholesky(H)
        HinvGq = torch.cholesky_solve(Gq.T, L)
    except RuntimeError:  # indefinite (non-convex model, small damping)
        HinvGq = torch.linalg.solve(H, Gq.T)
    return (HinvGq.T @ Gtr.T).detach()


# ------------------------------------------------------------------- comparisons


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of all entries (float64)."""
    a = a.detach().double().reshape(-1)
    b = b.detach().double().reshape(-1)
    a = a - a.mean()
    b = b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def scale_ratio(est: torch.Tensor, ref: torch.Tensor) -> float:
    """Least-squares slope of est on ref through the origin: <est, ref> / <ref, ref>.

    ~1 when scale and sign agree; ~-1 for a sign flip; ~n or ~1/n for a missing 1/n.
    """
    e = est.detach().double().reshape(-1)
    r = ref.detach().double().reshape(-1)
    return float((e @ r) / (r @ r))


def compare(est: torch.Tensor | None, ref: torch.Tensor) -> dict[str, float]:
    """Pearson, scale ratio, mean per-query Spearman rank correlation and relative error."""
    if est is None:
        nan = float("nan")
        return {"pearson": nan, "ratio": nan, "spearman": nan, "rel_err": nan}
    est = est.detach().double()
    ref = ref.detach().double()
    if not torch.isfinite(est).all():
        nan = float("nan")
        return {"pearson": nan, "ratio": nan, "spearman": nan, "rel_err": nan}

    def ranks(x):
        return x.argsort(dim=1).argsort(dim=1).double()

    re_, rr = ranks(est), ranks(ref)
    re_ = re_ - re_.mean(1, keepdim=True)
    rr = rr - rr.mean(1, keepdim=True)
    sp = ((re_ * rr).sum(1) / (re_.norm(dim=1) * rr.norm(dim=1))).mean()
    return {
        "pearson": pearson(est, ref),
        "ratio": scale_ratio(est, ref),
        "spearman": float(sp),
        "rel_err": float((est - ref).norm() / ref.norm()),
    }
