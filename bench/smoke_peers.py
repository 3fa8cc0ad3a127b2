"""Smoke test + conversion check of every peer adapter on the convex logreg problem.

    .venv-bench/bin/python -m bench.smoke_peers            # everything (~15-30 min, 2 cores)
    .venv-bench/bin/python -m bench.smoke_peers --fast     # LiSSA with 200 steps
    .venv-bench/bin/python -m bench.smoke_peers --no-checks --only pydvl-cg,captum-naive

1. Main table: every adapter in ``bench.peers.PEERS`` on logreg (float64), LOSS
   measurement, tiny damping (the L2 term already makes H positive definite), against
   ``bench.reference.exact_scores``: seconds, peak RSS increase, Pearson, scale ratio
   (least-squares slope through the origin: 1 = same sign and scale), mean per-query
   Spearman.
2. Conversion checks (unless ``--no-checks``), each against the matching exact quantity,
   so that approximation error does not hide a sign/scale error:
   - margin measurement, exact peers vs. exact margin scores (and the EK-FAC peers at
     the large damping below, their margin paths being their own);
   - approximate-curvature peers (EK-FAC, LiSSA) at a large damping (1.0 >> top
     eigenvalue ~0.12): (H + lambda I)^{-1} is then dominated by 1/lambda, so every correct
     conversion gives ratio ~1 whatever the quality of its curvature approximation;
   - Arnoldi peers vs. the exact rank-k truncated inverse (top-k eigenpairs);
   - TRAK (its kernel is not H) vs. its own formula in float64 with its own projection
     matrix, both measurements: ``grad m(q)^T Pi (Pi^T G Pi + P (lambda_reg/n) I)^{-1}
     Pi^T grad l(i)``, ``G`` the mean Gram of the margin gradients.

Exit status 1 if an exact peer (Captum Naive, pyDVL CG, dattri CG) misses
Pearson > 0.99 with |ratio - 1| < 0.02 in the main table or the margin check, or a
conversion check misses Pearson > 0.95 with |ratio - 1| < 0.1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri/kronfluence progress bars

import torch

from bench import peers as P
from bench.problems import logreg
from bench.reference import compare, exact_scores, per_example_grads

EXACT_PEARSON, EXACT_RATIO_TOL = 0.99, 0.02
CHECK_PEARSON, CHECK_RATIO_TOL = 0.95, 0.10


def _fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _row(r: P.PeerResult, c: dict, check: str = "") -> str:
    return (
        f"| {r.name:28s} | {r.version:8s} | {r.measurement:6s} | {_fmt(r.seconds, '8.2f')} "
        f"| {_fmt(r.peak_mb, '8.1f')} | {_fmt(c['pearson'], '8.5f')} | "
        f"{_fmt(c['ratio'], '7.4f')} | {_fmt(c['spearman'], '6.3f')} | {check:4s} | {r.note}"
    )


HEADER = (
    "| method                       | version  | meas.  |  seconds |  peak MB |  Pearson "
    "|   ratio | Spear. | ok   | note\n|"
    + "-" * 30
    + "|"
    + "-" * 10
    + "|"
    + "-" * 8
    + "|"
    + "-" * 10
    + "|"
    + "-" * 10
    + "|"
    + "-" * 10
    + "|"
    + "-" * 9
    + "|"
    + "-" * 8
    + "|"
    + "-" * 6
    + "|------"
)


def trak_reference(prob, settings: dict, measurement: str) -> torch.Tensor:
    """What the TRAK adapter must return, computed independently in float64 (per-example
    gradients by autograd) but with TRAK's own projection matrix (its ``BasicProjector``
    applied to the identity): ``grad m(q)^T Pi (Pi^T G Pi + P (lambda_reg/n) I_k)^{-1}
    Pi^T grad l(i)`` with ``G`` the mean Gram of the training margin gradients."""
    from trak.projectors import BasicProjector, ProjectionType

    model = prob.model
    Gf = per_example_grads(model, prob.X_train, prob.y_train, "margin").double()
    Gl = per_example_grads(model, prob.X_train, prob.y_train, "loss").double()
    Gq = per_example_grads(model, prob.X_test, prob.y_test, measurement).double()
    n, p = Gf.shape
    k = settings["proj_dim"]
    proj = BasicProjector(
        grad_dim=p,
        proj_dim=k,
        seed=settings["seed"],
        proj_type=ProjectionType.normal,
        device="cpu",
        dtype=torch.float32,
    )
    Pi = proj.project(torch.eye(p), model_id=0).double()  # [P, k]
    Ff = Gf @ Pi
    A = Ff.T @ Ff / n + p * settings["lambda_reg"] / n * torch.eye(k, dtype=Pi.dtype)
    return (Gq @ Pi) @ torch.linalg.solve(A, (Gl @ Pi).T)


def _ok(c: dict, pearson_min: float, ratio_tol: float) -> bool:
    return (
        not math.isnan(c["pearson"])
        and c["pearson"] > pearson_min
        and abs(c["ratio"] - 1.0) < ratio_tol
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--damping", type=float, default=1e-6, help="damping on top of the L2 term (default 1e-6)"
    )
    ap.add_argument(
        "--check-damping",
        type=float,
        default=1.0,
        help="large damping for the EK-FAC/LiSSA conversion check",
    )
    ap.add_argument("--only", default="", help="comma-separated peer names")
    ap.add_argument("--no-checks", action="store_true", help="main table only")
    ap.add_argument("--json", default="", help="write all numbers to this JSON file")
    ap.add_argument(
        "--fast", action="store_true", help="LiSSA with 200 instead of 1000 steps in the main table"
    )
    args = ap.parse_args(argv)

    names = [n for n in args.only.split(",") if n] or list(P.PEERS)
    unknown = [n for n in names if n not in P.PEERS]
    if unknown:
        ap.error(f"unknown peers {unknown}; known: {list(P.PEERS)}")

    t0 = time.perf_counter()
    prob = logreg()  # float64, ||grad|| < 1e-10
    model = prob.model
    print(
        f"# logreg: n_train={prob.n_train} n_test={prob.n_test} dtype={prob.dtype} "
        f"test acc={prob.test_accuracy():.3f} ||grad||={prob.grad_norm():.1e} "
        f"weight_decay={prob.weight_decay} damping={args.damping}"
    )
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}")
    ref = exact_scores(prob, damping=args.damping, measurement="loss")

    out = {"damping": args.damping, "main": [], "checks": []}
    failures = []

    print("\n## 1. loss measurement vs. exact dense reference\n")
    print(HEADER)
    results = {}
    for n in names:
        extra = {}
        if args.fast:
            extra = {"pydvl-lissa": {"maxiter": 200}, "dattri-lissa": {"recursion_depth": 200}}.get(
                n, {}
            )
        r = P.PEERS[n](model, prob, damping=args.damping, measurement="loss", **extra)
        c = compare(r.scores, ref)
        results[n] = r
        flag = ""
        if n in P.EXACT_PEERS:
            good = _ok(c, EXACT_PEARSON, EXACT_RATIO_TOL)
            flag = "PASS" if good else "FAIL"
            if not good:
                failures.append(f"{n}: main table {c}")
        print(_row(r, c, flag), flush=True)
        out["main"].append(
            dict(
                name=r.name,
                library=r.library,
                version=r.version,
                seconds=r.seconds,
                peak_mb=r.peak_mb,
                note=r.note,
                settings=r.settings,
                **c,
            )
        )

    if not args.no_checks:
        print("\n## 2. conversion checks\n")
        print(HEADER)
        checks = []
        # margin: exact peers at the tiny damping; peers whose margin path is an adapter
        # trick (pyDVL's target-offset loss) also through EK-FAC at the large damping
        ex = [n for n in names if n in P.EXACT_PEERS]
        if ex:
            ref_m = exact_scores(prob, damping=args.damping, measurement="margin")
            checks += [
                ("margin", n, ref_m, {"damping": args.damping, "measurement": "margin"}) for n in ex
            ]
        big = [
            n
            for n in names
            if n in ("kronfluence-ekfac", "pydvl-ekfac", "pydvl-lissa", "dattri-lissa")
        ]
        if big:
            ref_b = exact_scores(prob, damping=args.check_damping, measurement="loss")
            # at this damping LiSSA contracts by ~1/3 per step: 200 steps are plenty
            short = {"pydvl-lissa": {"maxiter": 200}, "dattri-lissa": {"recursion_depth": 200}}
            checks += [
                (
                    f"damping={args.check_damping}",
                    n,
                    ref_b,
                    dict(damping=args.check_damping, measurement="loss", **short.get(n, {})),
                )
                for n in big
            ]
        # EK-FAC peers' margin paths are their own (kronfluence's compute_measurement,
        # pyDVL EK-FAC's replaced .loss); the others share their CG sibling's path.
        ek = [n for n in names if n in ("kronfluence-ekfac", "pydvl-ekfac")]
        if ek:
            ref_bm = exact_scores(prob, damping=args.check_damping, measurement="margin")
            checks += [
                (
                    f"margin, damping={args.check_damping}",
                    n,
                    ref_bm,
                    {"damping": args.check_damping, "measurement": "margin"},
                )
                for n in ek
            ]
        arn = [n for n in names if n.endswith("arnoldi")]
        for n in arn:
            k = {
                "pydvl-arnoldi": "rank",
                "captum-arnoldi": "projection_dim",
                "dattri-arnoldi": "proj_dim",
            }[n]
            rank = results[n].settings[k]
            ref_k = exact_scores(prob, damping=args.damping, measurement="loss", rank=rank)
            checks.append(
                (
                    f"rank-{rank} truncated",
                    n,
                    ref_k,
                    {"damping": args.damping, "measurement": "loss"},
                )
            )
        # TRAK: its own kernel, recomputed with its own projection (settings as run above)
        for n in [n for n in names if n.startswith("trak-")]:
            checks += [
                (
                    f"TRAK formula, {m}",
                    n,
                    trak_reference(prob, results[n].settings, m),
                    {"damping": args.damping, "measurement": m},
                )
                for m in ("loss", "margin")
            ]
        for what, n, rref, kw in checks:
            r = P.PEERS[n](model, prob, **kw)
            c = compare(r.scores, rref)
            good = _ok(c, CHECK_PEARSON, CHECK_RATIO_TOL)
            if n in P.EXACT_PEERS:
                good = _ok(c, EXACT_PEARSON, EXACT_RATIO_TOL)
            if not good:
                failures.append(f"{n}: check {what}: {c}")
            r.note = f"[{what}] {r.note}".strip()
            print(_row(r, c, "PASS" if good else "FAIL"), flush=True)
            out["checks"].append(
                dict(
                    check=what, name=r.name, seconds=r.seconds, peak_mb=r.peak_mb, note=r.note, **c
                )
            )

    print(f"\n# total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
