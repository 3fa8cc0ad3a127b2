"""Memory and time on a wider model: 64-W-W-10 tanh MLP on digits (W = 1024: 1.1M parameters).

Run (bench environment, for the peers): ``python -m bench.scale [--width 1024] [--n-test 50]``.
One trained model, 1,000 train x ``n_test`` test points, one thread, every method in this process after
a warm-up call, peak = RSS increase during the call (MiB). There is no retraining ground
truth at this size: quality is the Pearson correlation of each method's scores with
headwater's EK-FAC (a consistency check, not accuracy). Writes ``bench/scale_peers_results.md``
(the 25k-200k runs are ``bench/scale_sizes.py``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import headwater
from bench.measure import measure
from bench.problems import WEIGHT_DECAY, Problem, _tensors, _train_mlp
from headwater.gradients.projection import KroneckerProjection
from headwater.task import ClassificationTask

RESULTS = Path(__file__).resolve().parent / "scale_peers_results.md"
DAMPING = 1e-3


def wide_problem(width: int, epochs: int, n_test: int) -> Problem:
    x_train, y_train, x_test, y_test = _tensors(torch.float32)
    x_test, y_test = x_test[:n_test], y_test[:n_test]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)
    )
    _train_mlp(model, x_train, y_train, WEIGHT_DECAY, epochs, 50, 1e-3, 0)
    model.eval()
    return Problem(
        f"mlp-{width}",
        x_train,
        y_train,
        x_test,
        y_test,
        model,
        WEIGHT_DECAY,
        {"width": width, "epochs": epochs},
    )


def _headwater(**options) -> Callable[[Problem], torch.Tensor]:
    def run(problem: Problem) -> torch.Tensor:
        task = ClassificationTask(weight_decay=problem.weight_decay, measurement="margin")
        return headwater.influence(
            problem.model,
            (problem.X_train, problem.y_train),
            (problem.X_test, problem.y_test),
            task=task,
            damping=DAMPING,
            **options,
        ).values

    return run


def _peer(name: str) -> Callable[[Problem], torch.Tensor]:
    def run(problem: Problem) -> torch.Tensor:
        from bench.peers import PEERS

        result = PEERS[name](problem.model, problem, damping=DAMPING, measurement="margin")
        if result.scores is None:
            raise RuntimeError(result.note or "failed")
        return result.scores

    return run


METHODS: dict[str, Callable[[Problem], torch.Tensor]] = {
    "headwater ekfac": _headwater(curvature="ekfac"),
    "headwater ekfac, query_batch=10": _headwater(curvature="ekfac", query_batch=10),
    "headwater kronecker projection 32x32": _headwater(
        projection=KroneckerProjection(32, 32), curvature_options={"ggn_estimator": "exact"}
    ),
    "headwater kronecker projection 64x64, EF": _headwater(
        projection=KroneckerProjection(64, 64), kind="ef"
    ),
    "headwater identity (gradient similarity)": _headwater(curvature="identity"),
    "kronfluence ekfac": _peer("kronfluence-ekfac"),
    "trak 1 model (damped)": _peer("trak-1model-damped"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = wide_problem(args.width, args.epochs, args.n_test)
    params = sum(p.numel() for p in problem.model.parameters())
    rows, reference = [], None
    for name, fn in METHODS.items():
        if args.only and name not in args.only:
            continue
        try:
            fn(problem)  # warm-up: imports and lazy initialisation
            scores, seconds, peak = measure(fn, problem)
            scores = scores.detach().double()
            if reference is None:
                reference = scores
            r = float(np.corrcoef(scores.flatten().numpy(), reference.flatten().numpy())[0, 1])
            rows.append(f"| {name} | {seconds:.1f} | {peak:.0f} | {r:.3f} |")
        except Exception as err:  # noqa: BLE001 - a failing method is a result
            rows.append(f"| {name} | | | failed: {type(err).__name__}: {str(err)[:120]} |")
        print(rows[-1], flush=True)
    text = [
        "# A wider model (bench/scale.py)",
        "",
        f"Written by `python -m bench.scale --width {args.width} --epochs {args.epochs} --n-test {args.n_test}` on "
        f"{time.strftime('%Y-%m-%d')}: 64-{args.width}-{args.width}-10 tanh MLP ({params:,} parameters, "
        f"float32) trained with Adam on the 1,000 digits, scored for {args.n_test} test points on the margin; "
        f"damping {DAMPING} (+ weight decay {WEIGHT_DECAY}); one thread; peak = RSS increase during the call. "
        "No retraining ground truth at this size: the last column is the Pearson correlation with the "
        "first row's scores (consistency, not accuracy).",
        "",
        "| method | time (s) | peak (MiB) | Pearson vs headwater ekfac |",
        "|---|---:|---:|---:|",
        *rows,
    ]
    args.output.write_text("\n".join(text) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
