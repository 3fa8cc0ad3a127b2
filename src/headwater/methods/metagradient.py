"""Exact metagradients of a recorded training run (REPLAY, Ilyas & Engstrom 2025, "MAGIC").

A run recorded by :class:`~headwater.train.recorder.Recorder` is a map
``s_{t+1} = F_t(s_t, g_t)`` of the state ``s_t = (θ_t, optimizer state)`` with the batch
gradient ``g_t = (1/B) Σ_{j∈B_t} w_j ∇ℓ_j(θ_t)`` (:mod:`headwater.train.steps`: SGD with
momentum / Nesterov / weight decay, Adam, AdamW, learning-rate schedules, clipping).
For every query ``q`` this module computes the exact derivative ``d m(z_q; θ_T) / d w_i``
by reverse-mode replay. Going backwards from ``a_θ = ∇m(θ_T)``, ``a_state = 0``, step
``t`` does

    (a_θ, a_state, a_g) ← the VJP of F_t at (θ_t, state_t, g_t) applied to (a_θ, a_state)
    d m/d w_i += a_g · ∇ℓ_i(θ_t) / B          for i ∈ B_t
    a_θ ← a_θ + H_t a_g                         (H_t: Hessian of the weighted batch loss)

All queries are carried at once (``a_θ, a_g: [Q, P]``). The update ``F_t`` is
elementwise after clipping, so its VJP, written out per optimizer in
:mod:`headwater.train.steps`, is a few elementwise passes over the adjoints, in place
(clipping's rank-one term by hand). ``H_t a_g`` and ``J_t a_g`` (``J_t [B, P]``: per-example loss gradients,
never formed) come from one forward-over-reverse pass per query, vmapped over the
queries in chunks; ``J_t a_g`` is ``[Q, B]``, the weight derivatives of the batch. Memory is
``O(checkpoints·P + segment·P + Q·P)``: the states between two recorded checkpoints are
recomputed forward from the earlier one, segment by segment from the last (REPLAY's
scheme with the recorder's ``checkpoint_every``; about √T is the usual choice).

Score: removing example ``i`` (weight 1 → 0) changes the measurement by about
``−dm/dw_i``; ``score = −n · dm/dw_i`` so that, as everywhere in headwater, removal
changes ``m(z_q)`` by about ``+score[q, i]/n`` (positive = proponent with the loss as
measurement). With ``hessian_free=True`` the ``H_t`` term is dropped (HYDRA's fast
variant, Chen et al. 2021): cheaper, approximate.

The derivative is exact for the run as recorded (deterministic model: no dropout, the
model is run in eval mode); it predicts retraining well when the training recipe is
smooth (small steps, warm-up), see the README.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from headwater.data import DataLike, as_tensors
from headwater.gradients.functional import evaluation_mode, prepare_batch
from headwater.gradients.per_example import check_values
from headwater.methods.estimator import Estimator
from headwater.progress import ProgressFn, report
from headwater.task import Task
from headwater.train.recorder import Checkpoint, RunRecord, check_run
from headwater.train.steps import adam_pullback, clip, clip_pullback, optimizer_step, sgd_pullback

__all__ = ["Metagradient"]

_CHUNK = 100
"""Queries per vmapped batch of tangents (digits MLP, 200 queries: the peak memory of the
Hessian products halved, the same speed as all at once; 50 is 15% slower)."""


class Metagradient(Estimator):
    """Exact metagradient scores ``[n_query, n_train]`` of a recorded run (module docstring).

    Args:
        model: the architecture (read for its structure; the run supplies θ_t).
        task: the loss the run minimised (``task.train_loss(...).mean()`` per batch) and
            the query measurement.
        run: a :class:`~headwater.train.recorder.RunRecord` of training on ``train``.
        hessian_free: drop the ``H_t`` terms (HYDRA's approximation).
        query_block: carry at most this many queries at once (memory ``block × P`` per
            adjoint; each block replays the run once; the numbers do not depend on it).
        dtype: compute in this dtype (default: the run's); float64 for checks.
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
        query_block: int | None = None,
        dtype: torch.dtype | None = None,
        progress: ProgressFn | None = None,
    ):
        check_run(run, task, model, run.n_train if isinstance(run, RunRecord) else -1)
        if query_block is not None and (
            isinstance(query_block, bool) or not isinstance(query_block, int) or query_block <= 0
        ):
            raise ValueError(
                f"query_block: must be a positive integer or None, got {query_block!r}"
            )
        self.model, self.task, self.run = model, task, run
        self.hessian_free, self.query_block, self.progress = (
            bool(hessian_free),
            query_block,
            progress,
        )
        self.dtype = run.checkpoints[0].theta.dtype if dtype is None else dtype

    # ---------------------------------------------------------------- model as a function of θ
    def _losses_fn(self, x: Tensor, y: Tensor):
        """``θ -> ℓ_B(θ) [B]``, the per-example training losses of a batch at the flat ``θ``."""
        layout = self.run.layout

        def losses(theta: Tensor) -> Tensor:
            def fn(inp: Tensor) -> Tensor:
                return functional_call(self.model, layout.unflatten(theta), (inp,), strict=False)

            return self.task.train_loss(fn, (x, y))

        return losses

    def _batch_gradient(self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """``g = ∇ (1/B) Σ_j w_j ℓ_j`` at ``theta``, ``[P]``."""
        losses = self._losses_fn(x, y)
        return grad(lambda t: (w * losses(t)).mean())(theta)

    def _tangents(
        self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor, vectors: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(H_t V [Q, P], J_t V [Q, B])`` from one forward-over-reverse pass per query (vmapped):
        the Hessian of the weighted batch loss and the per-example loss derivatives along
        each row of ``V [Q, P]``; with ``hessian_free`` only ``J_t V`` (forward mode)."""
        losses = self._losses_fn(x, y)
        if self.hessian_free:
            return None, vmap(lambda v: jvp(losses, (theta,), (v,))[1], chunk_size=_CHUNK)(vectors)

        def with_losses(t: Tensor) -> tuple[Tensor, Tensor]:
            per = losses(t)
            return (w * per).mean(), per

        g = grad(with_losses, has_aux=True)
        return vmap(lambda v: jvp(g, (theta,), (v,))[1], chunk_size=_CHUNK)(vectors)

    def _measurement_gradients(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Per-query gradients of the measurement ``[Q, P]`` at the flat ``theta``."""
        layout = self.run.layout

        def single(t: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
            fn = lambda inp: functional_call(self.model, layout.unflatten(t), (inp,), strict=False)  # noqa: E731
            return self.task.measurement(fn, (xi.unsqueeze(0), yi.unsqueeze(0))).sum()

        return vmap(grad(single), in_dims=(None, 0, 0))(theta, x, y)

    # ---------------------------------------------------------------- replay
    def _cast(self, ckpt: Checkpoint) -> tuple[Tensor, tuple[Tensor, ...]]:
        return ckpt.theta.to(self.dtype), tuple(v.to(self.dtype) for v in ckpt.state.values())

    def _step(self, t: int, theta: Tensor, state: tuple[Tensor, ...], g: Tensor, count: int):
        run = self.run
        return optimizer_step(
            run.optimizer, run.hyper, theta, state, g, run.lrs[t], count, run.max_norms[t]
        )

    def _forward(
        self, ckpt: Checkpoint, end: int, data
    ) -> list[tuple[Tensor, tuple[Tensor, ...], Tensor]]:
        """``(θ_t, state_t, g_t)`` for ``t`` in ``[ckpt.step, end)``, recomputed forward."""
        x_all, y_all, w_all = data
        theta, state = self._cast(ckpt)
        states = []
        for t in range(ckpt.step, end):
            idx = self.run.batches[t]
            g = self._batch_gradient(theta, x_all[idx], y_all[idx], w_all[idx])
            states.append((theta, state, g))
            theta, state = self._step(t, theta, state, g, ckpt.count + t - ckpt.step + 1)
        return states

    def _pullback(
        self,
        t: int,
        count: int,
        theta: Tensor,
        state: tuple[Tensor, ...],
        g: Tensor,
        carry: list[Tensor],
    ) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
        """The adjoints of ``(θ_t, state_t, g_t)`` from those of ``(θ_{t+1}, state_{t+1})``
        (``carry = [a_θ, *a_state]``, each ``[Q, P]``, updated in place and emptied): the
        update's pullback written out (:func:`~headwater.train.steps.sgd_pullback`,
        :func:`~headwater.train.steps.adam_pullback`: a few elementwise passes for all
        queries at once), then clipping's (:func:`~headwater.train.steps.clip_pullback`)."""
        run = self.run
        a_theta, a_state = carry[0], tuple(carry[1:])
        carry.clear()
        if run.optimizer == "sgd":
            a_theta, a_state, a_g = sgd_pullback(run.hyper, run.lrs[t], a_theta, a_state)
        else:
            a_theta, a_state, a_g = adam_pullback(
                run.optimizer,
                run.hyper,
                theta,
                state,
                clip(g, run.max_norms[t]),
                run.lrs[t],
                count,
                a_theta,
                a_state,
            )
        return a_theta, a_state, clip_pullback(g, run.max_norms[t], a_g)

    def _backward_step(
        self, t: int, count: int, forward, carry: list[Tensor], data, out: Tensor
    ) -> None:
        """One reverse step: ``carry`` goes from the adjoints of step ``t+1`` to those of
        ``(θ_t, state_t)``; ``dm/dw`` of the batch is added into ``out``."""
        x_all, y_all, w_all = data
        theta, state, g = forward
        idx = self.run.batches[t]
        a_theta, a_state, a_g = self._pullback(t, count, theta, state, g, carry)  # [Q, P] each
        hv, jv = self._tangents(theta, x_all[idx], y_all[idx], w_all[idx], a_g)  # [Q, P], [Q, B]
        out[:, idx] += jv / len(idx)
        if hv is not None:
            a_theta.add_(hv)
        carry.extend((a_theta, *a_state))

    def _block(self, x_q: Tensor, y_q: Tensor, data, done: int, total: int) -> Tensor:
        run = self.run
        last = run.checkpoints[-1]
        theta_T = last.theta.to(self.dtype)
        a_theta = self._measurement_gradients(theta_T, x_q, y_q)  # [Q, P]
        check_values(a_theta.sum(1), x_q.shape[0], "query")
        carry = [
            a_theta,
            *(torch.zeros_like(a_theta) for _ in last.state),
        ]  # adjoints of (θ_t, state_t)
        del a_theta
        out = torch.zeros(x_q.shape[0], run.n_train, dtype=self.dtype)
        ckpts = run.checkpoints
        for start, end in zip(
            reversed(ckpts[:-1]), reversed([c.step for c in ckpts[1:]]), strict=True
        ):
            states = self._forward(start, end, data)
            for t in reversed(range(start.step, end)):
                count = start.count + t - start.step + 1
                self._backward_step(t, count, states.pop(), carry, data, out)
                done += 1
                report(self.progress, "metagradient steps", done, total)
        return out

    def hypergradients(
        self, query: DataLike, train: DataLike, *, weights: Tensor | None = None
    ) -> Tensor:
        """``d m(z_q; θ_T) / d w_i`` at the run's weights (``weights``, default all 1),
        ``[n_query, n_train]``."""
        x_all, y_all = as_tensors(train, "train")
        check_run(self.run, self.task, self.model, x_all.shape[0])
        like = torch.empty(0, dtype=self.dtype)
        x_all, y_all = prepare_batch((x_all, y_all), like)
        x_q, y_q = prepare_batch(as_tensors(query, "query"), like)
        w_all = (
            torch.ones(self.run.n_train, dtype=self.dtype)
            if weights is None
            else weights.to(self.dtype)
        )
        if tuple(w_all.shape) != (self.run.n_train,):
            raise ValueError(
                f"weights: expected shape [{self.run.n_train}], got {tuple(w_all.shape)}"
            )
        block = self.query_block or max(1, x_q.shape[0])
        starts = range(0, x_q.shape[0], block)
        total = len(starts) * self.run.num_steps
        with evaluation_mode(self.model):
            parts = [
                self._block(
                    x_q[s : s + block],
                    y_q[s : s + block],
                    (x_all, y_all, w_all),
                    k * self.run.num_steps,
                    total,
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
            "query_block": self.query_block,
            "dtype": str(self.dtype).removeprefix("torch."),
            "run": self.run.settings(),
            "task": self.task.to_dict(),
        }
