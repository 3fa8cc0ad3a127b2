"""headwater's K-FAC/EK-FAC beside Kronfluence's and pyDVL's EK-FAC: same model, same process.

    python -m bench.ekfac_vs_peers [--problem mlp|cnn] [--mode lds|matched-ef]
                                   [--damping 1e-3] [--sweep] [--no-lds] [--output FILE]

``--mode lds`` (default): headwater K-FAC and EK-FAC with their defaults (GGN; the exact
GGN expectation ``ggn_estimator="auto"`` for the 10 logits) at absolute damping
``--damping`` and with the heuristic relative damping (``damping=None``: 0.1 x mean
eigenvalue per module, plus the weight decay), EK-FAC with one sampled label per
example, EK-FAC through the one-call API, and the heuristic damping with the weight
decay left out of the curvature (``-no-wd``: what Kronfluence's heuristic does);
``--sweep`` adds absolute dampings 0 (weight decay only), 1e-2, 3e-2, 1e-1. Then Kronfluence EK-FAC (true Fisher with sampled
labels; damping matched, and its heuristic) and pyDVL EK-FAC (loss measurement only:
its query gradients are hard-wired to the loss, so with the margin as measurement its
LDS is that of the negated scores, since the loss moves opposite to the margin; Linear
layers only).

``--mode matched-ef``: settings that truly match on both sides and are deterministic:
the empirical Fisher (headwater ``kind="ef"``, Kronfluence
``FactorArguments(use_empirical_fisher=True)``), the same damping (eigenvalues + weight
decay + ``--damping``), the same measurement; the agreement is Pearson over all
``[n_test, n_train]`` scores.

Damping: headwater adds ``weight_decay + damping`` to every eigenvalue; the peer adapters
pass ``damping + weight_decay`` as their damping (``bench/peers.py``): the same matrix.

Columns: wall time and peak RSS increase (``bench.measure``), each method measured
after one unmeasured warm-up call of the same library (so lazy imports and first-call
allocations count for nobody) and after returning freed heap pages to the OS
(``malloc_trim``), so the peak is the call's own working set, whatever ran before;
Pearson and mean per-query Spearman against Kronfluence's matched-damping scores; the LDS
(mean +- s.e. over test points) on the margin from ``bench.run.lds_quality`` (MLP: 100
random halves x 2 retrainings, cached in ``bench/.cache``) or
``bench.cnn_problem.cnn_lds_quality`` (CNN). Run it in the bench environment
(``.venv-bench``), where the peers are installed. On a loaded machine compare ratios
measured in one run, never absolute times.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import headwater
from bench.measure import measure
from bench.problems import Problem, get_problem
from bench.reference import compare
from headwater.curvature import EKFAC, KFAC
from headwater.methods.factored import factored_scores
from headwater.task import ClassificationTask

__all__ = ["headwater_factored", "main"]

CHUNK = 64  # examples per forward/backward (the library default); memory scales with it


def headwater_factored(
    problem: Problem,
    *,
    curvature: str = "ekfac",
    damping: float | None,
    measurement: str,
    chunk_size: int = CHUNK,
    weight_decay: bool = True,
    **options: Any,
) -> torch.Tensor:
    """K-FAC/EK-FAC influence ``[n_test, n_train]`` (fit + per-module scoring).
    ``weight_decay=False`` leaves the L2 term out of the curvature (then ``damping`` is the
    whole damping, as in Kronfluence's heuristic); per-example gradients never include it."""
    wd = problem.weight_decay if weight_decay else 0.0
    task = ClassificationTask(weight_decay=wd, measurement=measurement)
    train, query = (problem.X_train, problem.y_train), (problem.X_test, problem.y_test)
    cls = {"ekfac": EKFAC, "kfac": KFAC}[curvature]
    curv = cls(damping=damping, chunk_size=chunk_size, **options).fit(problem.model, task, train)
    return factored_scores(problem.model, task, curv, query, train, chunk_size=chunk_size)


def headwater_api(
    problem: Problem, *, damping: float | None, measurement: str, **options: Any
) -> torch.Tensor:
    """The same through ``headwater.influence`` (flat per-example gradients, tiled)."""
    task = ClassificationTask(weight_decay=problem.weight_decay, measurement=measurement)
    return headwater.influence(
        problem.model,
        (problem.X_train, problem.y_train),
        (problem.X_test, problem.y_test),
        task=task,
        curvature="ekfac",
        damping=damping,
        curvature_options=options or None,
    ).values


def _trim() -> None:
    """Return freed heap pages to the OS so the next RSS baseline is honest (glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _ours(
    name: str, fn: Callable[..., torch.Tensor], problem: Problem, warm: set[str], **kw: Any
) -> dict[str, Any]:
    if "headwater" not in warm:
        fn(problem, **kw)
        warm.add("headwater")
    _trim()
    scores, seconds, peak = measure(fn, problem, **kw)
    settings = {k: v for k, v in kw.items() if k != "measurement"}
    return {
        "name": name,
        "library": "headwater",
        "scores": scores,
        "seconds": seconds,
        "peak_mb": peak,
        "note": str(settings),
    }


def _peer(name: str, fn: Callable, problem: Problem, warm: set[str], **kw: Any) -> dict[str, Any]:
    library = name.split("-")[0]
    if library not in warm:
        fn(problem.model, problem, **kw)
        warm.add(library)
    _trim()
    r = fn(problem.model, problem, **kw)
    note = ", ".join(
        f"{k}={r.settings[k]}"
        for k in ("damping_factor", "peer_damping", "fisher", "measurement")
        if k in r.settings
    )
    return {
        "name": name,
        "library": library,
        "scores": r.scores,
        "seconds": r.seconds,
        "peak_mb": r.peak_mb,
        "note": "; ".join(x for x in (note, r.note) if x),
    }


def _rows(
    problem: Problem, mode: str, damping: float, measurement: str, sweep: bool
) -> tuple[list[dict[str, Any]], str]:
    """The measured rows and the name of the reference row (Kronfluence, matched)."""
    try:
        from bench import peers
    except ImportError as err:
        print(f"[bench] peers unavailable: {err}", file=sys.stderr)
        peers = None
    warm: set[str] = set()
    m = measurement
    if mode == "matched-ef":
        rows = [
            _ours(
                "headwater-ekfac-ef",
                headwater_factored,
                problem,
                warm,
                damping=damping,
                measurement=m,
                kind="ef",
            )
        ]
        if peers is not None:
            rows.append(
                _peer(
                    "kronfluence-ekfac-ef",
                    peers.kronfluence_ekfac,
                    problem,
                    warm,
                    damping=damping,
                    measurement=m,
                    empirical_fisher=True,
                )
            )
        return rows, "kronfluence-ekfac-ef"
    ours: list[tuple[str, Callable, dict[str, Any]]] = [
        ("headwater-ekfac", headwater_factored, {"damping": damping}),
        ("headwater-ekfac-heuristic", headwater_factored, {"damping": None}),
        (
            "headwater-ekfac-sampled",
            headwater_factored,
            {"damping": damping, "ggn_estimator": "sampled"},
        ),
        ("headwater-kfac", headwater_factored, {"curvature": "kfac", "damping": damping}),
        ("headwater-kfac-heuristic", headwater_factored, {"curvature": "kfac", "damping": None}),
        ("headwater-ekfac-api", headwater_api, {"damping": damping}),
        (
            "headwater-ekfac-heuristic-no-wd",
            headwater_factored,
            {"damping": None, "weight_decay": False},
        ),
        (
            "headwater-kfac-heuristic-no-wd",
            headwater_factored,
            {"curvature": "kfac", "damping": None, "weight_decay": False},
        ),
    ]
    if sweep:
        for d in (0.0, 1e-2, 3e-2, 1e-1):
            ours += [
                (f"headwater-ekfac-d{d:g}", headwater_factored, {"damping": d}),
                (f"headwater-kfac-d{d:g}", headwater_factored, {"curvature": "kfac", "damping": d}),
            ]
    rows = [_ours(name, fn, problem, warm, measurement=m, **kw) for name, fn, kw in ours]
    if peers is not None:
        rows.append(
            _peer(
                "kronfluence-ekfac",
                peers.kronfluence_ekfac,
                problem,
                warm,
                damping=damping,
                measurement=m,
            )
        )
        rows.append(
            _peer(
                "kronfluence-ekfac-heuristic",
                peers.kronfluence_ekfac,
                problem,
                warm,
                damping=damping,
                measurement=m,
                heuristic_damping=True,
            )
        )
        rows.append(
            _peer("pydvl-ekfac", peers.pydvl_ekfac, problem, warm, damping=damping, measurement=m)
        )
    return rows, "kronfluence-ekfac"


def _problem(name: str) -> tuple[Problem, Callable[[Problem, torch.Tensor], dict[str, float]]]:
    if name == "cnn":
        from bench.cnn_problem import cnn, cnn_lds_quality

        return cnn(), cnn_lds_quality
    from bench.run import lds_quality

    return get_problem(name), lds_quality


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--mode", default="lds", choices=["lds", "matched-ef"])
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--measurement", default="margin", choices=["loss", "margin"])
    parser.add_argument("--sweep", action="store_true", help="more absolute dampings")
    parser.add_argument("--no-lds", action="store_true", help="skip the LDS column")
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a loaded 2-core machine: threads only add contention
    problem, lds_quality = _problem(args.problem)
    rows, ref_name = _rows(problem, args.mode, args.damping, args.measurement, args.sweep)
    ref = next(
        (r["scores"] for r in rows if r["name"] == ref_name and r["scores"] is not None), None
    )
    title = (
        f"{args.problem}, mode {args.mode}, damping {args.damping:g} (+ weight decay "
        f"{problem.weight_decay:g}), measurement {args.measurement}; Pearson/Spearman vs "
        f"{ref_name}"
    )
    lines = [
        title,
        "",
        "| method | time (s) | peak (MiB) | LDS | Pearson vs ref | Spearman vs ref | settings |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        agree = compare(r["scores"], ref) if ref is not None else {}
        lds = ""
        if not args.no_lds and r["scores"] is not None:
            flip = "measurement=loss" in r["note"] and args.measurement == "margin"
            q = lds_quality(problem, (-1 if flip else 1) * r["scores"].detach().cpu())
            lds = f"{q['lds']:.3f} +- {q['lds_se']:.3f}"
            if flip:  # pyDVL: query gradients of the loss, which moves opposite to the margin
                lds += " (of -scores)"
        lines.append(
            f"| {r['name']} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | {lds} | "
            f"{agree.get('pearson', float('nan')):.6f} | "
            f"{agree.get('spearman', float('nan')):.4f} | {r['note']} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
