"""Defaults that need no tuning: the damping rule, and every curvature at its defaults.

Run: ``make bench-defaults`` (``python -m bench.defaults``; one thread, ~10 minutes on a
loaded 2-core machine; the LDS ground truths of ``bench.run``/``bench.cnn_problem`` are
computed once and cached in ``bench/.cache``). Writes ``bench/defaults_results.md``.

1. **Damping rule** (``sweep``): the damping is ``c × (mean eigenvalue of the curvature)``
   (``trace(M)/P`` with the weight decay, the exact GGN diagonal's mean). For each
   ``c`` of a grid the scores of all 200 test digits are computed from one fit (the
   damping only changes the solve), the per-query LDS is taken, and ``c`` is chosen by
   the mean LDS over the even-numbered test points and reported on the odd ones, which
   took no part in the choice (never the evaluation's own ground truth).
2. **Defaults** (``defaults``): every curvature with no option given, on the digits MLP,
   the CNN and the CNN with BatchNorm and Dropout: LDS on the margin (all 200 test
   points) and wall time (fit + scores). The BatchNorm CNN's ground truth is retrained
   with its own recipe like the CNN's (50 halves x 1, BatchNorm/Dropout in training mode,
   margins in eval mode; about 5 minutes on one thread, cached).
3. **CG at its defaults** on the CNN: iterations, relative residual and time vs EK-FAC
   (EK-FAC timed after one untimed warm-up run, so neither pays the first call's set-up).
4. **Default vs best tuned** (``grid``): per curvature, the LDS at its defaults and the best
   over a small grid of its main setting (damping: 0.1-10 × its own default damping, every
   block's for K-FAC/EK-FAC; rank 25-200 for Arnoldi/Lanczos/Nyström, each at the default
   damping rule), and the gap. The
   best row is in-sample (all 200 test points): the yardstick, not a way to choose.

Sections run alone with ``python -m bench.defaults grid cg`` (default: all of them).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

import headwater
from bench.cnn_problem import _build_cnn, cnn, cnn_lds_truth
from bench.problems import (
    WEIGHT_DECAY,
    Problem,
    _load_or_train,
    _tensors,
    _train_mlp,
    mlp,
)
from bench.run import lds_truth
from headwater.curvature import CURVATURES, EKFAC, KFAC, Arnoldi, Diagonal, Exact
from headwater.evaluate.lds import lds
from headwater.methods import InfluenceFunction
from headwater.task import ClassificationTask

RESULTS = Path(__file__).resolve().parent / "defaults_results.md"
GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def _task(problem: Problem) -> ClassificationTask:
    return ClassificationTask(weight_decay=problem.weight_decay, measurement="margin")


def _data(problem: Problem):
    return (problem.X_train, problem.y_train), (problem.X_test, problem.y_test)


def _mean(values: torch.Tensor) -> float:
    return float(values[~values.isnan()].mean())


def _truth(problem: Problem):
    """The problem's retraining ground truth (cached): the CNNs 50 halves x 1 retraining
    with their own recipe (``bench.cnn_problem``), the MLP 100 x 2 (``bench.run``)."""
    return cnn_lds_truth(problem) if problem.name.startswith("cnn") else lds_truth(problem)


def _with_damping(curv, damping: float):
    """The fitted curvature with another damping (every block's, for EK-FAC)."""
    if isinstance(curv, EKFAC):
        damping = torch.full((len(curv.blocks),), damping, dtype=torch.float64)
    curv.state = dataclasses.replace(curv.state, damping=damping)
    return curv


def sweep(problem: Problem, lines: list[str]) -> None:
    """Held-out choice of ``c`` per method on one problem (see the module docs)."""
    task, (train, query) = _task(problem), _data(problem)
    truth = _truth(problem)
    even = torch.arange(problem.X_test.shape[0]) % 2 == 0
    mean_eig = float(Diagonal().fit(problem.model, task, train).state.diagonal.double().mean())
    fits = {"ekfac": EKFAC(), "arnoldi (rank 100)": Arnoldi()}
    if problem.name == "cnn":
        fits["exact"] = Exact()
    for name, curv in fits.items():
        t0 = time.perf_counter()
        est = InfluenceFunction(problem.model, task, curv).fit(train)
        per_query = {}
        for c in GRID:
            _with_damping(curv, c * mean_eig)
            per_query[c] = lds(est.scores(query, train), truth).per_query
        chosen = max(GRID, key=lambda c: _mean(per_query[c][even]))
        best = max(GRID, key=lambda c: _mean(per_query[c]))
        curve = ", ".join(f"{c:g}: {_mean(per_query[c]):.3f}" for c in GRID)
        lines.append(
            f"| {problem.name} | {name} | {mean_eig:.3g} | {chosen:g} | "
            f"{_mean(per_query[chosen][~even]):.3f} | {_mean(per_query[best]):.3f} (c={best:g}) | "
            f"{curve} | {time.perf_counter() - t0:.0f} s |"
        )
        print(lines[-1], flush=True)


def _build_bn(seed: int) -> nn.Module:
    return _build_cnn(seed, batch_norm=True, dropout=0.1)


def cnn_bn() -> Problem:
    """The CNN with BatchNorm after each convolution and Dropout (trained like ``cnn``)."""
    xtr, ytr, xte, yte = _tensors(torch.float32)
    settings = {"model": "cnn_bn", "lr": 1e-3, "epochs": 60, "batch_size": 50, "seed": 0}
    model = _load_or_train(
        "cnn_bn",
        settings,
        lambda: _build_bn(0),
        lambda m: _train_mlp(
            m,
            xtr,
            ytr,
            WEIGHT_DECAY,
            settings["epochs"],
            settings["batch_size"],
            settings["lr"],
            settings["seed"],
        ),
        use_cache=True,
    )
    return Problem("cnn_bn", xtr, ytr, xte, yte, model.eval(), WEIGHT_DECAY, settings)


def defaults(problem: Problem, lines: list[str], names: tuple[str, ...]) -> None:
    """Every curvature with no option: LDS and wall time."""
    task, (train, query) = _task(problem), _data(problem)
    truth = _truth(problem)
    for name in names:
        t0 = time.perf_counter()
        scores = headwater.influence(problem.model, train, query, task=task, curvature=name)
        seconds = time.perf_counter() - t0
        quality = f"{lds(scores.values, truth).mean:.3f}"
        damping = scores.settings.get("fitted_damping", float("nan"))
        lines.append(
            f"| {problem.name} | {name or 'None (auto)'} | {quality} | {seconds:.1f} s | {damping:.3g} | "
            f"{scores.settings.get('curvature_choice_reason', '')} |"
        )
        print(lines[-1], flush=True)


FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)
RANKS = (25, 50, 100, 200)
LOW_RANK = ("arnoldi", "lanczos", "nystrom")


def _grid_scores(problem: Problem, name: str):
    """``{setting: scores}`` over the grid of ``name``'s main setting, and the default's key."""
    task, (train, query) = _task(problem), _data(problem)
    if name in LOW_RANK:  # the default's rank follows a rule (100 or 200): its own row
        curv = CURVATURES[name]()
        default = InfluenceFunction(problem.model, task, curv).fit(train).scores(query, train)
        out = {f"default (rank {curv.rank})": default}
        for rank in RANKS:
            est = InfluenceFunction(problem.model, task, CURVATURES[name](rank=rank)).fit(train)
            out[f"rank {rank}"] = est.scores(query, train)
        return out, f"default (rank {curv.rank})"
    est = InfluenceFunction(problem.model, task, CURVATURES[name]()).fit(train)
    curv, out = est.curvature, {}
    base = curv.state.damping
    for factor in FACTORS:
        if curv.damping_in_state_only or isinstance(curv, EKFAC | KFAC):
            # every block's damping scaled (K-FAC/EK-FAC: the state holds each block's)
            curv.state = dataclasses.replace(curv.state, damping=base * factor)
        else:  # refit with that damping
            scaled = float(base) * factor
            est = InfluenceFunction(problem.model, task, CURVATURES[name](damping=scaled))
            est.fit(train)
        out[f"{factor:g} x default"] = est.scores(query, train)
    curv.state = dataclasses.replace(curv.state, damping=base)
    return out, "1 x default"


def grid(problem: Problem, lines: list[str], names: tuple[str, ...]) -> None:
    """Per curvature: LDS at its defaults, the best over the grid of its main setting, the gap."""
    truth = _truth(problem)
    for name in names:
        t0 = time.perf_counter()
        scores, default = _grid_scores(problem, name)
        quality = {k: float(lds(v, truth).mean) for k, v in scores.items()}
        best = max(quality, key=quality.get)
        curve = ", ".join(f"{k}: {q:.3f}" for k, q in quality.items())
        lines.append(
            f"| {problem.name} | {name} | {quality[default]:.3f} | {quality[best]:.3f} ({best}) | "
            f"{quality[best] - quality[default]:.3f} | {curve} | {time.perf_counter() - t0:.0f} s |"
        )
        print(lines[-1], flush=True)


HELDOUT = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def _damping_curve(problem: Problem, name: str) -> dict[float, torch.Tensor]:
    """Per-query LDS ``[200]`` at each factor of :data:`HELDOUT` x the default damping."""
    task, (train, query) = _task(problem), _data(problem)
    truth = _truth(problem)
    est = InfluenceFunction(problem.model, task, CURVATURES[name]()).fit(train)
    curv, base, out = est.curvature, est.curvature.state.damping, {}
    for factor in HELDOUT:
        if curv.damping_in_state_only:
            curv.state = dataclasses.replace(curv.state, damping=base * factor)
            scores = est.scores(query, train)
        else:
            twin = CURVATURES[name](damping=float(base) * factor)
            scores = InfluenceFunction(problem.model, task, twin).fit(train).scores(query, train)
        out[factor] = lds(scores, truth).per_query
    return out


def heldout(problems: dict[str, Problem], lines: list[str], names: tuple[str, ...]) -> None:
    """A factor on the default damping chosen by the mean LDS over the even-numbered test
    points of both problems, reported on the odd ones (which took no part in the choice)."""
    for name in names:
        curves = {k: _damping_curve(p, name) for k, p in problems.items()}
        even = torch.arange(200) % 2 == 0
        chosen = max(HELDOUT, key=lambda c: sum(_mean(v[c][even]) for v in curves.values()))
        for key, curve in curves.items():
            odd = ", ".join(f"{c:g}: {_mean(curve[c][~even]):.3f}" for c in HELDOUT)
            lines.append(
                f"| {key} | {name} | {chosen:g} | {_mean(curve[chosen][~even]):.3f} | "
                f"{_mean(curve[1.0][~even]):.3f} | {odd} |"
            )
            print(lines[-1], flush=True)


def cg_vs_ekfac(problem: Problem, lines: list[str], n_query: int = 50) -> None:
    """CG at its defaults against EK-FAC on the first ``n_query`` test points (CG's cost
    grows with the number of right-hand sides): time, iterations, residual, LDS."""
    task, (train, query) = _task(problem), _data(problem)
    query = (query[0][:n_query], query[1][:n_query])
    truth = _truth(problem)
    truth = dataclasses.replace(
        truth, actual=truth.actual[:, :n_query], per_seed=truth.per_seed[..., :n_query]
    )
    InfluenceFunction(problem.model, task, EKFAC()).fit(train).scores(query, train)  # warm-up
    for name in ("ekfac", "cg", "lissa"):
        t0 = time.perf_counter()
        est = InfluenceFunction(problem.model, task, CURVATURES[name]()).fit(train)
        values = est.scores(query, train)
        seconds = time.perf_counter() - t0
        info = getattr(est.curvature, "last_info", None)
        detail = ""
        if name == "cg":
            detail = (
                f"{info.iterations} iterations, worst relative residual "
                f"{float(info.residuals.max()):.2g}; "
            )
        elif name == "lissa":
            detail = (
                f"{info.steps} of depth {est.curvature.depth} steps, worst relative residual "
                f"{info.residual:.2g}; "
            )
        notes = est.curvature.fit_notes
        detail += "; ".join(f"{k}: {v}" for k, v in notes.items())
        lines.append(
            f"| {problem.name} | {name} | {lds(values, truth).mean:.3f} | {seconds:.1f} s | "
            f"{est.curvature.fitted_damping:.3g} | {detail} |"
        )
        print(lines[-1], flush=True)


def main() -> None:
    torch.set_num_threads(1)
    what = sys.argv[1:] or ["sweep", "defaults", "cg", "grid"]
    lines = [
        f"# Defaults (bench/defaults.py), written {time.strftime('%Y-%m-%d %H:%M')} "
        f"(sections {', '.join(what)}; any other section is from an earlier run)",
        "",
        f"One thread; load average {os.getloadavg()[0]:.1f} at start (a loaded 2-core machine: times are "
        "comparable within a run only). LDS on the margin against retraining on random halves (MLP: "
        "100 x 2, CNN and BatchNorm CNN: 50 x 1; `bench.run` / `bench.cnn_problem`). The rule each default follows and "
        "why: `headwater.curvature.defaults` and `headwater.methods.auto`.",
        "",
    ]
    problems = {"mlp": mlp(), "cnn": cnn()}
    if "sweep" in what:
        lines += [
            "## Damping rule: c × mean eigenvalue, c chosen on even test points",
            "",
            "Every method here gets the same absolute damping c × trace(M)/P (EK-FAC on every block).",
            "",
            "| problem | method | mean eig (trace/P) | c chosen on even | LDS on odd | best in-sample | "
            "curve (all 200) | time |",
            "|---|---|---:|---:|---:|---:|---|---:|",
        ]
        for problem in problems.values():
            sweep(problem, lines)
        lines.append("")
    if "defaults" in what:
        lines += [
            "## Every curvature at its defaults",
            "",
            "| problem | curvature | LDS | time | damping | choice |",
            "|---|---|---:|---:|---:|---|",
        ]
        cheap = tuple(n for n in CURVATURES if n not in ("lissa", "exact"))
        defaults(problems["mlp"], lines, (None, *cheap))  # LiSSA: 200 products of 17k params
        defaults(problems["cnn"], lines, (None, *cheap, "lissa", "exact"))
        defaults(cnn_bn(), lines, (None, *cheap, "lissa", "exact"))
        lines.append("")
    if "cg" in what:
        lines += [
            "## CG at its defaults vs EK-FAC (first 50 test digits)",
            "",
            "| problem | curvature | LDS | time | damping | solve |",
            "|---|---|---:|---:|---:|---|",
        ]
        cg_vs_ekfac(problems["cnn"], lines)
        lines.append("")
    if "grid" in what:
        lines += [
            "## Defaults vs the best of a small grid (all 200 test digits)",
            "",
            "| problem | curvature | LDS at defaults | best on the grid | gap | grid | time |",
            "|---|---|---:|---:|---:|---|---:|",
        ]
        tuned = tuple(n for n in CURVATURES if n not in ("identity", "lissa", "exact"))
        grid(problems["mlp"], lines, tuned)
        grid(problems["cnn"], lines, (*tuned, "exact"))
        lines.append("")
    if "heldout" in what:
        lines += [
            "## Held-out damping factor where the grid gap exceeds 0.02",
            "",
            "Factor on each curvature's default damping, chosen by the mean LDS over the "
            "even-numbered test digits of both problems; LDS on the odd ones.",
            "",
            "| problem | curvature | factor chosen | LDS on odd (chosen) | LDS on odd (1x) | "
            "curve on odd |",
            "|---|---|---:|---:|---:|---|",
        ]
        heldout(problems, lines, ("mfac", "nystrom"))
    RESULTS.write_text(_merged("\n".join(lines) + "\n"))
    print(f"wrote {RESULTS}")


def _sections(text: str) -> list[tuple[str, str]]:
    """``[(heading, text)]`` split at ``## `` headings (the first: the file's header)."""
    parts, current, body = [], "", []
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            parts.append((current, "".join(body)))
            current, body = line.strip(), []
        body.append(line)
    parts.append((current, "".join(body)))
    return parts


def _merged(new: str) -> str:
    """The new sections in place of the same-headed ones of the existing file (the others
    kept), so that one section can be rerun alone."""
    if not RESULTS.exists():
        return new
    fresh = dict(_sections(new))
    old = _sections(RESULTS.read_text())
    out = [fresh.pop(h) if h in fresh else body for h, body in old]
    out[0] = fresh.pop("", out[0])
    return "".join(
        out + [body if body.endswith("\n\n") else body + "\n" for body in fresh.values()]
    )


if __name__ == "__main__":
    main()
