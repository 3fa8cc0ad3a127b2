"""The attribution step shared by ``demo`` and ``score``, and writing its outputs."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

import headwater
from headwater.cli.common import (
    ProgressBars,
    Timer,
    attribution_settings,
    write_config,
)
from headwater.data import DataLike
from headwater.distributed import barrier, world
from headwater.methods import Scores
from headwater.methods.registry import METHODS
from headwater.methods.tracin import Checkpoint
from headwater.report import RunResult, render, save_result, write_top_k_csv
from headwater.store import StoreMismatchError
from headwater.task import Task
from headwater.train.recorder import RunRecord
from headwater.train.sgd import Trajectory

__all__ = ["attribute", "write_outputs"]

log = logging.getLogger("headwater.cli")


def attribute(
    model: nn.Module,
    train: DataLike,
    query: DataLike,
    task: Task | None,
    args: argparse.Namespace,
    progress: ProgressBars,
    timer: Timer,
    run: RunRecord | None = None,
    trajectory: Trajectory | None = None,
    checkpoints: Sequence[Checkpoint] | None = None,
) -> Scores:
    """All scores ``[n_query, n_train]`` (and self-influence) with the chosen estimator
    (``run``, ``trajectory``, ``checkpoints``: the recorded training, as
    :func:`headwater.influence` takes it, for the methods that read it)."""
    store = None  # resumable state in the output folder
    if args.method == "influence":
        store = Path(args.out) / ("projected" if args.projection is not None else "curvature")
    elif args.method == "metagradient":
        store = Path(args.out) / "metagradient"  # the reverse pass's adjoints, by segment
    settings = attribution_settings(args, store=store)
    if "curvature" in METHODS[args.method].options:  # the curvature only where one is used
        log.info(
            "scoring with method=%s, curvature=%s (%s), damping=%s%s",
            args.method,
            args.curvature,
            args.kind,
            "auto" if args.damping is None else args.damping,
            "" if args.projection is None else f", projection={args.projection}",
        )
    else:
        log.info("scoring with method=%s", args.method)

    extra = {
        name: value
        for name, value in (("run", run), ("trajectory", trajectory), ("checkpoints", checkpoints))
        if value is not None
    }

    def compute() -> Scores:
        return headwater.influence(
            model, train, query, task=task, progress=progress, **settings.as_kwargs(), **extra
        )

    with timer("attribution"):
        try:
            scores = compute()
        except StoreMismatchError as err:  # an earlier run in this folder used other settings
            if args.read_only_store:
                raise
            log.info("refitting: %s holds a fit of other %s", store.name, ", ".join(err.keys))
            _remove_stale(store)
            scores = compute()
    progress.close()
    return scores


def _remove_stale(store: Path) -> None:
    """Delete a refused store: this rank's own files (``-rank{r}of{W}``), and the shared
    ones on rank 0 only; then wait for every rank."""
    rank, size = world()
    if size == 1:
        patterns = [f"{store.name}.*", f"{store.name}-*"]
    else:
        patterns = [f"{store.name}-*-rank{rank}of{size}.*"] + (
            [f"{store.name}.*"] if rank == 0 else []
        )
    for pattern in patterns:
        for stale in store.parent.glob(pattern):
            stale.unlink(missing_ok=True)
    barrier()


def write_outputs(
    folder: Path,
    command: str,
    args: argparse.Namespace,
    result: RunResult,
    timer: Timer,
    **extra: Any,
) -> RunResult:
    """Save results (store), the top-k CSV, the run config and (unless ``--no-report``)
    the HTML report into ``folder``; returns the result with its config attached."""
    config = write_config(
        folder, command, args, settings=result.settings, timings=timer.seconds, **extra
    )
    result = dataclasses.replace(result, config=config, timings=dict(timer.seconds))
    with timer("save"):
        store_path = save_result(folder, result)
        csv_path = write_top_k_csv(folder / "top_k.csv", result, args.top_k)
    log.info("scores: %s.safetensors; top-%d table: %s", store_path, args.top_k, csv_path)
    if args.report:
        with timer("report"):
            html = render(result, folder / "report", k=args.top_k)
        log.info("report: %s", html)
    write_config(folder, command, args, settings=result.settings, timings=timer.seconds, **extra)
    return result
