"""Record any PyTorch training loop so that it can be replayed and differentiated.

The user's loop stays theirs; the :class:`Recorder` wraps only the optimizer step::

    recorder = Recorder(model, optimizer, n_train=len(train_set), checkpoint_every=20)
    for epoch in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            optimizer.zero_grad()
            task.train_loss(model, (x[idx], y[idx])).mean().backward()
            recorder.step(idx)                     # optionally max_norm=1.0 (clipping)
        scheduler.step()                           # any schedule: every step's lr (momentum) is kept
    run = recorder.finish(path="runs/digits")      # a RunRecord, saved atomically

It keeps, for every step, the batch's training indices, the learning rate and the
clipping threshold; the optimizer's hyper-parameters (at every step those a scheduler
changes: OneCycleLR and CyclicLR cycle momentum or Adam's betas); the parameters and optimizer
state at step 0 and every ``checkpoint_every`` steps (and the last); and an optional
``seed`` for the user's notes. :func:`replay` reruns the recorded steps with the same
optimizer class from step 0, optionally with per-example weights ``w`` in the batch
objective ``Σ_{j∈B_t} w_j ℓ_j / Σ_{j∈B_t} w_j`` (weight 0 = the example dropped from
the run, every batch keeps its place; ``normalization="n"``: ``/ B``, every batch also
keeps its size, see :func:`~headwater.train.steps.batch_objective`): with ``w = 1`` it
reproduces the final parameters bit for bit when the loop's loss is
``task.train_loss(model, batch).mean()``.

Supported: ``torch.optim.SGD`` (momentum, Nesterov, weight decay; no dampening),
``Adam`` and ``AdamW`` (no AMSGrad), one hyper-parameter set for all parameters
(one param group, or groups that agree), ``maximize=False``. BatchNorm layers the loop
runs in train mode (batch statistics, running averages) replay so, from checkpointed
running statistics; with weights, a batch's statistics are weighted by them. Dropout in
train mode replays with the run's masks: torch's (CPU) random state at each step's first
forward pass of the model is kept when the step draws random numbers, and the replay
restores it, with every module in its recorded mode (one mode per module at all such
steps; steps that draw none run every module but those BatchNorm layers in eval mode).
Randomness outside the model's forward pass (data augmentation) or on another device is
not recorded: a replay that misses a recorded checkpoint raises (:func:`check_reached`)
rather than return another run's numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from headwater.data import DataLike, as_tensors, take
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import evaluation_mode, prepare_batch
from headwater.task import Task
from headwater.train.norms import BUFFERS, norm_layers, trained_norms, weighted_norms
from headwater.train.run import (
    HYPER_NAMES,
    STATE_NAMES,
    Checkpoint,
    RunRecord,
    load_run,
    rng_state,
)
from headwater.train.steps import batch_objective, check_normalization

__all__ = [
    "Checkpoint",
    "Recorder",
    "RunRecord",
    "WithIndices",
    "check_reached",
    "check_replayable",
    "check_run_weights",
    "load_run",
    "replay",
    "with_indices",
]

REACH_TOL = 1e-2
"""How far a replayed segment may end from its recorded checkpoint, relative to how far the
recorded parameters moved over it. A deterministic loop is off by rounding only: at most
1.2e-6 replayed in float32 and 1.3e-5 in float64 (the bench's MLP and CNN runs, SGD and
Adam), 5e-5 on the causal LM's smooth run, but 4e-3 on its chaotic sharp run, whose
128-step segments amplify the rounding of the metagradient's functional recomputation
(``replay`` of the same run: exactly 0); loops that were not deterministic missed by 0.02
to 0.16 (Dropout p = 0.01 replayed without its masks), 0.2-0.4 (p = 0.1), 0.14-0.5
(BatchNorm in train mode, replayed in eval mode) and 0.09 (Gaussian input noise)."""


def _optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    if type(optimizer) is torch.optim.SGD:
        return "sgd"
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        decoupled = optimizer.defaults.get(
            "decoupled_weight_decay", type(optimizer) is torch.optim.AdamW
        )
        return "adamw" if decoupled else "adam"
    raise TypeError(
        f"optimizer: expected torch.optim.SGD, Adam or AdamW, got {type(optimizer).__name__}"
    )


def _hyper(optimizer: torch.optim.Optimizer, kind: str) -> dict[str, Any]:
    """The shared hyper-parameters of every param group (refusing what replay does not model)."""
    found = None
    for group in optimizer.param_groups:
        if group.get("maximize") or group.get("amsgrad") or group.get("dampening", 0) != 0:
            raise ValueError("optimizer: maximize, amsgrad and dampening != 0 are not supported")
        hyper = {k: (tuple(group[k]) if k == "betas" else group[k]) for k in HYPER_NAMES[kind]}
        if found not in (None, hyper) or group["lr"] != optimizer.param_groups[0]["lr"]:
            raise ValueError("optimizer: every param group must share lr and hyper-parameters")
        found = hyper
    return found


class WithIndices(Dataset):
    """A dataset whose items are ``(item, index)`` (:func:`with_indices`): a training loop's
    input, not data to score (``.dataset`` is)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset[index], index


def with_indices(dataset: Dataset) -> Dataset:
    """``dataset`` whose items come with their index, ``(item, i)``, so that a DataLoader loop
    has each batch's training indices for :meth:`Recorder.step`::

        loader = DataLoader(with_indices(train_set), batch_size=50, shuffle=True)
        for (x, y), idx in loader:                   # a dict item: `for batch, idx in loader`
            ...
            recorder.step(idx)

    and the run is scored on ``train_set`` itself (the indices point into it).
    """
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"dataset: expected a map-style Dataset (indexable, with a length), got "
            f"{type(dataset).__name__}"
        )
    return WithIndices(dataset)


class Recorder:
    """Wraps the optimizer step of the user's loop (module docstring).

    Args:
        model: the model being trained; its parameters in ``optimizer`` are recorded.
        optimizer: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` over parameters of ``model``.
        n_train: number of training examples the batch indices point into.
        checkpoint_every: keep parameters and optimizer state every this many steps
            (memory of the replay: segments of this length are recomputed; about √T is best).
        seed: the loop's seed, kept with the run.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        n_train: int,
        checkpoint_every: int = 20,
        seed: int | None = None,
    ):
        if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train <= 0:
            raise ValueError(f"n_train: must be a positive integer, got {n_train!r}")
        if (
            isinstance(checkpoint_every, bool)
            or not isinstance(checkpoint_every, int)
            or checkpoint_every <= 0
        ):
            raise ValueError(
                f"checkpoint_every: must be a positive integer, got {checkpoint_every!r}"
            )
        self.kind = _optimizer_kind(optimizer)
        _hyper(optimizer, self.kind)  # checked here; recorded at every step
        self.hypers: list[dict[str, Any]] = []
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.params = {k: p for k, p in model.named_parameters() if id(p) in in_opt}
        if len(self.params) != len(in_opt):
            raise ValueError("optimizer: holds parameters that are not parameters of model")
        self.layout = ParamLayout.of(self.params)
        self.model, self.optimizer, self.n_train = model, optimizer, n_train
        self.every, self.seed = checkpoint_every, seed
        self.batches: list[Tensor] = []
        self.lrs: list[float] = []
        self.max_norms: list[float | None] = []
        self._norms = [
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
        self.norms: tuple[str, ...] | None = None  # set at the first step
        self.modes: tuple[str, ...] | None = None  # modules in train mode, at the first step
        self.rng: dict[int, Tensor] = {}
        self._rng_before: Tensor | None = None  # the random state at this step's forward
        self._hook = model.register_forward_pre_hook(self._before_forward)
        self.checkpoints = [self._checkpoint(0)]

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        """Keep torch's random state at the step's first forward pass (a replay restores it:
        the same dropout masks)."""
        if self._rng_before is None:
            self._rng_before = torch.get_rng_state()

    def _checkpoint(self, step: int) -> Checkpoint:
        theta = self.layout.flatten({k: p.detach() for k, p in self.params.items()}).clone()
        state, count = {}, 0
        for name in STATE_NAMES[self.kind]:
            parts = []
            for p in self.params.values():
                s = self.optimizer.state.get(p, {})
                parts.append(
                    s[name].reshape(-1)
                    if s.get(name) is not None
                    else torch.zeros_like(p).reshape(-1)
                )
                count = int(s["step"]) if "step" in s else count
            state[name] = torch.cat(parts).detach().clone()
        modules = dict(self.model.named_modules())
        buffers = {
            f"{n}.{b}": getattr(modules[n], b).detach().clone()
            for n in self._norms
            for b in BUFFERS
        }
        return Checkpoint(step, theta, state, count, buffers)

    def _check_hyper(self, hyper: dict[str, Any]) -> None:
        """A scheduler may change the float hyper-parameters from step to step (momentum,
        betas, eps, weight decay); Nesterov, and whether SGD has momentum at all (its
        state), stay as at the first step."""
        if not self.hypers:
            return
        first, step = self.hypers[0], len(self.batches)
        if self.kind == "sgd" and hyper["nesterov"] != first["nesterov"]:
            raise ValueError(f"optimizer: nesterov changed at step {step}; keep it for the run")
        if self.kind == "sgd" and bool(hyper["momentum"]) != bool(first["momentum"]):
            raise ValueError(
                f"optimizer: momentum changed from {first['momentum']} to {hyper['momentum']} "
                f"at step {step}; a run's momentum may vary but not start or stop"
            )

    def _check_modes(self, random: bool) -> None:
        """The modes of this step: the BatchNorm layers in train mode are the first step's,
        and at every step that drew random numbers (``random``) every module's mode is
        that of the first such step (a replay runs them so, :meth:`RunRecord.modes_at`)."""
        norms = trained_norms(self.model)
        if self.norms is None:
            self.norms = norms
        elif norms != self.norms:
            raise ValueError(
                f"model: its BatchNorm layers in train mode changed at step {len(self.batches)} "
                f"(from {list(self.norms)} to {list(norms)}); keep each in one mode for the run"
            )
        modes = tuple(name for name, m in self.model.named_modules() if m.training)
        if random and self.modes is None:
            self.modes = modes
        elif random and modes != self.modes:
            changed = sorted(set(modes) ^ set(self.modes))
            raise ValueError(
                f"model: the train/eval mode of {changed[0]!r} changed at step "
                f"{len(self.batches)}, which drew random numbers (dropout); keep each module "
                "in one mode at every such step"
            )

    def step(self, indices: Sequence[int] | Tensor, *, max_norm: float | None = None) -> None:
        """Clip (if ``max_norm``), call ``optimizer.step()`` and record the step.

        Args:
            indices: training indices of this step's batch (the loss must be the batch mean).
            max_norm: clip the gradient's global 2-norm to this value first.
        """
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).clone()
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= self.n_train:
            raise ValueError(
                f"indices: expected a non-empty batch of indices in [0, {self.n_train})"
            )
        if max_norm is not None and not (isinstance(max_norm, int | float) and max_norm > 0):
            raise ValueError(f"max_norm: expected a float > 0 or None, got {max_norm!r}")
        self._check_hyper(hyper := _hyper(self.optimizer, self.kind))
        before, self._rng_before = self._rng_before, None
        random = before is not None and not torch.equal(before, torch.get_rng_state())
        self._check_modes(random)
        if random:
            self.rng[len(self.batches)] = before
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), max_norm)
        self.lrs.append(float(self.optimizer.param_groups[0]["lr"]))
        self.hypers.append(hyper)
        self.optimizer.step()
        self.batches.append(idx)
        self.max_norms.append(None if max_norm is None else float(max_norm))
        if len(self.batches) % self.every == 0:
            self.checkpoints.append(self._checkpoint(len(self.batches)))

    def finish(
        self, path: str | os.PathLike | None = None, meta: dict[str, Any] | None = None
    ) -> RunRecord:
        """The :class:`RunRecord` (the last step is always a checkpoint); saved at ``path`` if given."""
        if not self.batches:
            raise ValueError("Recorder: no step was recorded")
        self._hook.remove()
        ckpts = list(self.checkpoints)
        if ckpts[-1].step != len(self.batches):
            ckpts.append(self._checkpoint(len(self.batches)))
        kept = {f"{n}.{b}" for n in self.norms for b in BUFFERS}
        ckpts = [
            dataclasses.replace(c, buffers={k: v for k, v in c.buffers.items() if k in kept})
            for c in ckpts
        ]
        first = self.hypers[0]
        varying = {
            name: tuple(h[name] for h in self.hypers)
            for name in first
            if any(h[name] != first[name] for h in self.hypers)
        }
        run = RunRecord(
            self.kind,
            dict(first),
            self.layout,
            tuple(self.batches),
            tuple(self.lrs),
            tuple(self.max_norms),
            tuple(ckpts),
            self.n_train,
            self.seed,
            dict(meta or {}),
            self.norms,
            self.modes or (),
            dict(self.rng),
            varying,
        )
        if path is not None:
            run.save(path)
        return run


def _fresh_optimizer(run: RunRecord, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    hyper = dict(run.hyper)
    if run.optimizer == "sgd":
        return torch.optim.SGD(params, lr=run.lrs[0], **hyper)
    return (torch.optim.Adam if run.optimizer == "adam" else torch.optim.AdamW)(
        params, lr=run.lrs[0], **hyper
    )


def _load_state(
    opt: torch.optim.Optimizer, params: list[nn.Parameter], run: RunRecord, ckpt: Checkpoint
) -> None:
    """Put a checkpoint's optimizer state into a fresh optimizer (nothing when it starts empty)."""
    if ckpt.count == 0 and all(not v.any() for v in ckpt.state.values()):
        return
    for p, parts in zip(
        params,
        zip(*(run.layout.unflatten(v).values() for v in ckpt.state.values()), strict=True),
        strict=True,
    ):
        opt.state[p] = {k: v.clone().to(p) for k, v in zip(ckpt.state, parts, strict=True)}
        if run.optimizer != "sgd":
            opt.state[p]["step"] = torch.tensor(float(ckpt.count))


def check_reached(
    start: Checkpoint, end: Checkpoint, theta: Tensor, skip: Sequence[slice] = ()
) -> None:
    """Raise when ``theta``, the parameters replayed from checkpoint ``start`` through step
    ``end.step`` at the recorded weights, is not the recorded ``end.theta`` (within
    :data:`REACH_TOL` of the segment's change): the loop was not deterministic given its
    recorded batches, and anything computed from the replay would be about another run.
    The entries ``skip`` are not compared (parameters the losses do not depend on, whose
    path is rounding noise: :meth:`~headwater.methods.metagradient.Metagradient.cancelled`)."""
    recorded, begin = end.theta.to(theta), start.theta.to(theta)
    if skip:
        recorded, theta, begin = recorded.clone(), theta.clone(), begin.clone()
        for part in skip:
            for vector in (recorded, theta, begin):
                vector[part] = 0
    moved = float((recorded - begin).norm())
    off = float((theta - recorded).norm())
    if off == 0 or off <= REACH_TOL * moved:  # (a NaN replay is not)
        return
    raise ValueError(
        f"run: replaying steps {start.step}-{end.step} does not reach the recorded "
        f"parameters (off by {off / max(moved, 1e-300):.2g} of their change): the "
        "training loop was not deterministic given its recorded batches, e.g. random "
        "data augmentation, dropout on a GPU, autocast, a loss other than "
        "task.train_loss(model, batch).mean(), or training data other than `train`"
    )


def check_replayable(model: nn.Module, task: Task, train: DataLike, run: RunRecord) -> None:
    """Replay the run's first segment at the recorded weights (:func:`check_reached`): a loop
    that was not deterministic raises here, before replays at other weights, which cannot be
    checked against the checkpoints, would describe another run."""
    replay(model, task, train, run, steps=run.checkpoints[1].step)


def check_run_weights(weights: Tensor | None, n_train: int) -> None:
    """``weights`` of a run's examples: None (the recorded 1s) or a finite, non-negative
    Tensor ``[n_train]``; anything else raises, naming the argument."""
    if weights is None:
        return
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights: expected a Tensor [{n_train}], got {type(weights).__name__}")
    if tuple(weights.shape) != (n_train,):
        raise ValueError(f"weights: expected shape [{n_train}], got {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights: must be finite and >= 0")


def check_run(run: RunRecord, task: Task, model: nn.Module, n_train: int) -> None:
    """Raise naming the argument when ``run`` does not fit ``model``, ``task`` or the data."""
    if not isinstance(run, RunRecord):
        raise TypeError(
            f"run: expected a headwater RunRecord (Recorder.finish / load_run), got {type(run).__name__}"
        )
    if run.n_train != n_train:
        raise ValueError(f"train: the run was recorded on {run.n_train} examples, got {n_train}")
    own = dict(model.named_parameters())
    if any(
        k not in own or tuple(own[k].shape) != s
        for k, s in zip(run.layout.names, run.layout.shapes, strict=True)
    ):
        raise ValueError("model: its parameters do not match the recorded run's names and shapes")
    if task.weight_decay != 0:
        raise ValueError(
            "task: weight_decay must be 0 for a recorded run (the optimizer's weight decay is used)"
        )
    norm_layers(model, run.norms)
    modules = dict(model.named_modules())
    missing = [n for n in run.modes if n not in modules]
    if missing:
        raise ValueError(f"model: has no module {missing[0]!r}, which the run trained")


def replay(
    model: nn.Module,
    task: Task,
    train: DataLike,
    run: RunRecord,
    *,
    weights: Tensor | None = None,
    normalization: str = "mean",
    steps: int | None = None,
) -> dict[str, Tensor]:
    """Rerun the recorded steps from step 0 on a copy of ``model``; the final parameters
    (with ``steps``: after the first ``steps`` steps).

    Each step's loss is ``task.train_loss(model, batch).mean()`` (with ``weights
    [n_train]``: :func:`~headwater.train.steps.batch_objective` of the batch's weights
    and losses under ``normalization``), the batches, learning rates and clipping are the
    recorded ones and the optimizer is a fresh one of the recorded class. ``model`` is
    not changed. Without ``weights``, the parameters at every recorded checkpoint are
    checked against the recorded ones (:func:`check_reached`: a loop that was not
    deterministic raises a ValueError instead of returning another run's parameters).

    BatchNorm layers the run trained in train mode run so again, from the recorded running
    statistics at step 0; with ``weights``, on weighted batch statistics
    (:mod:`headwater.train.norms`: an example of weight 0 is absent from its batch).

    Returns:
        ``{name: tensor}`` of the trained parameters after the last step, and the running
        statistics of those BatchNorm layers (``"<layer>.running_mean"``, ...): bind them
        all to evaluate the replayed model.
    """
    x_all, y_all = as_tensors(train, "train")
    check_run(run, task, model, y_all.shape[0])
    check_run_weights(weights, run.n_train)
    check_normalization(normalization)
    if steps is None:
        steps = run.num_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 < steps <= run.num_steps:
        raise ValueError(f"steps: expected an integer in [1, {run.num_steps}], got {steps!r}")
    clone = copy.deepcopy(model)
    own = dict(clone.named_parameters())
    params = [own[k] for k in run.layout.names]
    start = run.checkpoints[0]
    buffers = dict(clone.named_buffers())
    with torch.no_grad():
        for name, value in run.layout.unflatten(start.theta).items():
            own[name].copy_(value)
        for name, value in start.buffers.items():
            buffers[name].copy_(value)
    x_all, y_all = prepare_batch((x_all, y_all), params[0])
    w_all = None if weights is None else weights.to(params[0])
    opt = _fresh_optimizer(run, params)
    _load_state(opt, params, run, start)
    checks = {c.step: c for c in run.checkpoints[1:]} if w_all is None else {}
    previous = start
    with torch.random.fork_rng(devices=[]):
        for step, (idx, lr, max_norm) in enumerate(
            zip(run.batches[:steps], run.lrs[:steps], run.max_norms[:steps], strict=True), 1
        ):
            opt.zero_grad()
            if (state := rng_state(run, step - 1)) is not None:
                torch.set_rng_state(state)
            with evaluation_mode(clone, run.modes_at(step - 1)):
                if w_all is None:
                    task.train_loss(clone, (take(x_all, idx), y_all[idx])).mean().backward()
                else:
                    with weighted_norms(clone, run.norms, w_all[idx], update=True):
                        losses = task.train_loss(clone, (take(x_all, idx), y_all[idx]))
                    batch_objective(w_all[idx], losses, normalization).backward()
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
            for group in opt.param_groups:
                group.update(lr=lr, **run.hyper_at(step - 1))
            opt.step()
            if step in checks:
                reached = run.layout.flatten({k: own[k].detach() for k in run.layout.names})
                check_reached(previous, checks[step], reached)
                previous = checks[step]
    trained = {k: buffers[k].detach() for k in start.buffers}
    return {**{k: own[k].detach() for k in run.layout.names}, **trained}
