"""Wall time of influence on the bench MLP with 1 process vs several under torch.distributed.

Run: ``python -m bench.distributed_speed [--world 2] [--methods cg ekfac ...]``.
Each configuration runs ``headwater.influence`` on the digits MLP of :mod:`bench.problems`
(1,000 train x 200 test, margin) once untimed, then timed: one process with one torch
thread, and ``--world`` processes (gloo, one thread each) started together, timed from
a barrier before the call to a barrier after it. The script checks that every rank
returned the single-process scores (max relative difference) and writes a markdown
table (``bench/distributed_results.md``). Needs as many free cores as ranks.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import headwater
from bench.problems import get_problem
from headwater.gradients.projection import KroneckerProjection
from headwater.task import ClassificationTask

RESULTS = Path(__file__).resolve().parent / "distributed_results.md"

METHODS: dict[str, dict[str, Any]] = {
    "cg": {"curvature": "cg", "damping": 1e-3},  # default tol 1e-2: in float32 the ranks' summation
    # order can change the iteration CG stops at, so scores agree to about that tolerance
    "cg-tol1e-5": {"curvature": "cg", "damping": 1e-3, "curvature_options": {"tol": 1e-5}},
    "ekfac": {"curvature": "ekfac", "damping": 1e-3},
    "lissa": {
        "curvature": "lissa",
        "damping": 1e-3,
        "curvature_options": {"depth": 20, "tol": 0.0},
    },
    "kron-ggn-32x32": {
        "projection": "32x32",
        "damping": 1e-3,
        "curvature_options": {"ggn_estimator": "exact"},
    },
}


def _call(name: str) -> torch.Tensor:
    problem = get_problem("mlp")
    task = ClassificationTask(weight_decay=problem.weight_decay, measurement="margin")
    options = dict(METHODS[name])
    if "projection" in options:
        options["projection"] = KroneckerProjection(*map(int, options["projection"].split("x")))
    return headwater.influence(
        problem.model,
        (problem.X_train, problem.y_train),
        (problem.X_test, problem.y_test),
        task=task,
        **options,
    ).values


def _timed(name: str) -> tuple[torch.Tensor, float]:
    _call(name)  # warm-up: imports, lazy initialisation
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    scores = _call(name)
    if dist.is_initialized():
        dist.barrier()
    return scores, time.perf_counter() - start


def _worker(rank: int, world: int, init_file: str, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(minutes=10),
    )
    try:
        out = {name: _timed(name) for name in names}
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # leave together: gloo aborts a rank whose peer tears the group down early
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    get_problem("mlp")  # trains and caches the model once, before the ranks start
    single = {name: _timed(name) for name in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker,
            args=(args.world, str(Path(tmp) / "rendezvous"), tmp, args.methods),
            nprocs=args.world,
            start_method="spawn",
            join=True,
        )
        ranks = [
            torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(args.world)
        ]
    lines = [
        "# Influence under torch.distributed (bench/distributed_speed.py)",
        "",
        f"Written by `python -m bench.distributed_speed --world {args.world}` on {time.strftime('%Y-%m-%d')}; "
        f"torch {torch.__version__}, one thread per process, gloo. Digits MLP 64-128-64-10 "
        "(1,000 train x 200 test, margin); time of the second call (the first is a warm-up), "
        "from a barrier before to a barrier after. Max rel. diff = largest |distributed - one "
        "process| over every rank, divided by the largest |score|.",
        "",
        f"| method | 1 process (s) | {args.world} processes (s) | speed-up | max rel. diff |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in args.methods:
        scores, seconds = single[name]
        multi = max(r[name][1] for r in ranks)
        diff = max(float((r[name][0] - scores).abs().max()) for r in ranks) / float(
            scores.abs().max()
        )
        lines.append(
            f"| {name} | {seconds:.2f} | {multi:.2f} | {seconds / multi:.2f}x | {diff:.1e} |"
        )
        print(lines[-1], flush=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
