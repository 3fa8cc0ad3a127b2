"""K-FAC and EK-FAC: per-module Kronecker-factored curvature.

For a block (see :mod:`~headwater.gradients.layers`) with per-example gradient
``G_n = Σ_t s_t ã_tᵀ``, K-FAC (Martens & Grosse 2015) approximates the block of the
curvature of the mean loss by

    M_block ≈ S ⊗ A,   A = (1/(N·T)) Σ_{n,t} ã ãᵀ,   S = (1/N) Σ_{n,t} s sᵀ

(row-major ``vec``; for ``T = 1`` this is ``E[s sᵀ] ⊗ E[ã ãᵀ]``, for sequences and
convolutions the "expand" form of Grosse & Martens 2016 / Eschenhagen et al. 2023).
With ``A = Q_A Λ_A Q_Aᵀ`` and ``S = Q_S Λ_S Q_Sᵀ`` (float64), the inverse is applied in
the Kronecker eigenbasis:

    (M_block + (wd + λ) I)⁻¹ vec(V) = vec(Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + wd + λ)] Q_Aᵀ)

with ``Λ = λ_S λ_Aᵀ`` for K-FAC. EK-FAC (George et al. 2018, "Fast Approximate Natural
Gradient Descent in a Kronecker-factored Eigenbasis"; Grosse et al. 2023 for influence)
keeps the basis and refits the eigenvalues in a second pass, ``Λ = (1/N) Σ_n
(Q_Sᵀ G_n Q_A)²``, the diagonal of the exact block in that basis (with sampled targets,
drawn afresh for this pass: see ``_correct``).

Which ``s``: ``kind="ef"`` backpropagates the loss at the true targets (empirical
Fisher); ``kind="ggn"`` with ``ggn_estimator="sampled"`` at targets drawn from the
model (true Fisher = GGN in expectation for cross-entropy and squared error; seeded)
or with ``"exact"`` the columns of a square root of the loss Hessian in the outputs
(``C`` cotangents for ``C`` outputs, pulled back in one vectorised backward pass; then
K-FAC equals the GGN block exactly for one linear layer under squared error, or for
one example). The default ``"auto"`` takes ``"exact"`` when the model's output has at
most ``EXACT_MAX_OUTPUTS = 64`` entries per example (a classifier's logits, a small
regression head: deterministic, and ~C times one backward pass) and ``"sampled"``
otherwise (e.g. a language model's ``T × vocabulary`` logits). Measured on the digits
MLP (bench/ekfac_vs_peers.py, LDS on the margin): EK-FAC 0.55 with the exact
expectation vs 0.45-0.49 with one sampled label per example (whose scores agree only
~0.73 Pearson between seeds), at ~2x the fit time of sampling.

Under ``torch.distributed`` (:mod:`headwater.distributed`) each rank streams over its
shard of the data; the sums ``Σ ã ãᵀ``, ``Σ s sᵀ``, the position counts and the
EK-FAC sums ``Σ_n (Q_Sᵀ G_n Q_A)²`` are all-reduced before dividing and before the
eigendecompositions, so every rank holds the factors one process would fit (fitting
is collective). Sampled targets are drawn per example from ``seed`` and the
example's index, so a ``"sampled"`` estimate does not depend on the number of
processes or the chunk size either.

Damping ``None`` takes, per block, ``relative_damping × mean(Λ)`` (Kronfluence's
heuristic with factor 0.1; the mean excludes the weight decay). The task's weight
decay enters as ``+wd·I``, like every curvature of the library.

Coverage (:mod:`~headwater.gradients.layers`): every linear, convolution, ``Conv1D``
and embedding layer is a Kronecker block (an embedding's input factor is diagonal: the
token frequencies, its eigenbasis the identity); every other analysed parameter
(normalisation layers, biases of unsupported layers, free or tied parameters) is in
one diagonal block, ``diag(M)`` of the same matrix kind and estimator,
``(1/N) Σ_n w Σ_k (J_nᵀ c_k)²`` from per-example gradients through the whole model
(for EK-FAC this is also its corrected eigenvalues in the identity basis).

Padding: when ``task.attention_mask(inputs)`` returns a ``[B, T]`` mask, positions
where it is 0 are left out of ``A`` (and of its position count) for every block with
``T`` positions per example, as Kronfluence does; the gradients themselves are the
model's.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import hessian, vmap

from headwater.curvature._solver_common import check_int
from headwater.curvature.base import Curvature, Memory, ProblemSize
from headwater.curvature.defaults import FACTORED_RELATIVE_DAMPING, DampingScale
from headwater.curvature.defaults import default_damping as rule
from headwater.curvature.operators import MatrixKind
from headwater.data import DataLike
from headwater.distributed import all_reduce_sum_, local_batches, shard_range
from headwater.gradients.functional import bind, detached, evaluation_mode, prepare_batch
from headwater.gradients.layers import (
    Block,
    DiagonalPart,
    capture,
    find_blocks,
    from_blocks,
    to_blocks,
)
from headwater.gradients.per_example import check_batch
from headwater.progress import ProgressFn, report
from headwater.task import Task, sample_per_example

__all__ = [
    "EKFAC",
    "EXACT_MAX_OUTPUTS",
    "KFAC",
    "GGNEstimator",
    "KroneckerCurvature",
    "KroneckerState",
    "output_cotangents",
]

EXACT_MAX_OUTPUTS = 64
"""``ggn_estimator="auto"`` is ``"exact"`` up to this many model outputs per example."""

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


class GGNEstimator(str, Enum):
    """How ``kind="ggn"`` obtains output gradients ``s``."""

    AUTO = "auto"  # EXACT for at most EXACT_MAX_OUTPUTS outputs per example, else SAMPLED
    SAMPLED = "sampled"  # targets sampled from the model: true Fisher, unbiased for the GGN
    EXACT = "exact"  # columns of the loss Hessian's square root: the GGN itself

    def resolve(self, n_outputs: int) -> GGNEstimator:
        """The estimator used for a model with ``n_outputs`` outputs per example."""
        if self is not GGNEstimator.AUTO:
            return self
        return GGNEstimator.EXACT if n_outputs <= EXACT_MAX_OUTPUTS else GGNEstimator.SAMPLED


@dataclass(frozen=True)
class KroneckerState:
    """Fitted factors, per block (keyed by module name); eigenvalues exclude wd and damping."""

    blocks: tuple  # Block.to_list() rows, in layout order
    eigvals_a: dict[str, Tensor]  # [width]
    eigvecs_a: dict[str, Tensor]  # [width, width], columns
    eigvals_s: dict[str, Tensor]  # [out]
    eigvecs_s: dict[str, Tensor]  # [out, out], columns
    corrected: dict[str, Tensor]  # EK-FAC eigenvalues [out, width]; empty for K-FAC
    damping: Tensor  # [n_blocks] float64
    weight_decay: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(tuple(b) for b in self.blocks))

    def block_list(self) -> tuple[Block, ...]:
        return tuple(Block(*b) for b in self.blocks)

    def eigenvalues(self, module: str) -> Tensor:
        """``Λ [out, width]`` of one block."""
        if module in self.corrected:
            return self.corrected[module]
        return torch.outer(self.eigvals_s[module], self.eigvals_a[module])


def output_cotangents(
    task: Task,
    output: Tensor,
    targets: Tensor,
    kind: MatrixKind,
    estimator: GGNEstimator,
    seed: int,
    first: int,
    mc_samples: int,
    skip: int = 0,
) -> tuple[float, Tensor]:
    """Weight ``w`` and output cotangents ``c [K, *output.shape]``: the signals are
    ``s_k = J_zᵀ c_k`` and the curvature block is ``w Σ_k`` of their products.
    Sampled targets are drawn per example (``seed`` and its global index, the chunk's
    ``first`` + position: :func:`~headwater.task.sample_per_example`); the first ``skip``
    draws of each example are passed over (a later pass takes fresh draws)."""
    out = output.detach()
    if kind is MatrixKind.EF or estimator is GGNEstimator.SAMPLED:
        draws = (
            [targets]
            if kind is MatrixKind.EF
            else sample_per_example(
                task, out, targets, seed=seed, first=first, draws=skip + mc_samples
            )[skip:]
        )
        cots = []
        for y in draws:
            o = out.clone().requires_grad_(True)
            cots.append(torch.autograd.grad(task.loss(o, y).sum(), o)[0])
        return 1.0 / len(draws), torch.stack(cots)
    flat = out.reshape(out.shape[0], -1)  # [B, C]

    def loss_one(o: Tensor, y: Tensor) -> Tensor:
        return task.loss(o.reshape(1, *out.shape[1:]), y.unsqueeze(0)).sum()

    h = vmap(hessian(loss_one))(flat, targets).double()  # [B, C, C]
    evals, evecs = torch.linalg.eigh(0.5 * (h + h.mT))
    root = evecs * evals.clamp_min(0).sqrt().unsqueeze(1)  # H = R Rᵀ, [B, C, C]
    return 1.0, root.permute(2, 0, 1).reshape(flat.shape[1], *out.shape).to(out.dtype)


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition in float64. On CPU through numpy's LAPACK: torch's
    multi-threaded CPU ``eigh`` can be 1000x slower for ~100x100 factors when cores are
    oversubscribed (measured: 2.9 s vs 2 ms for 128x128 on a loaded 2-core machine).
    A vector is a diagonal factor: its values, and empty eigenvectors (the identity)."""
    if matrix.dim() == 1:
        return matrix.double(), matrix.new_empty(0, dtype=torch.float64)
    matrix = 0.5 * (matrix + matrix.T).double()
    if matrix.device.type != "cpu":
        return torch.linalg.eigh(matrix)
    vals, vecs = np.linalg.eigh(matrix.numpy())
    return torch.from_numpy(vals), torch.from_numpy(np.ascontiguousarray(vecs))


def _add_moment(total: Tensor, rows: Tensor, weight: float) -> None:
    """``total += weight · rowsᵀ rows`` (only its diagonal when ``total`` is a vector): the
    chunk's product in at least float32, summed over chunks in ``total``'s float64 (a
    float64 product of the ``[K·B, out]`` signals was 4 ms per example for a 1024-wide layer)."""
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    total.add_((rows.square().sum(0) if total.dim() == 1 else rows.T @ rows).double(), alpha=weight)


def _rotate(v: Tensor, basis: Tensor) -> Tensor:
    """``v @ basis`` on the last axis; an empty ``basis`` is the identity."""
    return v if basis.numel() == 0 else v @ basis


def _in_basis(v: Tensor, qs: Tensor, qa: Tensor, *, back: bool = False) -> Tensor:
    """``Q_Sᵀ V Q_A`` (``back``: ``Q_S V Q_Aᵀ``) for ``V [K, out, width]``; an empty basis
    is the identity (a diagonal factor)."""
    if qa.numel():
        v = v @ (qa.T if back else qa)
    return v if qs.numel() == 0 else (qs if back else qs.T) @ v


class KroneckerCurvature(Curvature):
    """Shared fitting and solving of :class:`KFAC` and :class:`EKFAC`.

    Args:
        kind: ``"ggn"`` (default) or ``"ef"``.
        damping: absolute λ, or ``None`` for ``relative_damping × mean(Λ)`` per block.
        relative_damping: factor of the per-block default damping (default 0.1, the
            ``"factored"`` rule of :mod:`~headwater.curvature.defaults`).
        ggn_estimator: ``"auto"`` (default), ``"exact"`` or ``"sampled"`` (module docs).
        mc_samples: sampled targets per example with ``"sampled"``.
        seed: seed of the sampled targets.
        factor_dtype: storage dtype of factors, ``"float32"``, ``"bfloat16"``,
            ``"float64"`` or ``None`` (the parameters' dtype). Products run in at
            least float32.
        chunk_size: examples per forward/backward pass while fitting.
        query_rank: ``None`` (default) or ``r``: per-block scoring keeps each block's
            preconditioned query gradient as its rank-``r`` truncated SVD, ``r·(out + width)``
            numbers instead of ``out·width`` (exact where that is no fewer; see
            :mod:`~headwater.methods.factored`). Not part of the fitted state.
    """

    kinds = (MatrixKind.GGN, MatrixKind.EF)
    block_features = True
    corrected: ClassVar[bool]

    def __init__(
        self,
        *,
        kind: MatrixKind | str = MatrixKind.GGN,
        damping: float | None = None,
        chunk_size: int = 64,
        relative_damping: float = FACTORED_RELATIVE_DAMPING,
        ggn_estimator: GGNEstimator | str = GGNEstimator.AUTO,
        mc_samples: int = 1,
        seed: int = 0,
        factor_dtype: str | None = None,
        query_rank: int | None = None,
    ):
        super().__init__(kind=kind, damping=damping, chunk_size=chunk_size)
        self.query_rank = None if query_rank is None else check_int("query_rank", query_rank, 1)
        if not isinstance(relative_damping, int | float) or not relative_damping >= 0:
            raise ValueError(f"relative_damping: must be a float >= 0, got {relative_damping!r}")
        try:
            self.ggn_estimator = GGNEstimator(ggn_estimator)
        except ValueError as err:
            raise ValueError(
                f"ggn_estimator: expected 'auto', 'exact' or 'sampled', got {ggn_estimator!r}"
            ) from err
        if not isinstance(mc_samples, int) or mc_samples <= 0:
            raise ValueError(f"mc_samples: must be a positive integer, got {mc_samples!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        if factor_dtype is not None and factor_dtype not in _DTYPES:
            raise ValueError(
                f"factor_dtype: expected one of {list(_DTYPES)} or None, got {factor_dtype!r}"
            )
        self.relative_damping, self.mc_samples, self.seed = (
            float(relative_damping),
            mc_samples,
            seed,
        )
        self.factor_dtype = factor_dtype

    @classmethod
    def _state_type(cls) -> type:
        return KroneckerState

    @classmethod
    def preconditioner(
        cls, kind: MatrixKind, damping: float, chunk_size: int
    ) -> KroneckerCurvature:
        """The factors of the same kind (of the GGN for ``kind="hessian"``)."""
        return cls(
            kind=MatrixKind.GGN if kind is MatrixKind.HESSIAN else kind,
            damping=damping,
            chunk_size=chunk_size,
        )

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "relative_damping": self.relative_damping,
            "ggn_estimator": self.ggn_estimator.value,
            "mc_samples": self.mc_samples,
            "seed": self.seed,
            "factor_dtype": self.factor_dtype,
        }

    def scoring_settings(self) -> dict[str, Any]:
        return {"query_rank": self.query_rank}

    @property
    def fitted_damping(self) -> float:
        """The damping, averaged over blocks (per block: ``state.damping``)."""
        self._check_fitted()
        return float(self.state.damping.mean())

    @property
    def blocks(self) -> tuple[Block, ...]:
        self._check_fitted()
        return self.state.block_list()

    # -- fitting ---------------------------------------------------------------------
    def _stream(
        self,
        model: nn.Module,
        task: Task,
        blocks: tuple[Block, ...],
        data: DataLike,
        stage: str,
        progress: ProgressFn | None,
        skip_draws: int = 0,
    ) -> Iterator[tuple[dict[str, Tensor], float, dict[str, Tensor], Tensor | None]]:
        """Per chunk of this rank's shard: activations ``{module: [B, T, width]}``, the
        weight ``w``, the signals ``{module: [K, B, T, out]}`` (the block is ``w Σ_k``
        over them) and the task's attention mask ``[B, T]`` (or ``None``). Sampled
        targets: each example's draws after its first ``skip_draws``."""
        params = detached(task.parameters(model))
        ref = next(iter(params.values()))
        diagonal = DiagonalPart(model, task, blocks, params)
        start, stop = shard_range(self.n_examples)
        done = 0
        with evaluation_mode(model), torch.enable_grad():
            for batch in local_batches(data, self.chunk_size, "train"):
                x, y = prepare_batch(batch, ref)
                if done == 0:
                    check_batch(model, task, (x, y), "train")
                live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
                with capture(model, blocks) as cap:
                    output = task.output(bind(model, live), x)
                estimator = self.ggn_estimator.resolve(output[0].numel())
                weight, cots = output_cotangents(
                    task,
                    output,
                    y,
                    self.kind,
                    estimator,
                    self.seed,
                    start + done,
                    self.mc_samples,
                    skip_draws,
                )
                signals = {**cap.pullback(output, cots), **diagonal.pullback(x, cots)}
                acts = {**cap.activations(), **diagonal.activations(y.shape[0], output)}
                done += y.shape[0]
                report(progress, stage, done, stop - start)
                yield acts, weight, signals, task.attention_mask(x)

    def _factors(
        self,
        model: nn.Module,
        task: Task,
        blocks: tuple[Block, ...],
        data: DataLike,
        progress: ProgressFn | None,
    ) -> tuple[dict[str, tuple], dict[str, tuple]]:
        """Eigendecompositions of ``A`` and ``S`` per block (``(values, vectors)``; empty
        vectors mean the identity: a diagonal factor), summed over every rank's shard."""
        ref = next(iter(task.parameters(model).values()))

        def zeros(size: int, diagonal: bool) -> Tensor:
            shape = (size,) if diagonal else (size, size)
            return torch.zeros(shape, dtype=torch.float64, device=ref.device)

        sums = {
            b.module: (zeros(b.width, b.layer != "dense"), zeros(b.out_features, b.diagonal))
            for b in blocks
        }
        positions = {
            b.module: torch.zeros((), dtype=torch.float64, device=ref.device) for b in blocks
        }
        for acts, w, signals, mask in self._stream(
            model, task, blocks, data, "kfac factors", progress
        ):
            for b in blocks:
                a = acts[b.module]  # [B, T, width]
                if mask is not None and not b.diagonal and mask.shape == a.shape[:2]:
                    m = mask.to(a)  # padded positions are not counted
                    a = a * m.unsqueeze(2).sqrt()
                    positions[b.module] += m.sum()
                else:
                    positions[b.module] += a.shape[0] * a.shape[1]
                _add_moment(sums[b.module][0], a.flatten(0, 1), 1.0)
                _add_moment(sums[b.module][1], signals[b.module].flatten(0, 2), w)
        all_reduce_sum_([*(t for pair in sums.values() for t in pair), *positions.values()])
        eig_a = {k: _eigh(a / max(float(positions[k]), 1.0)) for k, (a, _) in sums.items()}
        eig_s = {k: _eigh(s / self.n_examples) for k, (_, s) in sums.items()}
        return eig_a, eig_s

    def _fit(
        self, model: nn.Module, task: Task, data: DataLike, progress: ProgressFn | None
    ) -> KroneckerState:
        params = task.parameters(model)
        blocks = find_blocks(model, params, task, data)
        ref = next(iter(params.values()))
        store = _DTYPES.get(self.factor_dtype, ref.dtype)
        eig_a, eig_s = self._factors(model, task, blocks, data, progress)
        corrected = (
            self._correct(model, task, blocks, data, eig_a, eig_s, progress)
            if self.corrected
            else {}
        )
        grids = {
            b.module: corrected.get(
                b.module,
                torch.outer(eig_s[b.module][0].clamp_min(0), eig_a[b.module][0].clamp_min(0)),
            )
            for b in blocks
        }
        damping = torch.tensor(
            [
                self.damping
                if self.damping is not None
                else rule(
                    float(grids[b.module].mean()), DampingScale.FACTORED, self.relative_damping
                )
                for b in blocks
            ],
            dtype=torch.float64,
        )
        low = min(
            float(g.min()) + task.weight_decay + float(d) for g, d in zip(grids.values(), damping)
        )
        if low <= 0:
            warnings.warn(
                f"curvature={self.name!r}: a damped eigenvalue is {low:.3g} <= 0, so the "
                "inverse is undefined; increase `damping`.",
                RuntimeWarning,
                stacklevel=3,
            )

        def cast(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.to(store).contiguous() for k, v in d.items()}

        return KroneckerState(
            blocks=tuple(b.to_list() for b in blocks),
            eigvals_a=cast({k: v[0].clamp_min(0) for k, v in eig_a.items()}),
            eigvecs_a=cast({k: v[1] for k, v in eig_a.items()}),
            eigvals_s=cast({k: v[0].clamp_min(0) for k, v in eig_s.items()}),
            eigvecs_s=cast({k: v[1] for k, v in eig_s.items()}),
            corrected=cast(corrected),
            damping=damping,
            weight_decay=task.weight_decay,
        )

    def _correct(self, model, task, blocks, data, eig_a, eig_s, progress) -> dict[str, Tensor]:
        """EK-FAC eigenvalues ``(1/N) Σ_n (Q_Sᵀ G_n Q_A)²`` from a second pass.

        Sampled targets are fresh draws (each example's next ``mc_samples``), independent of
        those the basis was fitted on: then ``E[Λ | Q] = diag(Qᵀ M Q)``, while reusing the
        draws biases ``Λ`` toward the basis's own noise (measured on a causal transformer LM,
        bench/lm.py: scores 18% too large against the exact GGN expectation, 9% with fresh draws).

        With one position per example (``T = 1``), ``(Q_Sᵀ s ãᵀ Q_A)² = (Q_Sᵀ s)² (Q_Aᵀ ã)²ᵀ``,
        so the sum is one ``[out, B] @ [B, width]`` product and no per-example ``G_n``
        is formed; otherwise ``G_n`` is formed one signal at a time. The diagonal block
        is not corrected: its K-FAC eigenvalues are already the diagonal of its block.
        """
        blocks = tuple(b for b in blocks if not b.diagonal)
        if not blocks:
            return {}
        sums = {
            b.module: torch.zeros(
                b.out_features, b.width, dtype=torch.float64, device=eig_a[b.module][0].device
            )
            for b in blocks
        }
        for acts, w, signals, _ in self._stream(
            model, task, blocks, data, "ekfac correction", progress, skip_draws=self.mc_samples
        ):
            for b in blocks:
                qa, qs = eig_a[b.module][1], eig_s[b.module][1]
                a, s = acts[b.module], signals[b.module]  # [B, T, width], [K, B, T, out]
                dtype = torch.promote_types(a.dtype, torch.float32)  # chunk sums; totals float64
                ra = _rotate(a.to(dtype), qa.to(dtype))  # [B, T, width]
                rs = _rotate(s.to(dtype), qs.to(dtype))  # [K, B, T, out]
                if a.shape[1] == 1:
                    chunk = rs[:, :, 0].square().sum(0).T @ ra[:, 0].square()
                    sums[b.module].add_(chunk.double(), alpha=w)
                    continue
                for sk in rs:
                    g = torch.einsum("bto,bti->boi", sk, ra)  # [B, out, width]
                    sums[b.module].add_(g.square().sum(0).double(), alpha=w)
        all_reduce_sum_(list(sums.values()))  # Σ over every rank's shard
        return {k: v / self.n_examples for k, v in sums.items()}

    # -- reading ---------------------------------------------------------------------
    def eigenbasis_blocks(
        self, mats: dict[str, Tensor | tuple[Tensor, Tensor]], power: int = -1
    ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """``(Q_S, C, Q_A)`` per block with ``(M_block + (wd + λ) I)^power V = Q_S C Q_Aᵀ`` for
        ``{module: V [K, out, width]}`` or its layer factors ``(s [K, T, out], ã [K, T, width])``
        with ``V = Σ_t s_t ã_tᵀ`` (then only the factors are rotated): ``C [K, out, width]`` in
        at least float32; an empty ``Q`` is the identity."""
        self._check_fitted()
        s, out = self.state, {}
        for b, damping in zip(s.block_list(), s.damping.tolist(), strict=True):
            v = mats[b.module]
            ref = v[0] if isinstance(v, tuple) else v
            dtype = torch.promote_types(ref.dtype, torch.float32)
            qa = s.eigvecs_a[b.module].to(ref.device, dtype)
            qs = s.eigvecs_s[b.module].to(ref.device, dtype)
            scale = (
                s.eigenvalues(b.module).to(ref.device, dtype) + s.weight_decay + damping
            ) ** power
            rotated = (
                torch.einsum(
                    "kto,kti->koi", _rotate(v[0].to(dtype), qs), _rotate(v[1].to(dtype), qa)
                )
                if isinstance(v, tuple)
                else _in_basis(v.to(dtype), qs, qa)
            )
            out[b.module] = (qs, rotated * scale, qa)
        return out

    def solve_blocks(self, mats: dict[str, Tensor], power: int = -1) -> dict[str, Tensor]:
        """``(M_block + (wd + λ) I)^power`` applied to ``{module: V [K, out, width]}``."""
        return {
            module: _in_basis(c, qs, qa, back=True).to(mats[module].dtype)
            for module, (qs, c, qa) in self.eigenbasis_blocks(mats, power).items()
        }

    def _flat(self, v: Tensor, power: int) -> Tensor:
        blocks = self.state.block_list()
        return from_blocks(
            self.solve_blocks(to_blocks(v, blocks, self.layout), power), blocks, self.layout
        )

    def _solve(self, v: Tensor) -> Tensor:
        return self._flat(v, -1)

    def _matvec(self, v: Tensor) -> Tensor:
        return self._flat(v, 1)


class KFAC(KroneckerCurvature):
    """K-FAC: ``S ⊗ A`` per block, eigenvalues ``λ_S λ_Aᵀ`` (see the module docs)."""

    name = "kfac"
    corrected = False

    @classmethod
    def memory(cls, size: ProblemSize) -> Memory | None:
        """stored 8·Σ(out² + width² + out + width + 1) per layer (eigenvectors, eigenvalues,
        damping); working 16·Σ(out² + width²) (the float64 factor sums and their eigenvectors
        while fitting)"""
        if not size.blocks:
            return None
        squares = sum(o * o + w * w for o, w in size.blocks)
        return Memory(
            8 * sum(o * o + w * w + o + w + 1 for o, w in size.blocks),
            16 * squares,
            "per-module scoring",
        )


class EKFAC(KroneckerCurvature):
    """EK-FAC: the K-FAC eigenbasis with eigenvalues refitted to per-example gradients."""

    name = "ekfac"
    corrected = True

    @classmethod
    def memory(cls, size: ProblemSize) -> Memory | None:
        """K-FAC + 8·Σ out·width (corrected eigenvalues)"""
        factors = KFAC.memory(size)
        if factors is None:
            return None
        return Memory(
            factors.stored + 8 * sum(o * w for o, w in size.blocks), factors.working, factors.note
        )
