"""Local ensembles: an extrapolation (underspecification) score from the curvature.

Madras, Atwood & D'Amour 2020, "Detecting Extrapolation with Local Ensembles".
At a trained θ̂, directions of high curvature of the training objective are pinned
down by the data; directions of (near-)zero curvature are not, and an ensemble of
equally good models would spread along them. A test prediction ``f(x*)`` is
underdetermined to the extent its gradient points into that flat subspace:

    score(x*) = ‖(I − U_m U_mᵀ) ∇_θ f(x*; θ̂)‖₂

with ``U_m [P, m]`` the top-``m`` eigenvectors (by ``|eigenvalue|``) of the
Hessian/GGN ``M`` at θ̂ (any fitted curvature with ``eigen()``: ``Exact``, or
``Lanczos`` with full reorthogonalisation for large models). Projecting *off* the
top eigenvectors keeps the flat complement, which carries the score. For a linear
model with the GGN, the score of an input in the span of the training inputs is
~0 and grows with the input's component outside that span.

Which output is differentiated (``prediction``; ``f`` has ``C`` outputs per input):

- ``"auto"``: the output itself when ``C = 1``; ``"predicted_logit"`` for a
  :class:`~headwater.task.ClassificationTask`; ``"per_output"`` otherwise.
- ``"predicted_logit"``: ``f_ĉ(x*)`` with ``ĉ = argmax_c f_c(x*)`` — one score per input.
- ``"predicted_probability"``: ``softmax(f(x*))_ĉ`` — one score per input; it is
  ~0 wherever the model is confident, whatever the curvature.
- ``"per_output"``: every output ``f_c`` separately — a score per input and output
  ``[N, C]`` (take the norm or maximum over ``c`` for one number per input).
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor, nn

from headwater.curvature.base import Curvature
from headwater.data import DataLike
from headwater.task import ClassificationTask, Task
from headwater.uncertainty._jacobians import (
    check_curvature_layout,
    flat_parameters,
    output_jacobians,
)

__all__ = ["Prediction", "extrapolation_scores", "flat_subspace"]


class Prediction(str, Enum):
    """Which prediction's gradient is projected."""

    AUTO = "auto"
    PREDICTED_LOGIT = "predicted_logit"
    PREDICTED_PROBABILITY = "predicted_probability"
    PER_OUTPUT = "per_output"


def flat_subspace(
    curvature: Curvature, *, rank: int | None = None, min_eigval: float | None = None
) -> Tensor:
    """The top eigenvectors ``U_m [m, P]`` (rows, float64) to project off.

    Args:
        curvature: a fitted curvature with ``has_eigen`` (e.g. ``Exact``, ``Lanczos``).
        rank: ``m``, the number of eigenvectors kept, by ``|eigenvalue|`` descending.
        min_eigval: alternatively, keep every eigenvector with ``|eigenvalue| >
            min_eigval`` (eigenvalues of the undamped ``M``, weight decay included).
            Give at most one of ``rank``/``min_eigval``; with neither, all the
            eigenpairs of a low-rank curvature are kept (a full decomposition needs one).

    Returns:
        ``U_m`` as rows ``[m, P]``, orthonormal.

    Raises:
        TypeError: if ``curvature`` is not a Curvature with an eigendecomposition.
        ValueError: naming ``rank``/``min_eigval`` for bad or missing values.
    """
    if not isinstance(curvature, Curvature):
        raise TypeError(
            f"curvature: expected a headwater Curvature, got {type(curvature).__name__}"
        )
    if not curvature.has_eigen:
        raise TypeError(
            f"curvature: {type(curvature).__name__} has no eigendecomposition; use Exact or Lanczos"
        )
    if rank is not None and min_eigval is not None:
        raise ValueError("rank/min_eigval: give at most one of them")
    eigvals, eigvecs = curvature.eigen()  # [k], [k, P]
    order = torch.argsort(eigvals.abs(), descending=True)
    eigvals, eigvecs = eigvals[order], eigvecs[order]
    k, p = eigvecs.shape
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= k:
            raise ValueError(
                f"rank: must be an integer in [0, {k}] (the eigenpairs available), got {rank!r}"
            )
        keep = rank
    elif min_eigval is not None:
        if (
            isinstance(min_eigval, bool)
            or not isinstance(min_eigval, int | float)
            or min_eigval < 0
        ):
            raise ValueError(f"min_eigval: must be a float >= 0, got {min_eigval!r}")
        keep = int((eigvals.abs() > min_eigval).sum())
    else:
        if k >= p:
            raise ValueError(
                f"rank: {type(curvature).__name__} holds all {p} eigenvectors, so projecting off all "
                "of them leaves nothing; give `rank` or `min_eigval`"
            )
        keep = k
    return eigvecs[:keep].to(torch.float64)


def _resolve(prediction: Prediction | str, task: Task, n_outputs: int) -> Prediction:
    try:
        choice = Prediction(prediction)
    except ValueError as err:
        raise ValueError(
            f"prediction: expected one of {[p.value for p in Prediction]}, got {prediction!r}"
        ) from err
    if choice is Prediction.AUTO:
        if n_outputs == 1:
            return Prediction.PER_OUTPUT
        return (
            Prediction.PREDICTED_LOGIT
            if isinstance(task, ClassificationTask)
            else Prediction.PER_OUTPUT
        )
    return choice


def _prediction_gradients(outputs: Tensor, jac: Tensor, choice: Prediction) -> Tensor:
    """``[B, P]`` (one prediction) or ``[B, C, P]`` (per output)."""
    if choice is Prediction.PER_OUTPUT:
        return jac
    top = outputs.argmax(dim=1)  # [B]
    rows = torch.arange(outputs.shape[0], device=outputs.device)
    if choice is Prediction.PREDICTED_LOGIT:
        return jac[rows, top]
    probs = torch.softmax(outputs, dim=1)  # [B, C]
    # ∂p_ĉ/∂f = p_ĉ (e_ĉ − p)
    dp_df = probs[rows, top].unsqueeze(1) * (
        torch.nn.functional.one_hot(top, outputs.shape[1]).to(probs) - probs
    )  # [B, C]
    return torch.einsum("bc,bcp->bp", dp_df, jac)


def extrapolation_scores(
    model: nn.Module,
    task: Task,
    curvature: Curvature,
    data: Tensor | DataLike,
    *,
    rank: int | None = None,
    min_eigval: float | None = None,
    prediction: Prediction | str = Prediction.AUTO,
    chunk_size: int = 64,
) -> Tensor:
    """Local-ensemble extrapolation scores ``‖(I − U_m U_mᵀ) ∇_θ f(x*)‖₂`` (Madras et al. 2020).

    Large scores flag inputs whose prediction the training data leave underdetermined
    (extrapolation); ~0 means every direction the prediction depends on is pinned down.

    Args:
        model: the trained model (never modified).
        task: gives the output and the analysed parameters (those of ``curvature``).
        curvature: a curvature fitted at the trained θ̂ on the training data, with
            ``eigen()`` (``Exact``, ``Lanczos``, ``Arnoldi``, ``Nystrom``).
        data: test inputs ``[N, ...]``, or an ``(inputs, targets)`` pair, Dataset or
            DataLoader (targets are ignored).
        rank, min_eigval: how many top eigenvectors to project off (see :func:`flat_subspace`).
        prediction: which output's gradient (see the module docstring).
        chunk_size: inputs per vectorised Jacobian step.

    Returns:
        ``[N]`` scores, or ``[N, C]`` with ``prediction="per_output"`` and ``C > 1``
        outputs (``[N]`` when ``C = 1``), in the parameters' dtype.

    Raises:
        TypeError/ValueError: naming the argument (unfitted or mismatched
        ``curvature``, bad ``rank``/``prediction``, inputs that do not fit).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(task, Task):
        raise TypeError(f"task: expected a headwater Task, got {type(task).__name__}")
    if isinstance(curvature, Curvature) and curvature.state is None:
        raise ValueError("curvature: not fitted; call curvature.fit(model, task, train) first")
    theta, layout = flat_parameters(model, task)
    u = flat_subspace(curvature, rank=rank, min_eigval=min_eigval).to(theta.device)  # [m, P]
    check_curvature_layout(curvature.layout, layout)
    scores = []
    for outputs, jac in output_jacobians(model, task, data, chunk_size=chunk_size, name="data"):
        choice = _resolve(prediction, task, outputs.shape[1])
        g = _prediction_gradients(outputs, jac, choice).to(torch.float64)  # [B, P] or [B, C, P]
        residual = g - (g @ u.T) @ u
        score = torch.linalg.vector_norm(residual, dim=-1)
        if score.dim() == 2 and score.shape[1] == 1:
            score = score[:, 0]
        scores.append(score.to(theta.dtype))
    return torch.cat(scores)
