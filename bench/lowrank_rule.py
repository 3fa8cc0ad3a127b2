"""Why the low-rank defaults trail their best rank, and which rule closes the gap.

Run: ``python -m bench.lowrank_rule`` (one thread, ~5 minutes; the LDS ground truths
of ``bench.run``/``bench.cnn_problem`` cached in ``bench/.cache``). Writes
``bench/lowrank_rule.md``.

For each problem (digits MLP and CNN) and each low-rank fit (Arnoldi and Nyström at a
few ranks, iteration counts and sketch sizes), the per-example gradients are formed once
and the scores of every solve variant are built from the fitted ``U, l``:

    kept(λ₁) = Q U diag(1/(l + λ₁)) Uᵀ Gᵀ,  rest(λ₂) = (Q Gᵀ − Q U Uᵀ Gᵀ)/(μ + λ₂)

(``μ`` the weight decay). ``λ_full`` is the dense solve's default damping,
3 × trace(M)/P (the exact GGN diagonal's mean with the weight decay), and ``l_k`` the
smallest kept eigenvalue. Every variant is chosen on the even-numbered test digits and
reported on the odd ones (``even`` / ``odd`` columns); ``all`` is all 200.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from bench.cnn_problem import cnn
from bench.defaults import _mean, _task, _truth
from bench.problems import mlp
from headwater.curvature import CURVATURES, Diagonal
from headwater.curvature.defaults import DEFAULT_RELATIVE_DAMPING
from headwater.evaluate.lds import lds
from headwater.gradients.per_example import Objective, per_example_gradients
from headwater.methods import InfluenceFunction

RESULTS = Path(__file__).resolve().parent / "lowrank_rule.md"

FIT_SETS = {
    "krylov": {  # rank and steps of Arnoldi
        "arnoldi r100 (n_iter 200)": ("arnoldi", {"rank": 100}),
        "arnoldi r200 (n_iter 400)": ("arnoldi", {"rank": 200}),
        "arnoldi r100 (n_iter 400)": ("arnoldi", {"rank": 100, "n_iter": 400}),
        "arnoldi r300 (n_iter 600)": ("arnoldi", {"rank": 300}),
    },
    "sketch": {  # rank and sketch size of Nyström, no power iteration
        "nystrom r100 (sketch 110)": ("nystrom", {"rank": 100, "power_iters": 0}),
        "nystrom r100 (sketch 200)": (
            "nystrom",
            {"rank": 100, "oversample": 100, "power_iters": 0},
        ),
        "nystrom r200 (sketch 210)": ("nystrom", {"rank": 200, "power_iters": 0}),
        "nystrom r190 (sketch 200)": ("nystrom", {"rank": 190, "power_iters": 0}),
        "nystrom r400 (sketch 410)": ("nystrom", {"rank": 400, "power_iters": 0}),
    },
    "power": {  # Nyström with subspace iteration
        "nystrom r100 (sketch 110, q 1)": ("nystrom", {"rank": 100, "power_iters": 1}),
        "nystrom r100 (sketch 110, q 2)": ("nystrom", {"rank": 100, "power_iters": 2}),
        "nystrom r200 (sketch 210, q 1)": ("nystrom", {"rank": 200, "power_iters": 1}),
        "nystrom r200 (sketch 210, q 2)": ("nystrom", {"rank": 200, "power_iters": 2}),
        "nystrom r300 (sketch 310, q 1)": ("nystrom", {"rank": 300, "power_iters": 1}),
    },
}


def _grads(problem, task, data, objective):
    return torch.cat(list(per_example_gradients(problem.model, task, data, objective=objective)))


def _variants(l_k: float, full: float, own: float) -> dict[str, tuple[float, float]]:
    """``{name: (λ₁ kept, λ₂ rest)}``."""
    out = {
        "default (own rule)": (own, own),
        "l_k": (l_k, l_k),
        "λ_full": (full, full),
        "max(l_k, λ_full)": (max(l_k, full), max(l_k, full)),
        "kept λ_full, rest l_k": (full, l_k),
        "kept λ_full, rest l_k + λ_full": (full, l_k + full),
    }
    for c in (0.3, 1.0, 3.0, 10.0):
        out[f"both {c:g} × l_k"] = (c * l_k, c * l_k)
    return out


def run(problem, lines: list[str], fits: dict[str, tuple[str, dict]]) -> None:
    task = _task(problem)
    train, query = (problem.X_train, problem.y_train), (problem.X_test, problem.y_test)
    truth = _truth(problem)
    even = torch.arange(problem.X_test.shape[0]) % 2 == 0
    G = _grads(problem, task, train, Objective.TRAIN).double()
    Q = _grads(problem, task, query, Objective.MEASUREMENT).double()
    QG = Q @ G.T
    mu = problem.weight_decay
    mean_eig = float(Diagonal().fit(problem.model, task, train).state.diagonal.double().mean())
    full = DEFAULT_RELATIVE_DAMPING * mean_eig
    lines.append(f"\n### {problem.name}: trace/P {mean_eig:.3g}, λ_full {full:.3g}, μ {mu:g}\n")
    lines.append(
        "| fit | time | l at 25/50/100/150/200/300 | #l > λ_full | variant | all | even | odd |"
    )
    lines.append("|---|---:|---|---:|---|---:|---:|---:|")
    for label, (name, kwargs) in fits.items():
        t0 = time.perf_counter()
        curv = CURVATURES[name](**kwargs)
        est = InfluenceFunction(problem.model, task, curv).fit(train)
        seconds = time.perf_counter() - t0
        reference = est.scores(query, train)
        eig = curv.state.eigvals.double()
        U = curv.state.eigvecs.double()
        Qc, Gc = Q @ U.T, G @ U.T
        within = Qc @ Gc.T
        l_k = float(eig.abs().min())
        spectrum = "/".join(
            f"{float(eig[i - 1]):.3g}" if i <= eig.numel() else "-"
            for i in (25, 50, 100, 150, 200, 300)
        )
        count = int((eig > full).sum())

        def scores(lam1, lam2, eig=eig, Qc=Qc, Gc=Gc, within=within) -> torch.Tensor:
            return (Qc / (eig + lam1)) @ Gc.T + (QG - within) / (mu + lam2)

        own = curv.state.damping
        check = scores(own, own)
        sign = float(torch.sign((check * reference.double()).sum()))
        err = float((sign * check - reference.double()).abs().max() / reference.abs().max())
        first = True
        best = None
        for vname, (lam1, lam2) in _variants(l_k, full, own).items():
            pq = lds(sign * scores(lam1, lam2), truth).per_query
            row = (_mean(pq), _mean(pq[even]), _mean(pq[~even]))
            if best is None or row[1] > best[1][1]:
                best = (vname, row)
            head = f"{label} | {seconds:.1f} s | {spectrum} | {count}" if first else " | | |"
            lines.append(f"| {head} | {vname} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} |")
            first = False
        lines.append(
            f"| | | | | best on even: {best[0]} (rebuilt scores vs library: {err:.1e}) | | | |"
        )
        print("\n".join(lines[-12:]), flush=True)


def main() -> None:
    torch.set_num_threads(1)
    sets = sys.argv[1:] or list(FIT_SETS)
    lines = [
        f"# Low-rank defaults: rank, iterations, damping ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"`python -m bench.lowrank_rule {' '.join(sets)}`; one thread. Variants: see the module "
        "docs of bench/lowrank_rule.py ('default (own rule)' is the library's damping at the time "
        "of the run; every other row is independent of it).",
    ]
    fits = {k: v for name in sets for k, v in FIT_SETS[name].items()}
    for problem in (mlp(), cnn()):
        run(problem, lines, fits)
        RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
