"""Exact metagradients of a recorded training run (REPLAY, Ilyas & Engstrom 2025, "MAGIC").

A run recorded by :class:`~headwater.train.recorder.Recorder` is a map
``s_{t+1} = F_t(s_t, g_t)`` of the state ``s_t = (θ_t, optimizer state)`` with the batch
gradient ``g_t = Σ_{j∈B_t} w_j ∇ℓ_j(θ_t) / Σ_{j∈B_t} w_j`` (or ``/ B`` with
``normalization="n"``, :func:`~headwater.train.steps.batch_objective`), ``F_t`` from
:mod:`headwater.train.steps`: SGD (momentum, Nesterov, weight decay), Adam, AdamW, lr
schedules, clipping. For every query ``q`` this module computes the exact derivative
``d m(z_q; θ_T) / d w_i`` by reverse-mode replay. Going backwards from ``a_θ = ∇m(θ_T)``,
``a_state = 0``, step ``t`` does

    (a_θ, a_state, a_g) ← the VJP of F_t at (θ_t, state_t, g_t) applied to (a_θ, a_state)
    d m/d w_i += a_g · (∇ℓ_i(θ_t) − g_t) / W_t for i ∈ B_t (W_t = Σ_{j∈B_t} w_j;
                                                 a_g · ∇ℓ_i / B with "n")
    a_θ ← a_θ + H_t a_g                         (H_t: Hessian of the weighted batch loss)

All queries are carried at once (``a_θ, a_g: [Q, P]``). The update ``F_t`` is
elementwise after clipping, so its VJP, written out per optimizer in
:mod:`headwater.train.steps`, is a few elementwise passes over the adjoints, in place
(clipping's rank-one term by hand). ``H_t a_g`` and ``J_t a_g`` (``J_t [B, P]``: per-example
loss gradients, never formed) come from one pass: the pullback of the batch gradient
``g(θ, w)`` with respect to ``θ`` and the example weights ``w``, built once per step and
vmapped over a chunk of queries (reverse over reverse: 27% faster than forward over
reverse on the digits MLP); ``J_t a_g / B`` is ``[Q, B]``, the weight derivatives of the
batch. For an ``nn.Sequential`` of common layers the same pass is written out layer by
layer (:mod:`~headwater.methods.metagradient_layers`: Pearlmutter's R-operator, every
operation batched over the chunk; 1.4x faster per query on the digits MLP, 2.1-2.8x on the
CNN). A step runs chunk by chunk of queries (:mod:`.metagradient_chunks`), in place. Memory is
``O(checkpoints·P + segment·P + Q·P)``: the states between two recorded checkpoints are
recomputed forward from the earlier one, segment by segment from the last (REPLAY's
scheme with the recorder's ``checkpoint_every``; about √T is the usual choice).

Score: removing example ``i`` (weight 1 → 0) changes the measurement by about
``−dm/dw_i``; ``score = −n · dm/dw_i`` so that, as everywhere in headwater, removal
changes ``m(z_q)`` by about ``+score[q, i]/n`` (positive = proponent with the loss as
measurement). With ``hessian_free=True`` the ``H_t`` term is dropped (HYDRA's fast
variant, Chen et al. 2021): cheaper, approximate.

BatchNorm layers trained in train mode normalize by the weighted batch's statistics, so
the weights reach ``g_t`` through them too (the pullback above is taken with them); their
running averages ``r_{t+1} = (1 − f) r_t + f · stats_t`` are state the measurement reads
(eval mode at θ_T), so their adjoint ``a_r`` (from ``∂m/∂r_T``) adds ``f · a_r`` to the
statistics' adjoint at each step and decays by ``1 − f``. Not with ``hessian_free``.

Dropout in train mode: every forward pass of step ``t`` starts from the run's random state
there, so the masks are the run's and fixed (a weight changes no mask); with every module
in its recorded mode, the derivative is exact for the run as recorded. It predicts
retraining well when the training recipe is smooth (small steps, warm-up), see the README.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten

from headwater import store
from headwater.data import DataLike, Inputs, as_tensors, one_example, take
from headwater.gradients.functional import (
    OutputBytes,
    bind,
    evaluation_mode,
    prepare_batch,
    vmap_examples,
)
from headwater.gradients.per_example import check_values
from headwater.methods import metagradient_chunks as chunks
from headwater.methods.estimator import Estimator
from headwater.methods.metagradient_layers import Stack, Unsupported, covers, stack
from headwater.methods.metagradient_options import check_options
from headwater.progress import ProgressFn, report
from headwater.store.cached import fingerprint
from headwater.task import Task
from headwater.train.norms import (
    STATS,
    cancelled,
    factors,
    running_dict,
    running_norms,
    running_vector,
    stats_vector,
    weighted_norms,
)
from headwater.train.recorder import (
    Checkpoint,
    RunRecord,
    check_reached,
    check_replayable,
    check_run,
    check_run_weights,
)
from headwater.train.run import rng_state
from headwater.train.steps import (
    adam_coefficients,
    adam_pullback,
    batch_objective,
    clip,
    clip_pullback,
    optimizer_step,
    sgd_pullback,
)

__all__ = ["Metagradient"]


class Metagradient(Estimator):
    """Exact metagradient scores ``[n_query, n_train]`` of a recorded run (module docstring).

    Args:
        model: the architecture (read for its structure; the run supplies θ_t).
        task: the loss the run minimised (``task.train_loss(...).mean()`` per batch) and
            the query measurement.
        run: a :class:`~headwater.train.recorder.RunRecord` of training on ``train``.
        hessian_free: drop the ``H_t`` terms (HYDRA's approximation).
        normalization: the counterfactual the weights define, as in
            :func:`~headwater.train.recorder.replay`: ``"mean"`` (a batch's loss is the
            weighted mean of its examples': dropping an example leaves the mean of the
            others) or ``"n"`` (``/ B``: dropping examples also shrinks the steps).
        query_block: carry at most this many queries at once (memory ``block × P`` per
            adjoint; each block replays the run once; the numbers do not depend on it).
        dtype: compute in this dtype (default: the run's); float64 for checks. A floating
            ``torch.dtype`` or its name (``"float64"``).
        store: base path of the reverse pass's resumable state: the adjoints and partial
            sums of each query block, saved atomically after every segment; a later call
            with the same settings, run, queries and data resumes from there (a store of
            anything else raises ``headwater.store.StoreMismatchError``).
        progress: optional ``progress(stage, done, total)`` callback.
    """

    method = "metagradient"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        run: RunRecord,
        *,
        hessian_free: bool = False,
        normalization: str = "mean",
        query_block: int | None = None,
        dtype: torch.dtype | None = None,
        store: str | os.PathLike | None = None,
        progress: ProgressFn | None = None,
    ):
        check_run(run, task, model, run.n_train if isinstance(run, RunRecord) else -1)
        options = check_options(
            {
                "hessian_free": hessian_free,
                "normalization": normalization,
                "query_block": query_block,
                "dtype": dtype,
            }
        )
        self.model, self.task, self.run, self.progress = model, task, run, progress
        self.hessian_free, self.query_block = options["hessian_free"], options["query_block"]
        if self.hessian_free and (run.norms or run.rng):
            raise ValueError(
                "hessian_free: not available for a run with BatchNorm layers or dropout in "
                "train mode; use the exact metagradient"
            )
        self.normalization = options["normalization"]
        dtype = options["dtype"]
        self.dtype = run.checkpoints[0].theta.dtype if dtype is None else dtype
        self.store = store
        self._work: Tensor | None = None  # Adam's a_g buffer [chunk, P] during a pass
        self._rows = chunks.CHUNK  # queries per chunk during a pass (_chunk_rows)
        self._cancelled: list[slice] = []  # during a pass (cancelled)
        plain = not (run.norms or run.rng)  # the products written out by layer, if they apply
        self._layers = stack(model, run.layout.names, task) if plain else None

    # ---------------------------------------------------------------- model as a function of θ
    def _losses_fn(self, x: Inputs, y: Tensor, step: int):
        """``(params, w) -> (ℓ_B [B], s)``: the per-example training losses of the batch of
        ``step`` at ``{name: tensor}`` (inputs of any form the task takes: a tensor, a tuple
        or a dict batch) and the flat batch statistics ``s`` of the BatchNorm layers the run
        trained in train mode, which normalise with the statistics weighted by ``w``
        (:mod:`headwater.train.norms`; ``s`` is empty without such layers). The modules run
        in the run's modes, from its random state at ``step`` if it drew random numbers
        there: the run's dropout masks."""
        run = self.run
        norms, modes, state = run.norms, run.modes_at(step), rng_state(run, step)

        def losses(params: dict[str, Tensor], w: Tensor) -> tuple[Tensor, Tensor]:
            with weighted_norms(self.model, norms, w) as stats, evaluation_mode(self.model, modes):
                if state is not None:
                    torch.set_rng_state(state)
                out = self.task.train_loss(bind(self.model, params), (x, y))
            return out, stats_vector(stats, norms) if norms else out.new_zeros(0)

        return losses

    def _objective(self, x: Inputs, y: Tensor, step: int):
        """``(params, w) -> (batch objective, s)`` (:func:`~headwater.train.steps.batch_objective`)."""
        losses, norm = self._losses_fn(x, y, step), self.normalization

        def objective(params: dict[str, Tensor], w: Tensor) -> tuple[Tensor, Tensor]:
            values, stats = losses(params, w)
            return batch_objective(w, values, norm), stats

        return objective

    def _batch_gradient(self, theta: Tensor, x: Inputs, y: Tensor, w: Tensor, step: int):
        """``(g, s)``: ``g = ∇`` of the weighted batch loss of ``step`` at ``theta``, ``[P]``,
        and the batch statistics of the trained BatchNorm layers."""
        objective, layout = self._objective(x, y, step), self.run.layout
        g, stats = grad(objective, has_aux=True)(layout.unflatten(theta), w)
        return layout.flatten(g), stats

    def _products(
        self, theta: Tensor, x: Inputs, y: Tensor, w: Tensor, g: Tensor | None, step: int
    ):
        """``(products, g_t)``: ``products: (V [c, P], U [c, R] or None) -> (H_t V + ∂(s·U)/∂θ
        as {name: [c, *shape]} or None, ∂(g·V + s·U)/∂w [c, B])`` for a chunk, and the flat
        batch gradient (``g`` as given, or the pullback's primal output: the forward pass need
        not keep it). ``s`` are the batch statistics of the BatchNorm layers trained in train
        mode (``U``: their running statistics' adjoints times each one's momentum).

        Reverse over reverse: the batch gradient ``g(θ, w)`` (``g_t`` above) is built once
        per step, and its pullback applied to every row ``v`` of ``V`` (vmapped) gives
        ``∂(g·v)/∂θ = H_t v`` and ``∂(g·v)/∂w_j`` (``(∇ℓ_j − g)·v / Σw``, or ``∇ℓ_j·v / B``,
        without such layers) in the same pass. The model is called on ``{name: view}`` of
        the flat vectors: with a flat ``θ`` every slice's derivative would be a dense
        ``[c, P]`` tensor. With ``hessian_free`` only the weight derivatives (``J_t V`` in
        forward mode, or the layer pass's R-forward pass)."""
        layout, norm = self.run.layout, self.normalization
        params = layout.unflatten(theta)
        if self._layers is not None and isinstance(x, Tensor):
            try:
                shared = Stack(self._layers, params, x, y, w, self.task, norm)
                hessian = not self.hessian_free  # without: the R-forward pass alone
                return lambda vectors, _=None: shared.products(
                    layout.unflatten(vectors), hessian
                ), layout.flatten(shared.grads)
            except Unsupported:
                self._layers = None  # the generic path from now on
        if self.hessian_free:
            losses = self._losses_fn(x, y, step)

            def values(p: dict[str, Tensor]) -> Tensor:
                return losses(p, w)[0]

            mass = w.sum()
            if norm == "n" or mass <= 0:
                forward = vmap(lambda v: jvp(values, (params,), (v,))[1] / y.shape[0])
                return lambda vectors, _=None: (None, forward(layout.unflatten(vectors))), g
            forward = vmap(lambda v: jvp(values, (params,), (v,))[1])
            return lambda vectors, _=None: (
                None,
                (forward(layout.unflatten(vectors)) - (vectors @ g)[:, None]) / mass,
            ), g

        objective = self._objective(x, y, step)

        def gradient(p: dict[str, Tensor], weights: Tensor):
            return grad(objective, has_aux=True)(p, weights)

        (primal, stats), pullback = vjp(gradient, params, w)
        batched = vmap(pullback)

        def products(vectors: Tensor, stats_adjoint: Tensor | None = None):
            if stats_adjoint is None:
                stats_adjoint = vectors.new_zeros(vectors.shape[0], stats.shape[0])
            return batched((layout.unflatten(vectors), stats_adjoint))

        return products, layout.flatten(primal)

    def _measurement_gradients(
        self, end: Checkpoint, x: Inputs, y: Tensor, into: Tensor, into_running: Tensor
    ) -> None:
        """Per-query gradients of the measurement of the trained model ``end`` (its flat θ
        and the running statistics of the trained BatchNorm layers, read in eval mode)
        written into ``into [Q, P]`` and ``into_running [Q, R]``, chunk by chunk of queries
        (taken with respect to ``{name: view}``: a flat ``θ`` would make each slice's
        derivative ``[c, P]``)."""
        layout, norms = self.run.layout, self.run.norms

        def single(params: dict[str, Tensor], xi: Inputs, yi: Tensor) -> Tensor:
            fn = bind(self.model, params)
            with running_norms(self.model, norms):
                return self.task.measurement(fn, (one_example(xi), yi.unsqueeze(0))).sum()

        per_query = vmap_examples(grad(single), in_dims=(None, 0, 0))
        running = {
            k: v.to(self.dtype) for k, v in end.buffers.items() if k.rsplit(".", 1)[1] in STATS
        }
        params = {**layout.unflatten(end.theta.to(self.dtype)), **running}
        for s in range(0, y.shape[0], chunks.CHUNK):
            rows = slice(s, s + chunks.CHUNK)
            grads = per_query(params, take(x, rows), y[rows])
            for name, view in layout.unflatten(into[s : s + chunks.CHUNK]).items():
                view.copy_(grads[name])
            if norms:
                into_running[rows] = torch.cat(
                    [grads[f"{n}.{stat}"].flatten(1) for n in norms for stat in STATS], dim=1
                )

    # ---------------------------------------------------------------- replay
    def _cast(self, ckpt: Checkpoint) -> tuple[Tensor, tuple[Tensor, ...]]:
        return ckpt.theta.to(self.dtype), tuple(v.to(self.dtype) for v in ckpt.state.values())

    def _step(self, t: int, theta: Tensor, state: tuple[Tensor, ...], g: Tensor, count: int):
        run = self.run
        return optimizer_step(
            run.optimizer, run.hyper_at(t), theta, state, g, run.lrs[t], count, run.max_norms[t]
        )

    def _segment(self, ckpt: Checkpoint, end: int, data, keep: bool):
        """Run steps ``[ckpt.step, end)`` forward from ``ckpt`` at the weights ``data[2]``:
        ``(kept, θ_end, state_end, r_end)`` with ``kept`` the ``(θ_t, state_t, g_t)`` the
        reverse step reads when ``keep`` (SGD's pullback needs no state, and ``g_t`` is
        recomputed with the Hessian's pullback unless ``hessian_free``) and ``r`` the flat
        running statistics of the trained BatchNorm layers."""
        x_all, y_all, w_all = data
        theta, state = self._cast(ckpt)
        norms = self.run.norms
        running = running_vector(ckpt.buffers, norms).to(self.dtype)
        kept = []
        for t in range(ckpt.step, end):
            idx = self.run.batches[t]
            g, stats = self._batch_gradient(theta, take(x_all, idx), y_all[idx], w_all[idx], t)
            if keep:
                kept.append(
                    (
                        theta,
                        () if self.run.optimizer == "sgd" else state,
                        g if self.hessian_free else None,
                    )
                )
            if norms:
                f = factors(self.model, norms, ckpt.buffers, t - ckpt.step).to(self.dtype)
                running = (1 - f) * running + f * stats
            theta, state = self._step(t, theta, state, g, ckpt.count + t - ckpt.step + 1)
        return kept, theta, state, running

    def _forward(
        self, ckpt: Checkpoint, end: Checkpoint, data, recorded: bool
    ) -> list[tuple[Tensor, tuple[Tensor, ...], Tensor | None]]:
        """``(θ_t, state_t, g_t)`` for ``t`` in ``[ckpt.step, end.step)``, recomputed forward
        (:meth:`_segment`). At the ``recorded`` weights (all 1) the segment must end at
        ``end``'s parameters (:func:`~headwater.train.recorder.check_reached`: else the
        derivative would be that of another run)."""
        states, theta, _, _ = self._segment(ckpt, end.step, data, keep=True)
        if recorded:
            check_reached(ckpt, end, theta, self._cancelled)
        return states

    def _checkpoints(self, data, recorded: bool) -> tuple[Checkpoint, ...]:
        """The run's checkpoints at the weights ``data[2]``: the recorded ones at the recorded
        weights, else the states the run passes through at those weights, at the same steps
        (one forward pass from step 0: the reverse pass recomputes each segment from its
        start, which must be on the weighted run)."""
        ckpts = self.run.checkpoints
        if recorded:
            return ckpts
        out, norms = [ckpts[0]], self.run.norms
        for end in ckpts[1:]:
            _, theta, state, running = self._segment(out[-1], end.step, data, keep=False)
            state = dict(zip(end.state, state, strict=True))
            buffers = running_dict(running, norms, end.buffers)
            out.append(Checkpoint(end.step, theta, state, end.count, buffers))
        return tuple(out)

    def cancelled(self, train: DataLike) -> list[slice]:
        """The entries of θ in parameters the BatchNorm layers trained in train mode cancel
        (a bias right before one; :func:`~headwater.train.norms.cancelled`, at the first and
        at the last checkpoint): ``g_t`` there is rounding noise, 0 in exact arithmetic and
        independent of ``θ`` and ``w``, so the reverse pass sets their ``a_g`` to 0 (the
        noise times Adam's ``1/(√v + ε)`` would otherwise enter ``H_t a_g``), and the check
        that a replayed segment reaches its checkpoint skips them (Adam scales the noise to
        steps of the learning rate's size, following the rounding of whichever arithmetic
        ran)."""
        run = self.run
        if not run.norms:
            return []
        x_all, y_all = prepare_batch(as_tensors(train, "train"), torch.empty(0, dtype=self.dtype))
        names = set(run.layout.names)
        with torch.random.fork_rng(devices=[]):
            for ckpt in (run.checkpoints[0], run.checkpoints[-1]):
                t = min(ckpt.step, run.num_steps - 1)
                losses = self._losses_fn(take(x_all, run.batches[t]), y_all[run.batches[t]], t)
                ones = torch.ones(len(run.batches[t]), dtype=self.dtype)
                names &= cancelled(
                    lambda p, losses=losses, ones=ones: losses(p, ones)[0],
                    run.layout.unflatten(ckpt.theta.to(self.dtype)),
                )
        return [part for name, part in run.layout.slices().items() if name in names]

    def _coefficients(self, t: int, count: int, theta: Tensor, state, g: Tensor):
        """What the update's pullback at step ``t`` shares across query chunks (Adam's
        ``[P]`` factors, :func:`~headwater.train.steps.adam_coefficients`), or None."""
        run = self.run
        if run.optimizer == "sgd":
            return None
        clipped = clip(g, run.max_norms[t])
        return adam_coefficients(
            run.optimizer, run.hyper_at(t), theta, state, clipped, run.lrs[t], count
        )

    def _pullback(
        self, t: int, g: Tensor, coefficients, a_theta: Tensor, a_state: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
        """The adjoints of ``(θ_t, state_t, g_t)`` from those of ``(θ_{t+1}, state_{t+1})``
        (each ``[c, P]``, updated in place where possible): the update's pullback written
        out (:func:`~headwater.train.steps.sgd_pullback`,
        :func:`~headwater.train.steps.adam_pullback`: a few elementwise passes for a chunk
        of queries at once), then clipping's (:func:`~headwater.train.steps.clip_pullback`).
        Heavy-ball SGD's momentum adjoint is left unscaled (``sgd_pullback(defer=True)``):
        the caller multiplies it by ``μ`` after the products."""
        run = self.run
        if run.optimizer == "sgd":
            a_theta, a_state, a_g = sgd_pullback(
                run.hyper_at(t), run.lrs[t], a_theta, a_state, defer=True
            )
        else:
            a_theta, a_state, a_g = adam_pullback(
                run.optimizer,
                run.hyper_at(t),
                run.lrs[t],
                coefficients,
                a_theta,
                a_state,
                out=self._work[: a_theta.shape[0]] if self._work is not None else None,
            )
        return a_theta, a_state, clip_pullback(g, run.max_norms[t], a_g)

    def _backward_step(
        self,
        t: int,
        count: int,
        forward,
        carry: Tensor,
        running: tuple[Tensor, Tensor] | None,
        data,
        out: Tensor,
    ) -> None:
        """One reverse step: ``carry [1 + n_state, Q, P]`` goes from the adjoints of
        ``(θ_{t+1}, state_{t+1})`` to those of ``(θ_t, state_t)``, in place, chunk by chunk
        of queries (rows are independent: only a chunk's temporaries are ever alive);
        ``dm/dw`` of the batch is added into ``out``. ``running``: the adjoints ``[Q, R]``
        of the trained BatchNorm layers' running statistics and their step factors ``f [R]``
        (``r_{t+1} = (1 − f) r_t + f s_t``), or None."""
        x_all, y_all, w_all = data
        theta, state, g = forward
        idx = self.run.batches[t]
        products, g = self._products(theta, take(x_all, idx), y_all[idx], w_all[idx], g, t)
        coefficients = self._coefficients(t, count, theta, state, g)
        hyper = self.run.hyper_at(t)
        deferred = self.run.optimizer == "sgd" and hyper["momentum"] and not hyper["nesterov"]
        for s in range(0, carry.shape[1], chunk := self._rows):
            rows = carry[:, s : s + chunk]  # views
            a_theta, a_state, a_g = self._pullback(t, g, coefficients, rows[0], tuple(rows[1:]))
            for part in self._cancelled:  # g_t does not depend on θ or w there
                a_g[:, part] = 0
            through_stats = None
            if running is not None:
                a_running, f = running[0][s : s + chunk], running[1]
                through_stats = a_running * f
                a_running.mul_(1 - f)
            hv, jw = products(a_g, through_stats)  # {name: [c, *shape]}, [c, B]
            del a_g
            out[s : s + chunk, idx] += jw
            if hv is not None:
                for name, view in self.run.layout.unflatten(a_theta).items():
                    view.add_(hv[name])
            del hv
            if deferred:
                a_state[0].mul_(hyper["momentum"])
            for row, new in zip(rows, (a_theta, *a_state), strict=True):
                if new.data_ptr() != row.data_ptr():
                    row.copy_(new)

    def _block(self, x_q: Inputs, y_q: Tensor, data, done: int, total: int, path) -> Tensor:
        """The hypergradients of one block of queries; with ``path``, the adjoints and the
        partial sums are saved (atomically) after every segment and a stored state of the
        same settings, queries and data is resumed from (bit for bit the same result)."""
        run = self.run
        recorded = bool((data[2] == 1).all())
        ckpts = self._checkpoints(data, recorded)
        last = ckpts[-1]
        key = {"kind": "metagradient_adjoint", "settings": self.settings()}
        leaves = tree_flatten((x_q, y_q, data))[0]
        key["data"] = fingerprint(*leaves, run.checkpoints[0].theta, last.theta)
        resumed = self._resume(path, key)
        if resumed is None:
            theta_T = last.theta.to(self.dtype)
            # the adjoints of (θ_t, state_t) and of the running statistics r_t, from
            # (∇_θ m(θ_T, r_T), 0) and ∇_r m(θ_T, r_T)
            n_query = y_q.shape[0]
            carry = theta_T.new_zeros(1 + len(last.state), n_query, theta_T.shape[0])
            running = theta_T.new_zeros(n_query, running_vector(last.buffers, run.norms).numel())
            self._measurement_gradients(last, x_q, y_q, carry[0], running)
            check_values(carry[0].sum(1) + running.sum(1), n_query, "query")
            out, reached = torch.zeros(n_query, run.n_train, dtype=self.dtype), last.step
        else:
            carry, running, out, reached = resumed
            done += run.num_steps - reached
        self._rows = self._chunk_rows(carry, data)
        if run.optimizer != "sgd":
            self._work = carry.new_empty(self._rows, carry.shape[2])
        for start, end in zip(reversed(ckpts[:-1]), reversed(ckpts[1:]), strict=True):
            if end.step > reached:
                continue  # done before the interruption
            states = self._forward(start, end, data, recorded)
            for t in reversed(range(start.step, end.step)):
                count = start.count + t - start.step + 1
                adjoint = None
                if run.norms:
                    f = factors(self.model, run.norms, start.buffers, t - start.step)
                    adjoint = (running, f.to(self.dtype))
                self._backward_step(t, count, states.pop(), carry, adjoint, data, out)
                done += 1
                report(self.progress, "metagradient steps", done, total)
            if path is not None:
                tensors = {"carry": carry, "running": running, "out": out}
                store.save(path, tensors, {**key, "step": start.step})
        self._work = None
        return out

    def _chunk_rows(self, carry: Tensor, data) -> int:
        """Queries per chunk (:func:`.metagradient_chunks.rows`, ``A`` of the first batch)."""
        x_all, y_all, w_all = data
        idx, theta = self.run.batches[0], self.run.checkpoints[-1].theta.to(self.dtype)
        x, y, w = take(x_all, idx), y_all[idx], w_all[idx]
        params, counter = self.run.layout.unflatten(theta), OutputBytes()
        with torch.no_grad(), counter:
            self._losses_fn(x, y, 0)(params, w)
        forward = counter.total / theta.element_size()
        layers, task = self._layers, self.task
        if layers and not (isinstance(x, Tensor) and covers(layers, params, x, y, w, task)):
            self._layers = None
        layers_with = carry.shape[0] if self._layers is not None else None
        return chunks.rows(carry.shape[1], forward, theta.shape[0], layers_with)

    @staticmethod
    def _resume(path, key: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, int] | None:
        """``(carry, running, out, step)`` stored at ``path`` for ``key``, or None."""
        if path is None or not store.exists(path):
            return None
        tensors, meta = store.load(path, expect=key)
        return tensors["carry"], tensors["running"], tensors["out"], int(meta["step"])

    def hypergradients(
        self, query: DataLike, train: DataLike, *, weights: Tensor | None = None
    ) -> Tensor:
        """``d m(z_q; θ_T) / d w_i`` at the run's weights (``weights``, default all 1),
        ``[n_query, n_train]``. A ValueError if the recorded loop was not deterministic
        (a replayed segment misses its recorded checkpoint)."""
        x_all, y_all = as_tensors(train, "train")
        check_run(self.run, self.task, self.model, y_all.shape[0])
        like = torch.empty(0, dtype=self.dtype)
        x_all, y_all = prepare_batch((x_all, y_all), like)
        x_q, y_q = prepare_batch(as_tensors(query, "query"), like)
        check_run_weights(weights, self.run.n_train)
        w_all = torch.ones(self.run.n_train) if weights is None else weights
        w_all = w_all.to(self.dtype)
        if weights is not None and not bool((w_all == 1).all()):
            check_replayable(self.model, self.task, train, self.run)
        self._cancelled = self.cancelled((x_all, y_all))
        block = self.query_block or max(1, y_q.shape[0])
        starts = range(0, y_q.shape[0], block)
        total = len(starts) * self.run.num_steps
        # the math attention kernel: the fused ones have no second derivative (H_t v)
        # (the random state is the user's again after: the replay sets the run's)
        with (
            evaluation_mode(self.model),
            sdpa_kernel(SDPBackend.MATH),
            torch.random.fork_rng(devices=[]),
        ):
            parts = [
                self._block(
                    take(x_q, slice(s, s + block)),
                    y_q[s : s + block],
                    (x_all, y_all, w_all),
                    k * self.run.num_steps,
                    total,
                    None if self.store is None else f"{self.store}-block{k}",
                )
                for k, s in enumerate(starts)
            ]
        return torch.cat(parts)

    def scores(self, query: DataLike, train: DataLike) -> Tensor:
        """``−n · dm/dw_i``: removal changes ``m(z_q)`` by about ``+score/n``, ``[n_query, n_train]``."""
        return -self.run.n_train * self.hypergradients(query, train)

    def settings(self) -> dict[str, Any]:
        return {
            "method": "metagradient",
            "hessian_free": self.hessian_free,
            "normalization": self.normalization,
            "query_block": self.query_block,
            "dtype": str(self.dtype).removeprefix("torch."),
            "run": self.run.settings(),
            "task": self.task.to_dict(),
        }
