"""Matrix-free and low-rank curvatures on the digits bench problems (issue 3).

Every headwater approximation from ``curvature/{cg,lissa,arnoldi,lanczos,nystrom,
diagonal,identity}.py`` on the same trained model as ``bench.run`` (and with its
ground truths): LOO Pearson on ``logreg``, LDS on the MLP's margin. Wall time and
peak RSS increase from ``bench.measure``; damping as in ``bench.run.DAMPING``.

    python -m bench.matrix_free [--problems logreg mlp] [--only cg arnoldi-residual ...]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

import headwater
from bench.measure import measure
from bench.problems import Problem, get_problem
from bench.run import DAMPING, MEASUREMENT, quality
from headwater.task import ClassificationTask

# name -> (curvature, options); chunk sizes only change speed, never the numbers.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "exact-ggn": ("exact", {}),
    "cg": ("cg", {"tol": 1e-4, "max_iter": 100, "chunk_size": 1000}),
    "cg-nystrom100": ("cg", {"tol": 1e-4, "max_iter": 100, "chunk_size": 1000, "preconditioner_rank": 100}),
    "lissa": ("lissa", {"depth": 300, "chunk_size": 1000}),
    "arnoldi-truncated": ("arnoldi", {"rank": 100, "n_iter": 200, "residual": False, "chunk_size": 1000}),
    "arnoldi-residual": ("arnoldi", {"rank": 100, "n_iter": 200, "residual": True, "chunk_size": 1000}),
    "lanczos-residual": ("lanczos", {"rank": 100, "n_iter": 200, "residual": True, "chunk_size": 1000}),
    "lanczos-residual-300": ("lanczos", {"rank": 300, "n_iter": 400, "residual": True, "chunk_size": 1000}),
    "nystrom-residual": ("nystrom", {"rank": 100, "oversample": 20, "chunk_size": 1000}),
    "diagonal": ("diagonal", {"chunk_size": 250}),
    "identity": ("identity", {}),
}


def run_one(problem: Problem, curvature: str, options: dict[str, Any]) -> torch.Tensor:
    task = ClassificationTask(weight_decay=problem.weight_decay, measurement=MEASUREMENT[problem.name])
    return headwater.influence(problem.model, (problem.X_train, problem.y_train), (problem.X_test, problem.y_test),
                               task=task, curvature=curvature, damping=DAMPING[problem.name],
                               curvature_options=options, chunk_size=250).values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problems", nargs="+", default=["logreg", "mlp"])
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| problem | method | settings | time (s) | peak (MB) | quality |")
    print("|---|---|---|---:|---:|---|")
    for name in args.problems:
        problem = get_problem(name)
        for method, (curvature, options) in METHODS.items():
            if args.only and method not in args.only:
                continue
            if curvature == "exact" and name == "mlp":
                continue  # 17k x 17k dense: see bench.run
            try:
                scores, seconds, peak = measure(run_one, problem, curvature, options)
                q = quality(problem, scores)
            except Exception as err:  # noqa: BLE001 - a failing method is a row, not a crash
                print(f"| {name} | {method} | {options} | - | - | failed: {err} |", flush=True)
                continue
            shown = ", ".join(f"{k}={v:.4f}" for k, v in q.items())
            print(f"| {name} | {method} | {options} | {seconds:.1f} | {peak:.0f} | {shown} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
