"""headwater's EK-FAC beside Kronfluence's and pyDVL's EK-FAC: same model, same process.

    python -m bench.ekfac_vs_peers [--problem mlp] [--damping 1e-3] [--lds]

Rows: headwater EK-FAC with the damping matched to the peers (eigenvalues + weight
decay + ``damping``, exactly what the peer adapters pass as ``damping + weight_decay``),
with Kronfluence's heuristic (``damping=None``: 0.1 x mean eigenvalue per module), and
with the exact GGN factors (``ggn_estimator="exact"``, 10 backward passes per chunk);
then Kronfluence EK-FAC (matched and heuristic damping) and pyDVL EK-FAC (loss only).
Columns: wall time and peak RSS increase (``bench.measure``), agreement with
Kronfluence's matched-damping scores (Pearson of all entries, mean per-query Spearman)
and, with ``--lds``, the LDS on the margin from ``bench.run.lds_quality`` (its
retrained ground truth is cached in ``bench/.cache``; building it retrains many models).
Run it in the bench environment (``.venv-bench``), where the peers are installed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from bench.measure import measure
from bench.problems import Problem, get_problem
from bench.reference import compare
from headwater.curvature import EKFAC
from headwater.methods.factored import factored_scores
from headwater.task import ClassificationTask

__all__ = ["headwater_ekfac", "main"]


def headwater_ekfac(problem: Problem, *, damping: float | None, measurement: str,
                    chunk_size: int = 256, **options: Any) -> torch.Tensor:
    """EK-FAC influence ``[n_test, n_train]`` (fit + per-module scoring), headwater's convention."""
    task = ClassificationTask(weight_decay=problem.weight_decay, measurement=measurement)
    train, query = (problem.X_train, problem.y_train), (problem.X_test, problem.y_test)
    curv = EKFAC(damping=damping, chunk_size=chunk_size, **options).fit(problem.model, task, train)
    return factored_scores(problem.model, task, curv, query, train, chunk_size=chunk_size)


def _rows(problem: Problem, damping: float, measurement: str) -> list[dict[str, Any]]:
    rows = []
    ours = {
        "headwater-ekfac": {"damping": damping},
        "headwater-ekfac-heuristic": {"damping": None},
        "headwater-ekfac-exact-ggn": {"damping": damping, "ggn_estimator": "exact"},
    }
    for name, opts in ours.items():
        scores, seconds, peak = measure(headwater_ekfac, problem, measurement=measurement, **opts)
        rows.append({"name": name, "scores": scores, "seconds": seconds, "peak_mb": peak, "note": str(opts)})
    try:
        from bench import peers
    except ImportError as err:
        print(f"[bench] peers unavailable: {err}", file=sys.stderr)
        return rows
    for name in ("kronfluence-ekfac", "kronfluence-ekfac-heuristic", "pydvl-ekfac"):
        result = peers.PEERS[name](problem.model, problem, damping=damping, measurement=measurement)
        rows.append({"name": name, "scores": result.scores, "seconds": result.seconds,
                         "peak_mb": result.peak_mb, "note": result.note})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="mlp")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--measurement", default="margin", choices=["loss", "margin"])
    parser.add_argument("--lds", action="store_true", help="also compute the LDS (bench.run)")
    args = parser.parse_args(argv)
    problem = get_problem(args.problem)
    rows = _rows(problem, args.damping, args.measurement)
    ref = next((r["scores"] for r in rows if r["name"] == "kronfluence-ekfac"
                and r["scores"] is not None), None)
    lds_quality = None
    if args.lds:
        from bench.run import lds_quality
    print("| method | time (s) | peak (MiB) | Pearson vs kronfluence | Spearman vs kronfluence "
          "| LDS | note |\n|---|---|---|---|---|---|---|")
    for r in rows:
        agree = compare(r["scores"], ref) if ref is not None else {}
        lds = ""
        if lds_quality is not None and r["scores"] is not None:
            q = lds_quality(problem, r["scores"])
            lds = f"{q['lds']:.3f} +- {q['lds_se']:.3f}" if "lds" in q else str(q)
        print(f"| {r['name']} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | "
              f"{agree.get('pearson', float('nan')):.4f} | {agree.get('spearman', float('nan')):.4f} "
              f"| {lds} | {r['note']} |")


if __name__ == "__main__":
    main()
