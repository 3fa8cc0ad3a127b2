"""``make bench``: every estimator beside the reference libraries, same process, same model.

Problems (bench/problems.py, digits, 1,000 train x 200 test):
  (a) ``logreg``: L2 multinomial logistic regression (convex), quality = Pearson of
      ``score/n`` with the actual leave-one-out change of the test loss over
      100 removed examples x 200 test points (exact retraining, L-BFGS to 1e-10);
  (b) ``mlp``: 64-128-64-10 tanh MLP, quality = LDS on the correct-class margin
      (Park et al. 2023) against retrained models (``headwater.evaluate.lds``).

Every row: method, library, settings, wall time, peak RSS increase, quality. Results go
to ``bench/results.md``. A method plugs in by adding one ``Entry`` to ``ENTRIES``.

    python -m bench.run [--problems logreg mlp] [--only NAME ...] [--no-peers]
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import headwater
from bench.measure import measure
from bench.problems import CACHE_DIR, Problem, cached, get_problem
from headwater.curvature import CURVATURES
from headwater.evaluate import leave_one_out
from headwater.evaluate.lds import LDSGroundTruth, lds, lds_ground_truth
from headwater.gradients.projection import KroneckerProjection, RandomProjection
from headwater.task import ClassificationTask
from headwater.train.ensemble import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results.md"
N_LOO = 100  # removed training examples for the logreg ground truth
LDS_SUBSETS, LDS_SEEDS = 100, 2  # random halves of the training set, retrainings averaged per half

# Absolute damping λ on the mean objective (the weight decay is in the objective already);
# the same λ is given to every peer (their adapters fold the weight decay in).
DAMPING = {"logreg": 0.0, "mlp": 1e-3}
MEASUREMENT = {"logreg": "loss", "mlp": "margin"}


@dataclass(frozen=True)
class Entry:
    """One benchmarked method: ``run(problem, damping, measurement) -> scores [n_test, n_train]``."""

    name: str
    library: str
    run: Callable[[Problem, float, str], torch.Tensor]
    settings: dict[str, Any] = field(default_factory=dict)
    problems: tuple[str, ...] = ("logreg", "mlp")


def _headwater(curvature: str, options: dict[str, Any] | None = None, **kwargs: Any) -> Callable:
    options = dict(options or {})
    tuned = options.pop("damping", None)  # a method's own damping (e.g. residual low-rank forms)

    def run(problem: Problem, damping: float, measurement: str) -> torch.Tensor:
        task = ClassificationTask(weight_decay=problem.weight_decay, measurement=measurement)
        damping = damping if tuned is None else tuned
        return headwater.influence(
            problem.model,
            (problem.X_train, problem.y_train),
            (problem.X_test, problem.y_test),
            task=task,
            curvature=curvature,
            damping=damping,
            curvature_options=options,
            **kwargs,
        ).values

    return run


# name, curvature, constructor options: methods register here as they land.
HEADWATER_METHODS: list[tuple[str, str, dict[str, Any], tuple[str, ...]]] = [
    ("exact-ggn", "exact", {}, ("logreg",)),  # the MLP's dense 17k x 17k GGN: minutes and ~7 GB
    (
        "kfac",
        "kfac",
        {"ggn_estimator": "auto"},
        ("logreg", "mlp"),
    ),  # auto: exact GGN for <= 64 outputs
    ("ekfac", "ekfac", {"ggn_estimator": "auto"}, ("logreg", "mlp")),
    # matrix-free (issue 3); chunk sizes change speed only. Low-rank forms: "residual" gives the
    # discarded subspace the damping, tuned on the MLP (0.006: LDS 0.55 at 1e-3, 0.67 at 3e-3,
    # 0.72 at 6e-3, 0.71 at 1e-2, 0.63 at 3e-2 for Lanczos k=100); "truncated" is the paper's form.
    ("cg", "cg", {}, ("logreg", "mlp")),  # defaults: tol 1e-2, the Nyström preconditioner
    ("cg-ekfac", "cg", {"preconditioner": "ekfac", "tol": 0.1}, ("logreg", "mlp")),
    ("cg-nystrom200", "cg", {"preconditioner_rank": 200, "tol": 0.1}, ("logreg", "mlp")),
    # LiSSA on a fixed budget (tol 0: every step runs), preconditioned by EK-FAC as these rows
    # were measured (LiSSA's default is now the Nyström sketch, stopped at tol 1e-2)
    ("lissa", "lissa", {"preconditioner": "ekfac", "depth": 20, "tol": 0.0}, ("logreg", "mlp")),
    (
        "lissa-ekfac",
        "lissa",
        {"preconditioner": "ekfac", "depth": 8, "tol": 0.0},
        ("logreg", "mlp"),
    ),
    (
        "arnoldi-truncated",
        "arnoldi",
        {"rank": 250, "n_iter": 300, "residual": False},
        ("logreg", "mlp"),
    ),
    ("arnoldi-residual", "arnoldi", {"rank": 100, "n_iter": 150}, ("logreg",)),
    ("arnoldi-residual", "arnoldi", {"rank": 100, "n_iter": 150, "damping": 0.006}, ("mlp",)),
    (
        "lanczos-truncated",
        "lanczos",
        {"rank": 250, "n_iter": 300, "residual": False},
        ("logreg", "mlp"),
    ),
    ("lanczos-residual", "lanczos", {"rank": 100, "n_iter": 150}, ("logreg",)),
    ("lanczos-residual", "lanczos", {"rank": 100, "n_iter": 150, "damping": 0.006}, ("mlp",)),
    ("nystrom-residual", "nystrom", {"rank": 100, "oversample": 20}, ("logreg",)),
    ("nystrom-residual", "nystrom", {"rank": 100, "oversample": 20, "damping": 0.006}, ("mlp",)),
    ("diagonal", "diagonal", {}, ("logreg", "mlp")),
    ("identity", "identity", {}, ("logreg", "mlp")),
]


# Influence on projected gradients: name, projection, kind, options, problems. Flat projections
# must stay at or below P (650 for logreg); the projected GGN costs n·C·k² to accumulate.
PROJECTED_METHODS: list[tuple[str, Callable[[], Any], str, dict[str, Any], tuple[str, ...]]] = [
    ("proj-ef-256", lambda: RandomProjection(256), "ef", {}, ("logreg",)),
    (
        "proj-ef-2048",
        lambda: RandomProjection(2048),
        "ef",
        {},
        ("mlp",),
    ),  # TRAK's kernel, one model
    (
        "proj-ggn-2048",
        lambda: RandomProjection(2048),
        "ggn",
        {"ggn_estimator": "sampled"},
        ("mlp",),
    ),
    (
        "kron-ggn-16x16",
        lambda: KroneckerProjection(16, 16),
        "ggn",
        {"ggn_estimator": "exact"},
        ("logreg", "mlp"),
    ),
    (
        "kron-ggn-32x32",
        lambda: KroneckerProjection(32, 32),
        "ggn",
        {"ggn_estimator": "exact"},
        ("logreg", "mlp"),
    ),
]


def headwater_entries() -> list[Entry]:
    entries = [
        Entry(name, "headwater", _headwater(curv, opts), {"curvature": curv, **opts}, probs)
        for name, curv, opts, probs in HEADWATER_METHODS
        if curv in CURVATURES
    ]
    for name, make, kind, opts, probs in PROJECTED_METHODS:

        def run(
            problem: Problem, damping: float, measurement: str, make=make, kind=kind, opts=opts
        ):
            task = ClassificationTask(weight_decay=problem.weight_decay, measurement=measurement)
            return headwater.influence(
                problem.model,
                (problem.X_train, problem.y_train),
                (problem.X_test, problem.y_test),
                task=task,
                projection=make(),
                kind=kind,
                damping=damping,
                curvature_options=opts,
            ).values

        entries.append(
            Entry(
                name,
                "headwater",
                run,
                {"projection": make().settings(), "kind": kind, **opts},
                probs,
            )
        )
    return entries


def peer_entries() -> list[Entry]:
    """The reference libraries' methods, where they are installed (bench-only extras)."""
    try:
        peers = importlib.import_module("bench.peers")
    except ImportError as err:  # peers live in the bench environment only
        print(
            f"[bench] peers unavailable ({err}); run `make bench` to set them up", file=sys.stderr
        )
        return []

    def runner(fn: Callable) -> Callable:
        def run(problem, damping, measurement):
            result = fn(problem.model, problem, damping=damping, measurement=measurement)
            if result.scores is None:
                raise RuntimeError(result.note or "failed")
            run.note = result.note  # type: ignore[attr-defined]  # this peer's own function
            return result.scores

        return run

    return [Entry(name, name.split("-")[0], runner(fn)) for name, fn in peers.PEERS.items()]


# ------------------------------------------------------------------ ground truth
def loo_truth(problem: Problem) -> dict[str, torch.Tensor]:
    """Actual change of every test loss when each of ``N_LOO`` examples is removed."""

    def compute():
        task = ClassificationTask(weight_decay=problem.weight_decay)
        idx = torch.linspace(0, problem.n_train - 1, N_LOO).long()
        res = leave_one_out(
            problem.model,
            task,
            (problem.X_train, problem.y_train),
            (problem.X_test, problem.y_test),
            idx,
        )
        return {"indices": idx, "actual": res.actual}

    return cached(f"loo-{problem.name}-{N_LOO}", compute)


def loo_quality(problem: Problem, scores: torch.Tensor) -> dict[str, float]:
    truth = loo_truth(problem)
    predicted = scores[:, truth["indices"]].double() / problem.n_train
    r = np.corrcoef(predicted.flatten().numpy(), truth["actual"].flatten().numpy())[0, 1]
    return {"loo_pearson": float(r)}


def lds_truth(problem: Problem) -> LDSGroundTruth:
    """Margins of every test point after retraining on 100 random halves (2 seeds each),
    with the problem's own recipe (Adam, lr, epochs, batch size); stored and reused."""
    s = problem.settings
    task = ClassificationTask(weight_decay=problem.weight_decay, measurement="margin")
    config = TrainConfig(
        optimizer="adam",
        lr=s["lr"],
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        members_per_pass=100,
    )  # vmap steps cost about the same for 16 or 100 MLPs
    return lds_ground_truth(
        problem.model,
        task,
        (problem.X_train, problem.y_train),
        (problem.X_test, problem.y_test),
        n_subsets=LDS_SUBSETS,
        alpha=0.5,
        seeds_per_subset=LDS_SEEDS,
        config=config,
        store_dir=CACHE_DIR,
        progress=_print_progress,
    )


def _print_progress(stage: str, done: int, total: int) -> None:
    print(
        f"\r[bench] {stage}: {done}/{total}",
        end="\n" if done == total else "",
        file=sys.stderr,
        flush=True,
    )


def lds_quality(problem: Problem, scores: torch.Tensor) -> dict[str, float]:
    result = lds(scores, lds_truth(problem))
    return {"lds": float(result.mean), "lds_se": float(result.stderr)}


def quality(problem: Problem, scores: torch.Tensor) -> dict[str, float]:
    if not torch.isfinite(scores).all():
        return {"nonfinite": 1.0}
    if problem.name == "logreg":
        return loo_quality(problem, scores)
    return lds_quality(problem, scores)


# ------------------------------------------------------------------ running
def run(
    problems: list[str], only: list[str] | None, peers: bool, warmup: bool = False
) -> list[dict[str, Any]]:
    entries = headwater_entries() + (peer_entries() if peers else [])
    if only:
        entries = [e for e in entries if e.name in only]
    rows = []
    for pname in problems:
        problem = get_problem(pname)
        for entry in entries:
            if pname not in entry.problems:
                continue
            damping, meas = DAMPING[pname], MEASUREMENT[pname]
            print(f"[bench] {pname}: {entry.name} ...", file=sys.stderr, flush=True)
            row = {
                "problem": pname,
                "method": entry.name,
                "library": entry.library,
                "settings": {"damping": damping, **entry.settings, "measurement": meas},
            }
            try:
                if warmup:  # first calls pay imports and lazy initialisation: not timed
                    entry.run(problem, damping, meas)
                scores, seconds, peak = measure(entry.run, problem, damping, meas)
                row.update(seconds=seconds, peak_mb=peak, **quality(problem, scores.detach().cpu()))
                note = getattr(entry.run, "note", None)
                if note:
                    row["note"] = note
            except Exception as err:  # a failing method is a result, not a crash
                row.update(error=f"{type(err).__name__}: {err}"[:200])
            print(f"[bench]   {row}", file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def _fmt(row: dict[str, Any], key: str, spec: str) -> str:
    value = row.get(key)
    return "" if value is None else format(value, spec)


def write_markdown(rows: list[dict[str, Any]], path: Path = RESULTS) -> None:
    lines = [
        "# headwater benchmark results",
        "",
        f"Written by `make bench` (python -m bench.run) on {time.strftime('%Y-%m-%d')}; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Same process, same trained model for every library.",
        "Quality: `logreg` = Pearson of score/n with actual leave-one-out change of test loss "
        f"({N_LOO} removed x 200 test); `mlp` = LDS on the margin over {LDS_SUBSETS} random halves "
        f"({LDS_SEEDS} retrainings each; mean +- s.e. over test points).",
        "Peak = largest RSS increase during the call (MiB).",
        "",
        "| problem | method | library | time (s) | peak (MiB) | LOO Pearson | LDS | settings / note |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lds = f"{r['lds']:.3f} +- {r['lds_se']:.3f}" if "lds" in r else ""
        note = r.get("error") or r.get("note") or ""
        settings = json.dumps(r["settings"], default=str)
        lines.append(
            f"| {r['problem']} | {r['method']} | {r['library']} | {_fmt(r, 'seconds', '.2f')} | "
            f"{_fmt(r, 'peak_mb', '.0f')} | {_fmt(r, 'loo_pearson', '.4f')} | {lds} | "
            f"`{settings}` {note} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--problems", nargs="+", default=["logreg", "mlp"], choices=["logreg", "mlp"]
    )
    parser.add_argument("--only", nargs="+", help="method names to run")
    parser.add_argument("--no-peers", action="store_true", help="headwater only")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every method")
    parser.add_argument("--warmup", action="store_true", help="run each method once untimed first")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.problems, args.only, peers=not args.no_peers, warmup=args.warmup)
    write_markdown(rows, args.output)
    print(f"[bench] wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
