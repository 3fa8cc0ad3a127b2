"""The default curvature: the most accurate one the time and memory budget allows.

The exact damped matrix (GGN by default) is the most accurate influence curvature
(bench: LDS 0.66 on the digits CNN against 0.48-0.58 for EK-FAC, M-FAC, Arnoldi), and
for small models it is affordable: forming it costs about ``n · C · P²``
multiply-adds (``n`` training examples, ``C`` model outputs per example, ``P``
analysed parameters: one Jacobian outer product per output and example), its
Cholesky factor ``P³/3``, and it holds two float64 ``P × P`` matrices. EK-FAC costs
about two passes of ``C`` backward passes over the data whatever ``P``.

:func:`choose_curvature` estimates the dense fit's time from that count at
:data:`DENSE_MACS_PER_SECOND` and takes ``"exact"`` (solved by Cholesky in float64)
when it fits in :data:`TIME_BUDGET_SECONDS` and in half the memory ``Exact``
allows; else ``"arnoldi"`` at its defaults (rank 100-200, up to 400 products of ``M`` over
the data, each counted on :data:`PROBE_EXAMPLES` examples and extrapolated) when those fit
the same budget; else ``"ekfac"``. Arnoldi ranks well above EK-FAC at its defaults
(bench/defaults_results.md, LDS: digits MLP 0.738 (rank 200) vs 0.573 in 4 s vs 0.5 s;
CNN 0.468 vs 0.362), EK-FAC scales to any data size in two passes. Measured with one thread on a 2-core machine (bench/
defaults.py): the digits CNN (3,658 parameters, n = 1,000, C = 10) fits densely in
~27 s (EK-FAC ~3 s); the digits MLP (17,226 parameters) would take ~10 minutes densely
and gets EK-FAC. The Cholesky factor alone runs at :data:`CHOLESKY_MACS_PER_SECOND`
(P = 8,000: 20 s; 17,000: ~3 minutes), so within a minute the dense range ends near
10,000 parameters however few the examples; a larger ``budget_seconds`` extends it to a
few tens of thousands (memory allowing: 2.4 GB per float64 matrix at P = 17,000).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from headwater.curvature._lowrank import DEFAULT_RANK, MAX_DEFAULT_RANK
from headwater.curvature.exact import Exact
from headwater.curvature.operators import curvature_matvec
from headwater.data import DataLike, iter_batches, num_examples, subset
from headwater.gradients.functional import bind, detached, evaluation_mode, prepare_batch
from headwater.task import Task

__all__ = [
    "CHOLESKY_MACS_PER_SECOND",
    "DENSE_MACS_PER_SECOND",
    "TIME_BUDGET_SECONDS",
    "CurvatureChoice",
    "choose_curvature",
]

DENSE_MACS_PER_SECOND = 5e9
"""Multiply-adds per second of the dense GGN fit, measured with one thread (the digits
CNN: 1.3e11 multiply-adds in ~27 s)."""

CHOLESKY_MACS_PER_SECOND = 9e9
"""Multiply-adds per second of a float64 Cholesky factorisation, one thread (P = 4,000-8,000)."""

TIME_BUDGET_SECONDS = 60.0
"""The dense fit (else Arnoldi) is chosen when its estimated time is at most this."""

ARNOLDI_STEPS = 2 * MAX_DEFAULT_RANK
"""Arnoldi's most steps at its defaults (2 × rank, the rank growing from 100 to at most 200
while the kept spectrum is above the damping): products of ``M`` over the data."""

PROBE_EXAMPLES = 64
"""Examples on which one ``M``-vector product's operations are counted to estimate Arnoldi's cost."""

ARNOLDI_FLOPS_PER_SECOND = 2e9
"""Floating-point operations per second of Arnoldi's products, one thread, measured on the
digits MLP (200 products of 6.6 MFLOP per 64 examples over 1,000 examples: 10 s) and CNN
(17 MFLOP per 64: 26 s)."""


@dataclass(frozen=True)
class CurvatureChoice:
    """The chosen curvature ``name`` with constructor ``options`` and a one-line reason."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"curvature_choice": self.name, "curvature_choice_reason": self.reason}


def choose_curvature(
    model: nn.Module,
    task: Task,
    train: DataLike,
    *,
    kind: str = "ggn",
    budget_seconds: float = TIME_BUDGET_SECONDS,
    max_params: int | None = None,
) -> CurvatureChoice:
    """``"exact"`` (Cholesky) when the dense matrix fits the time and memory budget, else
    ``"arnoldi"`` (rank 100-200) when its products over the data do, else ``"ekfac"`` (see the
    module docs).

    Args:
        model, task, train: as for :func:`headwater.influence`.
        kind: ``"ggn"``, ``"hessian"`` or ``"ef"`` (EK-FAC has no Hessian: then the
            fallback is ``"cg"``).
        budget_seconds: time budget of the dense fit.
        max_params: memory limit on ``P`` (default: :class:`~headwater.curvature.Exact`'s).
    """
    params = task.parameters(model)
    p = sum(t.numel() for t in params.values())
    n = num_examples(train, "train")
    outputs = _outputs(model, task, train, params)
    per_example = {"ggn": outputs, "ef": 1}.get(kind, p)  # the Hessian: P products per example
    seconds = n * per_example * p * p / DENSE_MACS_PER_SECOND + p**3 / 3 / CHOLESKY_MACS_PER_SECOND
    limit = max_params if max_params is not None else Exact().max_params
    size = f"{p:,} parameters, {n:,} examples x {per_example:,} outputs"
    if seconds <= budget_seconds and p <= limit:
        return CurvatureChoice(
            "exact",
            {"solver": "cholesky"},
            f"curvature=exact (dense {kind}, Cholesky in float64): {size}, estimated "
            f"{seconds:.0f} s <= budget {budget_seconds:.0f} s",
        )
    why = (
        f"~{seconds:,.0f} s > budget {budget_seconds:.0f} s"
        if p <= limit
        else f"{p:,} > {limit:,} parameters for memory"
    )
    if kind != "hessian" and ARNOLDI_STEPS * p * 8 <= limit * limit * 8:  # the Krylov basis fits
        krylov = ARNOLDI_STEPS * _matvec_seconds(model, task, train, kind)
        if krylov <= budget_seconds:
            return CurvatureChoice(
                "arnoldi",
                {},
                f"curvature=arnoldi (rank {DEFAULT_RANK}-{MAX_DEFAULT_RANK}): the dense {kind} "
                f"would need {why} ({size}); up to {ARNOLDI_STEPS} products over the data "
                f"estimated {krylov:.0f} s",
            )
        why += f"; Arnoldi ~{krylov:,.0f} s"
    fallback = "cg" if kind == "hessian" else "ekfac"
    return CurvatureChoice(
        fallback, {}, f"curvature={fallback}: the dense {kind} would need {why} ({size})"
    )


def _matvec_seconds(model: nn.Module, task: Task, train: DataLike, kind: str) -> float:
    """Estimated seconds of one ``M``-vector product over all of ``train``: the floating-point
    operations of a product on its first :data:`PROBE_EXAMPLES` examples (counted, not timed,
    so the choice does not depend on the machine's load; the second call, which reuses the
    linearisations as Arnoldi's later steps do), scaled to ``n`` at
    :data:`ARNOLDI_FLOPS_PER_SECOND`."""
    n = num_examples(train, "train")
    m = min(n, PROBE_EXAMPLES)
    params = task.parameters(model)
    # the autograd product (jacobian_mb=0): a subset's Jacobians would fit where all may not
    matvec = curvature_matvec(model, task, subset(train, range(m)), kind, jacobian_mb=0)
    v = torch.zeros(
        1, sum(t.numel() for t in params.values()), dtype=next(iter(params.values())).dtype
    )
    matvec(v)
    with FlopCounterMode(display=False) as counter:
        matvec(v)
    return counter.get_total_flops() * (n / m) / ARNOLDI_FLOPS_PER_SECOND


def _outputs(model: nn.Module, task: Task, train: DataLike, params: dict[str, torch.Tensor]) -> int:
    """Model outputs per example (one forward pass on one training example)."""
    ref = next(iter(params.values()))
    x, _ = prepare_batch(next(iter_batches(train, 1, "train")), ref)
    with torch.no_grad(), evaluation_mode(model):
        return int(task.output(bind(model, detached(params)), x)[0].numel())
