"""Before a long run: how much memory each method needs for this model and data.

:func:`plan` reads the model (analysed parameters ``P``, its K-FAC blocks, outputs
per example ``C``) and the sizes of the data, and returns per method the bytes of

- the *stored* state (what ``store=`` writes and scoring keeps: dense matrix,
  factors, eigenvectors, projected training gradients), and
- the *working* set while it runs: one chunk of per-example gradients
  ``[chunk, P]``, the preconditioned queries ``[n_query, P]`` (``[query_batch, P]`` with
  ``query_batch``; or their projected
  ``[n_query, k]``), the method's vectors (CG's block of right-hand sides, a Krylov
  basis, a sketch) and the score matrix ``[n_query, n_train]`` (dropped with ``top_k``).

Each curvature's sizes come from its own memory model (``Curvature.memory``, over a
:class:`~headwater.curvature.base.ProblemSize`); every registered curvature gets a row.
The numbers are the sizes of those tensors (formulas in :data:`FORMULAS`), not a
measurement of the process: allocator slack, the model's activations and
framework overheads come on top. The stored sizes are exact for K-FAC, EK-FAC,
exact, diagonal and the projections (tested against what is written).
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from headwater.curvature import CURVATURES
from headwater.curvature._lowrank import DEFAULT_RANK, MAX_DEFAULT_RANK
from headwater.curvature.base import ProblemSize
from headwater.data import DataLike, iter_batches, num_examples
from headwater.gradients.functional import detached, evaluation_mode, prepare_batch
from headwater.gradients.layers import find_blocks
from headwater.gradients.per_example import per_example_gradients
from headwater.methods.factored import LOW_RANK_QUERY_CHUNK
from headwater.task import Task

__all__ = ["FORMULAS", "PREFERENCE", "Plan", "PlanRow", "default_lowrank_size", "formulas", "plan"]


def formulas() -> dict[str, str]:
    """The memory model of each row: a curvature's from its ``memory`` classmethod (the one
    its row is computed with; every registered curvature), the projections' from :func:`plan`."""
    return {
        **{name: inspect.getdoc(cls.memory) or "" for name, cls in CURVATURES.items()},
        "projection": "stored n_train·k·b (on disk with store=) + 8·k²; working: Π blocks <= 256 MiB",
        "kronecker projection": "stored n_train·k·b + 8·k², k = Σ min(k_out, out)·min(k_in, width); "
        "no [chunk, P] gradient",
    }


FORMULAS = formulas()
""":func:`formulas` of the curvatures registered at import."""


PREFERENCE = (
    "exact",
    "cg",
    "lanczos",
    "lissa",
    "kronecker projection",
    "nystrom",
    "ekfac",
    "kfac",
    "projection",
    "diagonal",
    "identity",
)
"""Most accurate first, as measured on the digits bench (bench/results.md; LOO Pearson on the
convex model / LDS on the MLP): exact 0.983 / (dense); CG 0.983 / 0.743 (passes over the data
per iteration); Lanczos residual 0.833 / 0.718; LiSSA 0.904 / 0.693; Kronecker projection
32x32 0.893 / 0.608; Nyström residual 0.805 / 0.603; EK-FAC 0.828 / 0.552 (above K-FAC on the
CNN, bench/ekfac_results.md); K-FAC 0.827 / 0.558; flat projection 0.705 / 0.455; diagonal;
identity. Time is not ranked: read ``seconds_per_pass`` and each row's passes."""


@dataclass(frozen=True)
class PlanRow:
    """One method: bytes stored, bytes of the working set, and whether both fit."""

    method: str
    stored: int
    working: int
    fits: bool
    note: str = ""

    @property
    def total(self) -> int:
        return self.stored + self.working


@dataclass(frozen=True)
class Plan:
    """Sizes of the problem and one :class:`PlanRow` per method."""

    num_params: int
    n_train: int
    n_query: int
    outputs: int
    dtype: torch.dtype
    factored: bool  # every analysed parameter is in a K-FAC block (Linear/Conv)
    seconds_per_pass: float  # measured: per-example gradients over the whole training set
    budget: int
    rows: list[PlanRow] = field(default_factory=list)
    resident: int = 0  # bytes resident in this process when planning (model, data, torch)

    def row(self, method: str) -> PlanRow:
        return next(r for r in self.rows if r.method == method)

    def recommended(self) -> PlanRow | None:
        """The first method of :data:`PREFERENCE` that fits the budget (``None`` if none does)."""
        for name in PREFERENCE:
            for r in self.rows:
                if r.method.startswith(name) and r.fits:
                    return r
        return None


def default_lowrank_size(num_params: int) -> tuple[int, int]:
    """``(rank, steps)`` of Arnoldi/Lanczos/Nyström at their defaults (no ``rank`` or
    ``n_iter`` given), at their largest: the rank starts at ``DEFAULT_RANK`` (100) and doubles
    up to ``MAX_DEFAULT_RANK`` (200) while the smallest kept eigenvalue is above the damping,
    at most ``P``; the Krylov methods take ``min(P, 2·rank)`` steps
    (``headwater.curvature._lowrank``)."""
    rank = min(DEFAULT_RANK, num_params)
    while 2 * rank <= min(num_params, MAX_DEFAULT_RANK):
        rank *= 2
    return rank, min(num_params, 2 * rank)


def _resident() -> int:
    """Bytes resident in this process now (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def _block_working(
    blocks: tuple[tuple[int, int], ...], nq: int, chunk: int, b: int, query_rank: int | None
) -> tuple[int, int]:
    """Per-block scoring (K-FAC, EK-FAC): bytes of the preconditioned queries kept, and of the
    larger of the query phase (a chunk of dense query blocks and the largest block's three
    intermediates in at least float32; with ``query_rank`` the largest block's ``C`` and its
    scaled copy, and one Gram matrix) and the training phase (a chunk of block gradients,
    or with ``query_rank`` their layer factors and the ``[chunk, n_query·r]`` products)."""
    wide = max(4, b)
    if query_rank is None:
        kept = sum(o * w for o, w in blocks)
        qchunk, train = min(chunk, nq), 2 * chunk * kept * b
    else:
        low = [(o, w) for o, w in blocks if query_rank * (o + w) < o * w]
        kept = sum(o * w for o, w in blocks if (o, w) not in low)
        kept += sum(query_rank * (o + w) for o, w in low)
        qchunk = min(chunk, LOW_RANK_QUERY_CHUNK, nq)
        train = chunk * sum(o + w + 2 * nq * query_rank for o, w in low) * wide
        train += chunk * sum(o * w for o, w in blocks if (o, w) not in low) * b
    largest = max(o * w for o, w in blocks)
    if query_rank is None:
        queries = qchunk * (sum(o * w for o, w in blocks) * b + 3 * largest * wide)
    else:  # rotated from the layer factors: C and its scaled copy, one Gram matrix
        queries = 2 * qchunk * largest * wide + 8 * max(min(o, w) ** 2 for o, w in blocks)
    return nq * kept * b, max(queries, train)


def _gradient_seconds(
    model: nn.Module, task: Task, train: DataLike, chunk_size: int, n: int
) -> float:
    """Time of one chunk of per-example gradients (second call), scaled to ``n`` examples."""
    batch = next(iter_batches(train, chunk_size, "train"))
    for _ in range(2):
        start = time.perf_counter()
        list(per_example_gradients(model, task, batch, chunk_size=chunk_size, name="train"))
        seconds = time.perf_counter() - start
    return seconds * n / batch[0].shape[0]


def plan(
    model: nn.Module,
    task: Task,
    train: DataLike,
    query: DataLike,
    *,
    budget_bytes: int = 8 * 2**30,
    chunk_size: int = 64,
    query_chunk: int = 256,
    query_batch: int | None = None,
    top_k: bool = False,
    rank: int | None = None,
    n_iter: int | None = None,
    projection_dim: int = 1024,
    kronecker_dims: tuple[int, int] = (32, 32),
    measure: bool = True,
    query_rank: int | None = None,
) -> Plan:
    """Memory of every method for ``model`` on ``train``/``query`` (module docstring).

    Args:
        budget_bytes: memory available; a row ``fits`` when stored + working <= it.
        chunk_size, query_chunk, query_batch: as for :func:`headwater.influence`.
        top_k: scores streamed to a top-k (no ``[n_query, n_train]`` matrix).
        rank, n_iter: of Lanczos/Arnoldi/Nyström; ``None``: their defaults at their largest
            (:func:`default_lowrank_size`: rank 200 and 400 steps from 400 parameters up).
        projection_dim, kronecker_dims: of the projected rows.
        measure: time one chunk of per-example gradients (else ``seconds_per_pass`` is NaN).
        query_rank: K-FAC/EK-FAC's low-rank queries (their curvature option), or ``None``.

    Raises:
        ValueError: naming the argument for bad sizes or data.
    """
    if query_batch is not None and (
        isinstance(query_batch, bool) or not isinstance(query_batch, int) or query_batch <= 0
    ):
        raise ValueError(f"query_batch: must be a positive integer or None, got {query_batch!r}")
    for arg, value in (
        ("budget_bytes", budget_bytes),
        ("chunk_size", chunk_size),
        ("query_chunk", query_chunk),
        ("rank", 1 if rank is None else rank),
        ("n_iter", 1 if n_iter is None else n_iter),
        ("projection_dim", projection_dim),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{arg}: must be a positive integer, got {value!r}")
    params = detached(task.parameters(model))
    ref = next(iter(params.values()))
    p, b = sum(t.numel() for t in params.values()), ref.element_size()
    if rank is None:
        rank, steps = default_lowrank_size(p)
        n_iter = steps if n_iter is None else n_iter
    elif n_iter is None:
        n_iter = min(p, 2 * rank)  # the Krylov methods' default for a given rank
    n, nq = num_examples(train, "train"), num_examples(query, "query")
    with torch.no_grad(), evaluation_mode(model):
        x, _ = prepare_batch(next(iter_batches(query, 1, "query")), ref)
        outputs = task.output(model, x)[0].numel()
    blocks = find_blocks(model, params, task, train)
    scores = 0 if top_k else nq * n * b
    chunk = min(chunk_size, n) * p * b
    queries = min(nq, query_batch or nq) * p * b  # preconditioned query gradients held at once
    size = ProblemSize(
        p,
        n,
        min(nq, query_chunk),
        b,
        outputs,
        tuple((bl.out_features, bl.width) for bl in blocks),
        rank=rank,
        n_iter=n_iter,
    )
    rows = []
    for name, cls in CURVATURES.items():
        memory = cls.memory(size)
        if memory is None:
            continue
        if cls.block_features:  # scored block by block: no [chunk, P] / [n_query, P] flat rows
            kept, phase = _block_working(size.blocks, nq, chunk_size, b, query_rank)
            rows.append((name, memory.stored, memory.working + kept + phase + scores, memory.note))
        else:
            rows.append(
                (name, memory.stored, memory.working + queries + chunk + scores, memory.note)
            )
    if blocks:
        k_out, k_in = kronecker_dims
        kdim = sum(min(k_out, bl.out_features) * min(k_in, bl.width) for bl in blocks)
        rows.append(
            (
                f"kronecker projection {k_out}x{k_in}",
                n * kdim * b + 8 * kdim**2,
                8 * kdim**2 + nq * kdim * b + scores,
                f"k = {kdim}; the training rows can live on disk",
            )
        )
    k = min(projection_dim, p)
    rows.append(
        (
            f"projection {k}",
            n * k * b + 8 * k * k,
            min(256 * 2**20, p * k * b) + 8 * k * k + chunk + nq * k * b + scores,
            "the training rows can live on disk",
        )
    )
    seconds = _gradient_seconds(model, task, train, chunk_size, n) if measure else float("nan")
    return Plan(
        p,
        n,
        nq,
        outputs,
        ref.dtype,
        bool(blocks),
        seconds,
        budget_bytes,
        [PlanRow(m, s, w, s + w <= budget_bytes, note) for m, s, w, note in rows],
        _resident(),
    )
