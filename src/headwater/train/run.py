"""The record of a training run: its steps' batches, learning rates and clipping, and
checkpoints of the parameters, optimizer state and BatchNorm running statistics
(:class:`~headwater.train.recorder.Recorder` writes it; replays and metagradients read it),
saved to and loaded from the store.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from headwater import store
from headwater.gradients.flat import ParamLayout

__all__ = ["HYPER_NAMES", "STATE_NAMES", "Checkpoint", "RunRecord", "load_run", "rng_state"]

HYPER_NAMES = {  # an optimizer's hyper-parameters other than lr, as the record keeps them
    "sgd": ("momentum", "nesterov", "weight_decay"),
    "adam": ("betas", "eps", "weight_decay"),
    "adamw": ("betas", "eps", "weight_decay"),
}
STATE_NAMES = {  # its per-parameter state in a checkpoint
    "sgd": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
}


@dataclass(frozen=True)
class Checkpoint:
    """Flat parameters ``theta [P]`` and optimizer state ``{name: [P]}`` before step ``step``;
    ``count`` is Adam's step counter there (0 for SGD); ``buffers``: the running statistics
    of the BatchNorm layers trained in train mode (``{"<layer>.running_mean": ...}``)."""

    step: int
    theta: Tensor
    state: dict[str, Tensor]
    count: int = 0
    buffers: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRecord:
    """A recorded training run (:mod:`headwater.train.recorder`).

    Attributes:
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        hyper: its hyper-parameters other than the learning rate.
        layout: names and shapes of the trained parameters (flat order).
        batches: training indices of each step ``t``.
        lrs: learning rate of each step; ``max_norms``: clipping threshold (``None``: none).
        checkpoints: sorted by step, the first at step 0.
        n_train: size of the training set the indices point into.
        seed: the user's seed, kept for reference.
        norms: the BatchNorm layers the run trained in train mode (batch statistics;
            :mod:`headwater.train.norms`), whose running statistics the checkpoints hold.
        modes: the modules in train mode in the forward passes that drew random numbers
            (dropout; :meth:`modes_at`).
        rng: torch's CPU random state before each step's forward pass that drew from it
            (``{step: state}``): a replay restores it, so every dropout mask is the run's.
        varying: the hyper-parameters a scheduler changed during the run (OneCycleLR's and
            CyclicLR's momentum or betas): ``{name: value at each step}``; ``hyper`` holds
            the first step's values (:meth:`hyper_at`).
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
    norms: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()
    rng: dict[int, Tensor] = field(default_factory=dict)
    varying: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, values in self.varying.items():
            if name not in self.hyper or len(values) != len(self.batches):
                raise ValueError(
                    f"varying: {name!r} needs one value per step ({len(self.batches)}) of a "
                    f"hyper-parameter in {sorted(self.hyper)}"
                )

    @property
    def num_steps(self) -> int:
        return len(self.batches)

    def modes_at(self, step: int) -> set[str]:
        """The modules a replay runs in train mode at ``step`` (all others in eval mode): the
        BatchNorm layers trained in train mode, and if the step drew random numbers, every
        module that was in train mode then."""
        return {*self.norms, *(self.modes if step in self.rng else ())}

    def hyper_at(self, step: int) -> dict[str, Any]:
        """The optimizer's hyper-parameters other than the learning rate at ``step``."""
        return {**self.hyper, **{k: v[step] for k, v in self.varying.items()}}

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
            **({"norms": list(self.norms)} if self.norms else {}),
            **({"modes": list(self.modes), "random_steps": len(self.rng)} if self.rng else {}),
            **({"varying": sorted(self.varying)} if self.varying else {}),
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
        if self.rng:
            tensors["rng_steps"] = torch.tensor(sorted(self.rng), dtype=torch.long)
            tensors["rng_states"] = torch.stack([self.rng[t] for t in sorted(self.rng)])
        for name, values in self.varying.items():  # betas: [T, 2]
            tensors[f"hyper.{name}"] = torch.tensor(values, dtype=torch.float64)
        for c in self.checkpoints:
            tensors[f"ckpt.{c.step}.theta"] = c.theta
            tensors.update({f"ckpt.{c.step}.{k}": v for k, v in c.state.items()})
            tensors.update({f"ckpt.{c.step}.buffer.{k}": v for k, v in c.buffers.items()})
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
    names = STATE_NAMES[meta["optimizer"]]

    def buffers(step: int) -> dict[str, Tensor]:
        prefix = f"ckpt.{step}.buffer."
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    ckpts = tuple(
        Checkpoint(
            s,
            tensors[f"ckpt.{s}.theta"],
            {k: tensors[f"ckpt.{s}.{k}"] for k in names},
            c,
            buffers(s),
        )
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
        tuple(meta.get("norms", ())),
        tuple(meta.get("modes", ())),
        dict(zip(tensors["rng_steps"].tolist(), tensors["rng_states"], strict=True))
        if "rng_steps" in tensors
        else {},
        {
            name: tuple(
                tuple(v) if isinstance(v, list) else v for v in tensors[f"hyper.{name}"].tolist()
            )
            for name in meta.get("varying", ())
        },
    )


def rng_state(run: RunRecord, step: int) -> Tensor | None:
    """torch's CPU random state before the forward pass of ``step`` (a fresh tensor, for
    ``torch.set_rng_state``), or None when that step drew no random numbers. A state that
    is not one raises a ValueError naming the run."""
    state = run.rng.get(step)
    if state is None:
        return None
    like = torch.get_rng_state()
    if state.dtype != like.dtype or state.shape != like.shape:
        raise ValueError(
            f"run: the random state of step {step} is not one of torch's CPU generator "
            f"(expected {like.dtype} {tuple(like.shape)}, got {state.dtype} {tuple(state.shape)})"
        )
    state = state.clone()  # not a view: the generator reads from the storage's start
    with torch.random.fork_rng(devices=[]):
        try:
            torch.set_rng_state(state)
        except RuntimeError as error:
            raise ValueError(f"run: the random state of step {step} is damaged ({error})") from None
    return state
