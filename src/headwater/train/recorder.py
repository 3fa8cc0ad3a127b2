"""Record any PyTorch training loop so that it can be replayed and differentiated.

The user's loop stays theirs; the :class:`Recorder` wraps only the optimizer step::

    recorder = Recorder(model, optimizer, n_train=len(train_set), checkpoint_every=20)
    for epoch in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            optimizer.zero_grad()
            task.train_loss(model, (x[idx], y[idx])).mean().backward()
            recorder.step(idx)                     # optionally max_norm=1.0 (clipping)
        scheduler.step()                           # any lr schedule: the lr of every step is kept
    run = recorder.finish(path="runs/digits")      # a RunRecord, saved atomically

It keeps, for every step, the batch's training indices, the learning rate and the
clipping threshold; the optimizer's hyper-parameters; the parameters and optimizer
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
(one param group, or groups that agree), ``maximize=False``. Models are replayed in
eval mode: dropout or batch-norm statistics in the loop make the run non-replayable, and
a replay that misses a recorded checkpoint raises (:func:`check_reached`) rather than
return another run's numbers.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from headwater import store
from headwater.data import DataLike, as_tensors, take
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import evaluation_mode, prepare_batch
from headwater.task import Task
from headwater.train.steps import batch_objective, check_normalization

__all__ = [
    "Checkpoint",
    "Recorder",
    "RunRecord",
    "check_reached",
    "check_replayable",
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
to 0.16 (Dropout p = 0.01), 0.2-0.4 (p = 0.1), 0.14-0.5 (BatchNorm in train mode) and
0.09 (Gaussian input noise)."""

_HYPER = {
    "sgd": ("momentum", "nesterov", "weight_decay"),
    "adam": ("betas", "eps", "weight_decay"),
    "adamw": ("betas", "eps", "weight_decay"),
}
_STATE = {
    "sgd": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
}


@dataclass(frozen=True)
class Checkpoint:
    """Flat parameters ``theta [P]`` and optimizer state ``{name: [P]}`` before step ``step``;
    ``count`` is Adam's step counter there (0 for SGD)."""

    step: int
    theta: Tensor
    state: dict[str, Tensor]
    count: int = 0


@dataclass(frozen=True)
class RunRecord:
    """A recorded training run (see the module docstring).

    Attributes:
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        hyper: its hyper-parameters other than the learning rate.
        layout: names and shapes of the trained parameters (flat order).
        batches: training indices of each step ``t``.
        lrs: learning rate of each step; ``max_norms``: clipping threshold (``None``: none).
        checkpoints: sorted by step, the first at step 0.
        n_train: size of the training set the indices point into.
        seed: the user's seed, kept for reference.
    """

    optimizer: str
    hyper: dict[str, Any]
    layout: ParamLayout
    batches: tuple[Tensor, ...]
    lrs: tuple[float, ...]
    max_norms: tuple[float | None, ...]
    checkpoints: tuple[Checkpoint, ...]
    n_train: int
    seed: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.batches)

    def settings(self) -> dict[str, Any]:
        """JSON settings identifying the run (not its tensors)."""
        return {
            "optimizer": self.optimizer,
            "hyper": self.hyper,
            "layout": self.layout.to_dict(),
            "n_train": self.n_train,
            "num_steps": self.num_steps,
            "seed": self.seed,
            "checkpoints": [c.step for c in self.checkpoints],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the run to ``path`` (safetensors + JSON sidecar, atomically)."""
        tensors = {
            "batch_indices": torch.cat(self.batches).long(),
            "batch_sizes": torch.tensor([len(b) for b in self.batches], dtype=torch.long),
            "lrs": torch.tensor(self.lrs, dtype=torch.float64),
            "max_norms": torch.tensor(
                [math.nan if m is None else m for m in self.max_norms], dtype=torch.float64
            ),
        }
        for c in self.checkpoints:
            tensors[f"ckpt.{c.step}.theta"] = c.theta
            tensors.update({f"ckpt.{c.step}.{k}": v for k, v in c.state.items()})
        meta = {
            "kind": "run_record",
            **self.settings(),
            "counts": [c.count for c in self.checkpoints],
            "user": self.meta,
        }
        store.save(path, tensors, meta)


def load_run(path: str | os.PathLike) -> RunRecord:
    """Read a run written by :meth:`RunRecord.save`."""
    tensors, meta = store.load(path, expect={"kind": "run_record"})
    batches = tuple(torch.split(tensors["batch_indices"], tensors["batch_sizes"].tolist()))
    names = _STATE[meta["optimizer"]]
    ckpts = tuple(
        Checkpoint(s, tensors[f"ckpt.{s}.theta"], {k: tensors[f"ckpt.{s}.{k}"] for k in names}, c)
        for s, c in zip(meta["checkpoints"], meta["counts"], strict=True)
    )
    layout = ParamLayout(
        tuple(meta["layout"]["names"]), tuple(tuple(s) for s in meta["layout"]["shapes"])
    )
    hyper = dict(meta["hyper"])
    if "betas" in hyper:
        hyper["betas"] = tuple(hyper["betas"])
    return RunRecord(
        meta["optimizer"],
        hyper,
        layout,
        batches,
        tuple(tensors["lrs"].tolist()),
        tuple(None if math.isnan(m) else m for m in tensors["max_norms"].tolist()),
        ckpts,
        meta["n_train"],
        meta["seed"],
        meta.get("user", {}),
    )


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
        hyper = {k: (tuple(group[k]) if k == "betas" else group[k]) for k in _HYPER[kind]}
        if found not in (None, hyper) or group["lr"] != optimizer.param_groups[0]["lr"]:
            raise ValueError("optimizer: every param group must share lr and hyper-parameters")
        found = hyper
    return found


class _WithIndices(Dataset):
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
    return _WithIndices(dataset)


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
        self.hyper = _hyper(optimizer, self.kind)
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
        self.checkpoints = [self._checkpoint(0)]
        self._batch_dependent = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
        ]
        self._warned = False

    def _warn_if_not_replayable(self) -> None:
        """Warn once, at the step it happens, when a BatchNorm uses batch statistics or a
        Dropout is active: the run will not replay (the replay runs the model in eval mode,
        and :func:`check_reached` refuses it then), better known before training ends."""
        active = [
            f"{type(m).__name__} {name!r}"
            for name, m in self._batch_dependent
            if m.training or not getattr(m, "track_running_stats", True)
        ]
        if active:
            self._warned = True
            warnings.warn(
                f"Recorder: model has {', '.join(active[:3])}"
                f"{f' and {len(active) - 3} more' if len(active) > 3 else ''} in train mode "
                f"at step {len(self.batches)}: batch statistics or dropout masks are not "
                "recorded, so this run will not replay (replay and metagradients refuse it); "
                "record the loop with model.eval() or without them",
                stacklevel=3,
            )

    def _checkpoint(self, step: int) -> Checkpoint:
        theta = self.layout.flatten({k: p.detach() for k, p in self.params.items()}).clone()
        state, count = {}, 0
        for name in _STATE[self.kind]:
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
        return Checkpoint(step, theta, state, count)

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
        if _hyper(self.optimizer, self.kind) != self.hyper:
            raise ValueError("optimizer: hyper-parameters other than lr changed during the run")
        if not self._warned:
            self._warn_if_not_replayable()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), max_norm)
        self.lrs.append(float(self.optimizer.param_groups[0]["lr"]))
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
        ckpts = list(self.checkpoints)
        if ckpts[-1].step != len(self.batches):
            ckpts.append(self._checkpoint(len(self.batches)))
        run = RunRecord(
            self.kind,
            dict(self.hyper),
            self.layout,
            tuple(self.batches),
            tuple(self.lrs),
            tuple(self.max_norms),
            tuple(ckpts),
            self.n_train,
            self.seed,
            dict(meta or {}),
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


def check_reached(start: Checkpoint, end: Checkpoint, theta: Tensor) -> None:
    """Raise when ``theta``, the parameters replayed from checkpoint ``start`` through step
    ``end.step`` at the recorded weights, is not the recorded ``end.theta`` (within
    :data:`REACH_TOL` of the segment's change): the loop was not deterministic given its
    recorded batches, and anything computed from the replay would be about another run."""
    recorded = end.theta.to(theta)
    moved = float((recorded - start.theta.to(theta)).norm())
    off = float((theta - recorded).norm())
    if off == 0 or off <= REACH_TOL * moved:  # (a NaN replay is not)
        return
    raise ValueError(
        f"run: replaying steps {start.step}-{end.step} does not reach the recorded "
        f"parameters (off by {off / max(moved, 1e-300):.2g} of their change): the "
        "training loop was not deterministic given its recorded batches, e.g. an "
        "active Dropout or BatchNorm in train mode (record the loop with model.eval() "
        "or without them), random data augmentation, autocast, a loss other than "
        "task.train_loss(model, batch).mean(), or training data other than `train`"
    )


def check_replayable(model: nn.Module, task: Task, train: DataLike, run: RunRecord) -> None:
    """Replay the run's first segment at the recorded weights (:func:`check_reached`): a loop
    that was not deterministic raises here, before replays at other weights, which cannot be
    checked against the checkpoints, would describe another run."""
    replay(model, task, train, run, steps=run.checkpoints[1].step)


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

    Returns:
        ``{name: tensor}`` of the trained parameters after the last step.
    """
    x_all, y_all = as_tensors(train, "train")
    check_run(run, task, model, y_all.shape[0])
    if weights is not None and tuple(weights.shape) != (run.n_train,):
        raise ValueError(f"weights: expected shape [{run.n_train}], got {tuple(weights.shape)}")
    check_normalization(normalization)
    if steps is None:
        steps = run.num_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 < steps <= run.num_steps:
        raise ValueError(f"steps: expected an integer in [1, {run.num_steps}], got {steps!r}")
    clone = copy.deepcopy(model)
    own = dict(clone.named_parameters())
    params = [own[k] for k in run.layout.names]
    start = run.checkpoints[0]
    with torch.no_grad():
        for name, value in run.layout.unflatten(start.theta).items():
            own[name].copy_(value)
    x_all, y_all = prepare_batch((x_all, y_all), params[0])
    w_all = None if weights is None else weights.to(params[0])
    opt = _fresh_optimizer(run, params)
    _load_state(opt, params, run, start)
    checks = {c.step: c for c in run.checkpoints[1:]} if w_all is None else {}
    previous = start
    with evaluation_mode(clone):
        for step, (idx, lr, max_norm) in enumerate(
            zip(run.batches[:steps], run.lrs[:steps], run.max_norms[:steps], strict=True), 1
        ):
            opt.zero_grad()
            losses = task.train_loss(clone, (take(x_all, idx), y_all[idx]))
            if w_all is None:
                losses.mean().backward()
            else:
                batch_objective(w_all[idx], losses, normalization).backward()
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            if step in checks:
                reached = run.layout.flatten({k: own[k].detach() for k in run.layout.names})
                check_reached(previous, checks[step], reached)
                previous = checks[step]
    return {k: own[k].detach() for k in run.layout.names}
