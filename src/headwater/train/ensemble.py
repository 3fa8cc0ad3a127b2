"""Retraining many small models at once: ``stack_module_state`` + ``vmap(functional_call)``.

Member ``m`` of an ensemble is trained on the training set with per-example weights
``w[m] ∈ R^n`` (a 0/1 mask selects a subset) to minimise

    J_m(θ) = Σ_i c_m w_mi ℓ(z_i; θ) + (weight_decay / 2) ‖θ_selected‖²

with ``c_m = 1 / Σ_i w_mi`` (``normalization="mean"``: a weighted mean, so a subset
is trained as if it were the whole data set) or ``c_m = 1 / n``
(``normalization="n"``: DESIGN.md's leave-one-out view, a removed example has weight
0 while the others keep ``1/n``). ``weight_decay`` and the selected parameters are
the Task's, so ``J`` is the objective the curvature describes; every trainable
parameter (``requires_grad``) is trained.

Mini-batches: every epoch each member draws its own permutation of *all* ``n``
examples (``torch.randperm`` with a generator seeded by the member's order seed);
step ``t`` uses the slice ``perm[tB:(t+1)B]`` and the unbiased estimate

    L_m,t(θ) = (1/|B_t|) Σ_{i∈B_t} n c_m w_mi ℓ(z_i; θ) + (weight_decay / 2) ‖θ_selected‖².

So all members take the same number of steps (one vectorised step trains all of
them), and two members with the same seeds but different weights (say, with and
without example ``i``) see the same batches: retraining noise is paired.

Optimisers: SGD (with momentum) and Adam are implemented as functional updates on
stacked tensors with the same maths as ``torch.optim.SGD``/``torch.optim.Adam``
(the L2 term is part of the loss, not the optimiser's ``weight_decay``); the
plain loop fallback uses ``torch.optim`` itself, so the two paths check each
other. Full-batch L-BFGS (convex models, to a tolerance) always uses the loop.

Each member's initialisation seed and batch-order seed are recorded; results are
written through :mod:`headwater.store` after every pass of ``members_per_pass``
members, and a rerun with the same store path skips finished passes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap

from headwater.data import DataLike, as_tensors
from headwater.gradients.functional import evaluation_mode, prepare_batch
from headwater.progress import ProgressFn, report
from headwater.store.cached import cached_tensors, fingerprint
from headwater.task import Task
from headwater.train.config import Init, Normalization, Optimizer, TrainConfig, Vectorize
from headwater.train.lbfgs import minimize_objective

__all__ = [
    "Ensemble",
    "Init",
    "Normalization",
    "Optimizer",
    "TrainConfig",
    "Vectorize",
    "check_weights",
    "ensemble_measurements",
    "fingerprint",
    "train_ensemble",
]

_ORDER_SEED_OFFSET = 1_000_003
"""A member with seed ``s`` is initialised from seed ``s`` and shuffles with ``s + this``."""


@dataclass(frozen=True)
class Ensemble:
    """Stacked results of :func:`train_ensemble`.

    Attributes:
        params: ``{name: [M, *shape]}`` every parameter of every member.
        buffers: ``{name: [M, *shape]}`` every buffer (e.g. BatchNorm statistics).
        weights: ``[M, n]`` the per-example weights (or 0/1 masks) each member saw.
        init_seeds: ``[M]`` initialisation seeds (``init="reset"``).
        order_seeds: ``[M]`` batch-order seeds.
        settings: everything that determines the result (stored alongside).
    """

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    weights: Tensor
    init_seeds: Tensor
    order_seeds: Tensor
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.weights.shape[0])

    @classmethod
    def from_models(cls, models: Sequence[nn.Module]) -> Ensemble:
        """Stack independently trained models of one architecture
        (``torch.func.stack_module_state``); weights and seeds are unknown (NaN / -1)."""
        if len(models) == 0:
            raise ValueError("models: expected at least one model")
        params, buffers = stack_module_state(list(models))
        count = len(models)
        return cls(
            {k: v.detach().clone() for k, v in params.items()},
            {k: v.detach().clone() for k, v in buffers.items()},
            torch.full((count, 0), float("nan")),
            torch.full((count,), -1),
            torch.full((count,), -1),
            {"kind": "stacked models"},
        )

    def member(self, model: nn.Module, index: int) -> nn.Module:
        """A deep copy of ``model`` holding member ``index``'s parameters and buffers."""
        if not 0 <= index < len(self):
            raise IndexError(f"index: must lie in [0, {len(self)}), got {index}")
        out = copy.deepcopy(model)
        state = {k: v[index] for k, v in {**self.params, **self.buffers}.items()}
        out.load_state_dict(state, strict=False)
        return out


def check_weights(weights: Tensor, n: int, name: str = "weights") -> Tensor:
    """Validate ``[M, n]`` masks or non-negative weights; returns float64 weights."""
    if not isinstance(weights, Tensor):
        raise TypeError(f"{name}: expected a Tensor [M, {n}], got {type(weights).__name__}")
    if weights.dim() != 2 or weights.shape[1] != n or weights.shape[0] == 0:
        raise ValueError(f"{name}: expected shape [M, {n}] with M >= 1, got {tuple(weights.shape)}")
    w = weights.to(torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{name}: must be finite and >= 0")
    if (w.sum(dim=1) <= 0).any():
        bad = int((w.sum(dim=1) <= 0).nonzero()[0, 0])
        raise ValueError(f"{name}: member {bad} has no example with a positive weight")
    return w


def _has_stateful_training(model: nn.Module) -> bool:
    stateful = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    return any(isinstance(m, stateful) for m in model.modules())


def _initial_state(model: nn.Module, config: TrainConfig, seed: int) -> dict[str, Tensor]:
    """Parameters and buffers member ``seed`` starts from (the user's model is untouched)."""
    fresh = copy.deepcopy(model)
    if config.init is Init.RESET:
        with torch.random.fork_rng(devices=[]):  # the global RNG is restored on exit
            torch.manual_seed(seed)
            for module in fresh.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
        frozen = {k: p for k, p in model.named_parameters() if not p.requires_grad}
        with torch.no_grad():
            for k, p in fresh.named_parameters():
                if k in frozen:
                    p.copy_(frozen[k])
    return {k: v.detach().clone() for k, v in fresh.state_dict(keep_vars=False).items()}


class _Problem:
    """Everything one pass needs: data, template model, names, objective."""

    def __init__(self, model: nn.Module, task: Task, train: DataLike, config: TrainConfig):
        self.template = copy.deepcopy(model)
        for p in self.template.parameters():
            p.grad = None
        self.task, self.config = task, config
        self.trainable = [k for k, p in model.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("model: has no parameters that require a gradient (nothing to train)")
        self.regularised = list(task.parameters(model))
        self.param_names = [k for k, _ in model.named_parameters()]
        self.buffer_names = [k for k, _ in model.named_buffers()]
        ref = next(iter(model.parameters()))
        self.x, self.y = prepare_batch(as_tensors(train, "train"), ref)
        self.n = int(self.x.shape[0])
        self.dtype, self.device = ref.dtype, ref.device

    def objective(
        self, params: dict[str, Tensor], others: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor
    ) -> Tensor:
        """The data term ``Σ_j w_j ℓ_j`` for one member (``w`` already scaled and divided by
        the batch size); the L2 term's gradient ``wd·θ_sel`` is added outside the
        vectorised graph."""
        state = {**others, **params}

        def fn(inputs: Tensor) -> Tensor:
            return functional_call(self.template, state, (inputs,), strict=False)

        losses = self.task.train_loss(fn, (x, y))
        return (w * losses).sum()

    def scale(self, w: Tensor) -> Tensor:
        """``n c_m w_m`` per member, ``[M, n]`` in the model's dtype."""
        if self.config.normalization is Normalization.MEAN:
            w = w * (self.n / w.sum(dim=1, keepdim=True))
        return w.to(device=self.device, dtype=self.dtype)

    def orders(self, order_seeds: Sequence[int]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(int(s)) for s in order_seeds]

    def steps(self) -> list[slice]:
        b = self.config.batch_size
        return [slice(s, min(s + b, self.n)) for s in range(0, self.n, b)]


# ----------------------------------------------------------------------------- vmap path


def _adam_update(
    params: dict[str, Tensor], grads: dict[str, Tensor], state: dict[str, Any], config: TrainConfig
) -> None:
    """``torch.optim.Adam`` (single-tensor, L2 in the loss) on stacked tensors, in place."""
    beta1, beta2 = config.betas
    state["step"] += 1
    step = state["step"]
    bias1 = 1 - beta1**step
    bias2_sqrt = (1 - beta2**step) ** 0.5
    keys = list(grads)
    g = [grads[k] for k in keys]
    m = [state["exp_avg"][k] for k in keys]
    v = [state["exp_avg_sq"][k] for k in keys]
    torch._foreach_lerp_(m, g, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bias2_sqrt)
    torch._foreach_add_(denom, config.eps)
    torch._foreach_addcdiv_([params[k] for k in keys], m, denom, value=-config.lr / bias1)


def _sgd_update(
    params: dict[str, Tensor], grads: dict[str, Tensor], state: dict[str, Any], config: TrainConfig
) -> None:
    """``torch.optim.SGD`` (momentum, no dampening/Nesterov) on stacked tensors, in place."""
    for k, g in grads.items():
        if config.momentum != 0:
            buf = state["momentum"].get(k)
            if buf is None:
                buf = state["momentum"][k] = g.clone()
            else:
                buf.mul_(config.momentum).add_(g)
            g = buf
        params[k].add_(g, alpha=-config.lr)


def _drop_zero_weights(idx: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Move each member's weighted examples to the front and cut the batch to the largest
    count: examples of weight 0 (outside a subset) add nothing but compute. ``[M, b]``."""
    keep = w != 0
    width = int(keep.sum(dim=1).max())
    if width == idx.shape[1]:
        return idx, w
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    return idx.gather(1, order), w.gather(1, order)


def _train_vmap(
    problem: _Problem, starts: list[dict[str, Tensor]], weights: Tensor, order_seeds: Sequence[int]
) -> list[dict[str, Tensor]]:
    config = problem.config
    count = len(starts)
    params = {k: torch.stack([s[k] for s in starts]).clone() for k in problem.trainable}
    others = {k: torch.stack([s[k] for s in starts]) for k in starts[0] if k not in params}
    scaled = problem.scale(weights)  # [M, n]
    gens = problem.orders(order_seeds)
    state: dict[str, Any] = {
        "step": 0,
        "momentum": {},
        "exp_avg": {k: torch.zeros_like(v) for k, v in params.items()},
        "exp_avg_sq": {k: torch.zeros_like(v) for k, v in params.items()},
    }
    update = _adam_update if config.optimizer is Optimizer.ADAM else _sgd_update
    grad_fn = vmap(grad(problem.objective))
    rows = torch.arange(count).unsqueeze(1)
    problem.template.train()
    for _ in range(config.epochs):
        perms = torch.stack([torch.randperm(problem.n, generator=g) for g in gens])  # [M, n]
        for sl in problem.steps():
            idx = perms[:, sl]  # [M, b]
            w_b = scaled[rows, idx] / idx.shape[1]  # [M, b]
            idx, w_b = _drop_zero_weights(idx, w_b)
            x, y = problem.x[idx], problem.y[idx]  # [M, b', ...]
            grads = grad_fn(params, others, x, y, w_b)
            if problem.task.weight_decay:
                for k in problem.regularised:
                    if k in grads:  # frozen parameters get no update
                        grads[k].add_(params[k], alpha=problem.task.weight_decay)
            update(params, grads, state, config)
    _check_finite(params)
    return [
        {**{k: v[m] for k, v in others.items()}, **{k: v[m] for k, v in params.items()}}
        for m in range(count)
    ]


def _check_finite(params: dict[str, Tensor]) -> None:
    for k, v in params.items():
        if not torch.isfinite(v).all():
            raise ValueError(
                f"training diverged (parameter {k!r} is NaN/inf): lower `lr` in TrainConfig"
            )


# ----------------------------------------------------------------------------- loop path


def _train_loop(
    problem: _Problem, starts: list[dict[str, Tensor]], weights: Tensor, order_seeds: Sequence[int]
) -> list[dict[str, Tensor]]:
    config = problem.config
    scaled = problem.scale(weights)
    out = []
    for m, start in enumerate(starts):
        member = copy.deepcopy(problem.template)
        member.load_state_dict(start)
        if config.optimizer is Optimizer.LBFGS:
            w = scaled[m] / problem.n  # [n], Σ = 1 ("mean") or w/n ("n")
            minimize_objective(
                member,
                problem.task,
                (problem.x, problem.y),
                weights=w,
                tol=config.tol,
                max_iter=config.max_iter,
            )
        else:
            _loop_sgd_adam(problem, member, scaled[m], int(order_seeds[m]))
        state = {k: v.detach().clone() for k, v in member.state_dict().items()}
        _check_finite({k: state[k] for k in problem.trainable})
        out.append(state)
    return out


def _loop_sgd_adam(problem: _Problem, member: nn.Module, w: Tensor, order_seed: int) -> None:
    config = problem.config
    trainable = dict(member.named_parameters())
    params = [trainable[k] for k in problem.trainable]
    if config.optimizer is Optimizer.ADAM:
        opt: torch.optim.Optimizer = torch.optim.Adam(
            params, lr=config.lr, betas=config.betas, eps=config.eps, foreach=False
        )
    else:
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, foreach=False)
    gen = torch.Generator().manual_seed(order_seed)
    member.train()
    with torch.random.fork_rng(devices=[]):  # dropout draws from a per-member seed
        torch.manual_seed(order_seed)
        for _ in range(config.epochs):
            perm = torch.randperm(problem.n, generator=gen)
            for sl in problem.steps():
                idx = perm[sl]
                opt.zero_grad(set_to_none=True)
                losses = problem.task.train_loss(member, (problem.x[idx], problem.y[idx]))
                value = (w[idx] * losses).sum() / idx.shape[0]
                if problem.task.weight_decay:
                    reg = sum(trainable[k].pow(2).sum() for k in problem.regularised)
                    value = value + 0.5 * problem.task.weight_decay * reg
                value.backward()
                opt.step()
    for p in member.parameters():
        p.grad = None


# ----------------------------------------------------------------------------- driver


def _settings(
    model: nn.Module, task: Task, problem: _Problem, config: TrainConfig
) -> dict[str, Any]:
    return {
        "kind": "ensemble",
        "config": config.to_dict(),
        "task": task.to_dict(),
        "n_train": problem.n,
        "data": fingerprint(problem.x, problem.y),
        "model_class": type(model).__name__,
        "trainable": problem.trainable,
    }


def _start_fingerprint(model: nn.Module, config: TrainConfig, seed: int) -> str:
    """What a member starts from: names and values of its initial state (for ``init="reset"``
    this depends on the architecture, frozen parameters and the seed, not the model's values)."""
    state = _initial_state(model, config, seed)
    return fingerprint(*(state[k] for k in sorted(state))) + "|" + ",".join(sorted(state))


def train_ensemble(
    model: nn.Module,
    task: Task,
    train: DataLike,
    weights: Tensor,
    *,
    config: TrainConfig | None = None,
    seeds: Sequence[int] | Tensor | None = None,
    store_path: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
) -> Ensemble:
    """Train one model per row of ``weights`` (see the module docstring for the objective).

    Args:
        model: the architecture (and, with ``init="copy"``, the start); never modified.
        task: loss, weight decay and the regularised parameters.
        train: the ``n`` training examples (held in memory).
        weights: ``[M, n]`` 0/1 masks or non-negative per-example weights.
        config: optimiser and schedule; default ``TrainConfig()``.
        seeds: ``[M]`` member seeds (init seed ``s``, order seed ``s + 1_000_003``);
            default ``0..M-1``.
        store_path: a folder; each pass of ``config.members_per_pass`` members is
            saved there once trained, and a rerun skips passes already stored.
        progress: optional ``progress(stage, done, total)`` callback.

    Returns:
        :class:`Ensemble` with parameters stacked over members.

    Raises:
        ValueError: for bad weights/seeds, divergence, or (vectorize="vmap") a model
            that cannot be vmapped; ``store.StoreMismatchError`` if ``store_path``
            holds a pass trained with other settings.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if not isinstance(task, Task):
        raise TypeError(f"task: expected a headwater Task, got {type(task).__name__}")
    problem = _Problem(model, task, train, config)
    w = check_weights(weights, problem.n)
    count = w.shape[0]
    seed_list = (
        list(range(count))
        if seeds is None
        else [int(s) for s in torch.as_tensor(seeds).reshape(-1)]
    )
    if len(seed_list) != count:
        raise ValueError(
            f"seeds: expected {count} seeds (one per row of weights), got {len(seed_list)}"
        )
    order_seeds = [s + _ORDER_SEED_OFFSET for s in seed_list]
    settings = _settings(model, task, problem, config)
    trainer = _choose_trainer(model, config)
    results: list[dict[str, Tensor]] = []
    for start in range(0, count, config.members_per_pass):
        stop = min(start + config.members_per_pass, count)
        path = None if store_path is None else Path(store_path) / f"members-{start:06d}-{stop:06d}"
        expect = {
            **settings,
            "members": [start, stop],
            "seeds": seed_list[start:stop],
            "weights": fingerprint(w[start:stop]),
            "start": _start_fingerprint(model, config, seed_list[start]),
        }

        def retrain(start: int = start, stop: int = stop) -> dict[str, Tensor]:
            starts = [_initial_state(model, config, s) for s in seed_list[start:stop]]
            trained = trainer(problem, starts, w[start:stop], order_seeds[start:stop])
            return {f"state.{k}": torch.stack([t[k] for t in trained]) for k in trained[0]}

        tensors = cached_tensors(path, expect, retrain, device=problem.device)
        results.extend(
            {k[6:]: v[m] for k, v in tensors.items() if k.startswith("state.")}
            for m in range(stop - start)
        )
        report(progress, "retraining", stop, count)
    params = {k: torch.stack([r[k] for r in results]) for k in problem.param_names}
    buffers = {
        k: torch.stack([r[k] for r in results]) for k in problem.buffer_names if k in results[0]
    }
    return Ensemble(
        params,
        buffers,
        w.to(problem.dtype),
        torch.tensor(seed_list),
        torch.tensor(order_seeds),
        settings,
    )


def _choose_trainer(
    model: nn.Module, config: TrainConfig
) -> Callable[..., list[dict[str, Tensor]]]:
    if config.optimizer is Optimizer.LBFGS or config.vectorize is Vectorize.LOOP:
        return _train_loop
    if config.vectorize is Vectorize.AUTO and _has_stateful_training(model):
        return _train_loop

    def vectorised(problem: _Problem, *args: Any) -> list[dict[str, Tensor]]:
        try:
            return _train_vmap(problem, *args)
        except RuntimeError as err:
            if config.vectorize is Vectorize.VMAP:
                raise ValueError(
                    f"model: cannot be trained under vmap ({err}); use vectorize='loop'"
                ) from err
            return _train_loop(problem, *args)

    return vectorised


# ----------------------------------------------------------------------------- measuring


def ensemble_measurements(
    model: nn.Module, task: Task, ensemble: Ensemble, query: DataLike
) -> Tensor:
    """``task.measurement`` of every member on every query, ``[M, n_query]`` (eval mode).

    Raises:
        ValueError: if ``ensemble`` was not trained for ``model``'s parameters.
    """
    names = {k for k, _ in model.named_parameters()}
    if set(ensemble.params) != names:
        raise ValueError("ensemble: its parameter names do not match `model`'s")
    template = copy.deepcopy(model)
    ref = next(iter(ensemble.params.values()))
    batch = prepare_batch(as_tensors(query, "query"), ref)
    stacked = {**ensemble.params, **ensemble.buffers}

    def single(state: dict[str, Tensor]) -> Tensor:
        def fn(inputs: Tensor) -> Tensor:
            return functional_call(template, state, (inputs,), strict=False)

        return task.measurement(fn, batch)

    with torch.no_grad(), evaluation_mode(template):
        try:
            return vmap(single)(stacked)
        except RuntimeError:
            return torch.stack(
                [single({k: v[m] for k, v in stacked.items()}) for m in range(len(ensemble))]
            )
