"""Damping of the low-rank residual forms chosen on held-out test points (MLP, LDS).

Run: ``python -m bench.heldout_damping``. For each method and each candidate damping the
scores of all 200 test points are computed once; the damping is chosen by the mean
per-query LDS over the even-numbered test points and reported on the odd-numbered
ones (which played no part in the choice), beside the best in-sample value (all 200,
as in ``bench/results.md``). Same model, ground truth and settings as ``bench.run``.
Writes ``bench/heldout_damping.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import headwater
from bench.problems import get_problem
from bench.run import lds_truth
from headwater.evaluate.lds import lds
from headwater.task import ClassificationTask

RESULTS = Path(__file__).resolve().parent / "heldout_damping.md"
DAMPINGS = (1e-3, 3e-3, 6e-3, 1e-2, 3e-2)
METHODS = {
    "lanczos-residual": ("lanczos", {"rank": 100, "n_iter": 150}),
    "arnoldi-residual": ("arnoldi", {"rank": 100, "n_iter": 150}),
    "nystrom-residual": ("nystrom", {"rank": 100, "oversample": 20}),
    "ekfac": ("ekfac", {"ggn_estimator": "auto"}),
}


def _mean(values: torch.Tensor) -> float:
    return float(values[~values.isnan()].mean())


def main() -> None:
    torch.set_num_threads(1)
    problem = get_problem("mlp")
    truth = lds_truth(problem)
    task = ClassificationTask(weight_decay=problem.weight_decay, measurement="margin")
    select = torch.arange(problem.X_test.shape[0]) % 2 == 0
    lines = [
        "# Damping chosen on held-out test points (bench/heldout_damping.py)",
        "",
        f"Written by `python -m bench.heldout_damping` on {time.strftime('%Y-%m-%d')}. Digits MLP, LDS on the "
        "margin (the ground truth of `bench.run`). `chosen on even`: the damping with the best mean LDS over "
        "the 100 even-numbered test points; `LDS on odd`: its mean LDS over the other 100, which took no "
        "part in the choice. `best in-sample`: the best over all 200 (the way `bench/results.md`'s tuned "
        "rows were set). Curve: mean LDS over all 200 for each damping.",
        "",
        "| method | chosen on even | LDS on odd | best in-sample (all 200) | curve |",
        "|---|---:|---:|---:|---|",
    ]
    for name, (curvature, options) in METHODS.items():
        per_query = {}
        for damping in DAMPINGS:
            scores = headwater.influence(
                problem.model,
                (problem.X_train, problem.y_train),
                (problem.X_test, problem.y_test),
                task=task,
                curvature=curvature,
                damping=damping,
                curvature_options=options,
            ).values
            per_query[damping] = lds(scores, truth).per_query
        chosen = max(DAMPINGS, key=lambda d: _mean(per_query[d][select]))
        best = max(DAMPINGS, key=lambda d: _mean(per_query[d]))
        curve = ", ".join(f"{d:g}: {_mean(per_query[d]):.3f}" for d in DAMPINGS)
        lines.append(
            f"| {name} | {chosen:g} | {_mean(per_query[chosen][~select]):.3f} | "
            f"{_mean(per_query[best]):.3f} (at {best:g}) | {curve} |"
        )
        print(lines[-1], flush=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
