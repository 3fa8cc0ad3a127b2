"""Single-model LDS: retrain one recorded run with random subsets dropped (MAGIC's protocol).

The usual LDS (:mod:`headwater.evaluate.lds`) retrains from fresh seeds, so its ground
truth mixes the effect of the data with the run-to-run noise of training. For an
estimator of one *recorded* run (:class:`~headwater.methods.metagradient.Metagradient`)
the question is what that run would have produced without some examples: each of
``n_subsets`` random subsets of ``round(fraction·n)`` examples gets weight 0 and the run
is replayed (:func:`~headwater.train.recorder.replay`: same initial parameters, same
batches in the same order, same learning rates; by default each batch's loss is the mean
over its kept examples, as rerunning the loop without the dropped ones would give;
``normalization="n"`` keeps dividing by the batch size, so that dropping half the data
also halves every step), and every query is measured. The result is an :class:`~headwater.evaluate.lds.LDSGroundTruth`
whose masks mark the *kept* examples, so :func:`~headwater.evaluate.lds.lds` scores it
unchanged. It is cached in ``store_dir`` under a key of everything that determines it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from headwater import store
from headwater.data import DataLike, as_tensors
from headwater.evaluate.lds import LDSGroundTruth, settings_key, subset_masks
from headwater.gradients.functional import bind, evaluation_mode, prepare_batch
from headwater.progress import ProgressFn, report
from headwater.task import Task
from headwater.train.ensemble import fingerprint
from headwater.train.recorder import RunRecord, check_replayable, replay
from headwater.train.steps import check_normalization

__all__ = ["run_fingerprint", "single_model_ground_truth"]


def run_fingerprint(run: RunRecord) -> str:
    """A hash of what a replay depends on: start, batches, learning rates, clipping."""
    start = run.checkpoints[0]
    return fingerprint(
        start.theta,
        *start.state.values(),
        torch.cat(run.batches),
        torch.tensor(run.lrs, dtype=torch.float64),
        torch.tensor([-1.0 if m is None else m for m in run.max_norms], dtype=torch.float64),
    )


def single_model_ground_truth(
    model: nn.Module,
    task: Task,
    train: DataLike,
    query: DataLike,
    run: RunRecord,
    *,
    fraction: float,
    n_subsets: int = 20,
    seed: int = 0,
    normalization: str = "mean",
    store_dir: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
) -> LDSGroundTruth:
    """Replay ``run`` with ``n_subsets`` random subsets of ``round(fraction·n)`` examples dropped.

    Args:
        model: the architecture of the run (not changed).
        task: the run's loss and the queries' measurement.
        train, query: the run's training data (indices of the run point into it) and the queries.
        run: the recorded run.
        fraction: share of the training set dropped, in (0, 1).
        n_subsets: number of subsets (retrainings).
        seed: seeds the subsets.
        normalization: ``"mean"`` or ``"n"``, as in :func:`~headwater.train.recorder.replay`
            (an estimator should be given the same, e.g. ``Metagradient(normalization=...)``).
        store_dir: cache folder (a rerun with the same settings loads it).
        progress: optional ``progress(stage, done, total)`` callback.

    Returns:
        :class:`~headwater.evaluate.lds.LDSGroundTruth` with ``masks`` the kept examples
        ``[n_subsets, n_train]`` and ``actual [n_subsets, n_query]``.

    Raises:
        ValueError: the recorded loop was not deterministic given its batches (its first
            segment, replayed, misses the recorded checkpoint:
            :func:`~headwater.train.recorder.check_reached`).
    """
    x_t, y_t = as_tensors(train, "train")
    x_q, y_q = as_tensors(query, "query")
    dropped = subset_masks(y_t.shape[0], n_subsets, fraction, seed)
    settings = {
        "kind": "single_model_ground_truth",
        "fraction": float(fraction),
        "n_subsets": n_subsets,
        "seed": int(seed),
        "normalization": check_normalization(normalization),
        "task": task.to_dict(),
        "run": run.settings(),
        "run_hash": run_fingerprint(run),
        "train": fingerprint(*tree_flatten((x_t, y_t))[0]),
        "query": fingerprint(*tree_flatten((x_q, y_q))[0]),
    }
    path = None if store_dir is None else Path(store_dir) / f"single-{settings_key(settings)}"
    if path is not None and store.exists(path):
        tensors, _ = store.load(path, expect=settings)
        return LDSGroundTruth(
            tensors["masks"].bool(), tensors["actual"], tensors["actual"][:, None], settings
        )
    kept = ~dropped
    check_replayable(model, task, (x_t, y_t), run)
    x_q, y_q = prepare_batch((x_q, y_q), run.checkpoints[0].theta)
    rows = []
    for j in range(n_subsets):
        params = replay(
            model,
            task,
            (x_t, y_t),
            run,
            weights=kept[j].to(run.checkpoints[0].theta.dtype),
            normalization=normalization,
        )
        with torch.no_grad(), evaluation_mode(model):
            rows.append(task.measurement(bind(model, params), (x_q, y_q)))
        report(progress, "single-model retraining", j + 1, n_subsets)
    actual = torch.stack(rows)  # [m, n_query]
    if path is not None:
        store.save(path, {"masks": kept.to(torch.uint8), "actual": actual}, settings)
    return LDSGroundTruth(kept, actual, actual[:, None], settings)
