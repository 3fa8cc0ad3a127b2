"""``make bench-metagradient``: exact metagradients of a recorded run vs influence and TracIn.

Data: the digits split of ``bench/problems.py`` (1,000 train x 200 test, standardised).
Each recipe trains a model from a fixed seed with the user-style loop of
:class:`headwater.train.Recorder` (checkpoint every ≈√T steps), float32, batch 50,
optimizer weight decay 1e-3 (coupled: the same L2 objective EK-FAC is given).

Quality: single-model LDS on the test loss (``headwater.evaluate.single_model_ground_truth``:
the recorded run replayed with a random 1% / 5% / 50% of the training set at weight 0,
same initialisation, order and learning rates, each batch's loss the mean over its kept
examples), ``--subsets`` replays per fraction (default 20: a short bench; the standard
error is printed).

Estimators on the same run: exact metagradient (REPLAY), its Hessian-free variant
(HYDRA's approximation), influence at headwater's default curvature (``auto``: the row
names its choice), EK-FAC and CG influence at their defaults, and TracIn over the
recorded checkpoints; with ``--peers`` (run in the bench environment, ``.venv-bench``)
Kronfluence's EK-FAC at its own damping and Captum's TracInCP beside them: no reference
library replays or differentiates a recorded run. Time: CPU time of this process
(``time.process_time``, one thread: robust to other processes on a shared machine), the
metagradient of all 200 queries as a multiple of one training run (the median of 5 runs
of the recorded loop, same dtype).
Peak memory: rise of the peak RSS (VmHWM reset through /proc/self/clear_refs) of a fresh
process computing the metagradient of the saved run (after a one-query warm-up), against
``(model + optimizer state + n_query) · P`` floats.

    python -m bench.metagradient [--recipes mlp-sgd-sharp ...] [--subsets 20] [--peers]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import headwater
from bench.cnn_problem import _build_cnn
from bench.problems import CACHE_DIR, _tensors
from headwater.evaluate import lds, single_model_ground_truth
from headwater.methods.metagradient import Metagradient
from headwater.methods.tracin import run_checkpoints
from headwater.task import ClassificationTask
from headwater.train.recorder import Recorder, RunRecord, load_run

WEIGHT_DECAY = 1e-3
FRACTIONS = (0.01, 0.05, 0.5)
RESULTS = Path(__file__).resolve().parent / "metagradient_results.md"

# name: architecture, optimizer, lr, momentum, epochs, warm-up steps (linear from 10%), decay (linear
# to 0), Adam's eps (default 1e-8), weight decay (default WEIGHT_DECAY), batch size (default 50)
RECIPES: dict[str, dict[str, Any]] = {
    "mlp-sgd-sharp": {
        "arch": "mlp",
        "opt": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "epochs": 10,
        "warmup": 0,
    },
    "mlp-sgd-smooth": {
        "arch": "mlp",
        "opt": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "epochs": 20,
        "warmup": 0,
        "decay": 1,
    },
    "mlp-sgd-smooth-const": {
        "arch": "mlp",
        "opt": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "epochs": 20,
        "warmup": 0,
    },
    "mlp-adam-sharp": {
        "arch": "mlp",
        "opt": "adam",
        "lr": 1e-2,
        "momentum": 0.0,
        "epochs": 10,
        "warmup": 0,
    },
    "mlp-adam-smooth": {
        "arch": "mlp",
        "opt": "adam",
        "lr": 1e-3,
        "momentum": 0.0,
        "epochs": 20,
        "warmup": 100,
        "decay": 1,
        "eps": 3e-4,  # chosen on held-out queries and subsets, see the results file
    },
    "cnn-sgd-sharp": {
        "arch": "cnn",
        "opt": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "epochs": 10,
        "warmup": 0,
    },
    "cnn-sgd-smooth": {
        "arch": "cnn",
        "opt": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "epochs": 20,
        "warmup": 0,
    },
    "cnn-adam-sharp": {
        "arch": "cnn",
        "opt": "adam",
        "lr": 1e-2,
        "momentum": 0.0,
        "epochs": 10,
        "warmup": 0,
    },
    "cnn-adam-smooth": {
        "arch": "cnn",
        "opt": "adam",
        "lr": 3e-3,
        "momentum": 0.0,
        "epochs": 20,
        "warmup": 100,
    },
    "mlp-adam-smooth-slow": {
        "arch": "mlp",
        "opt": "adam",
        "lr": 5e-4,
        "momentum": 0.0,
        "epochs": 30,
        "warmup": 200,
    },
}

# Models trained in train mode, each a smooth recipe above on another architecture: the
# CNN with a BatchNorm after each convolution (whose bias it cancels), evaluated in eval
# mode, and the MLP with dropout 0.1 after each hidden layer (the recorded masks are
# replayed; the ground truth keeps them: same seeds).
RECIPES.update(
    {
        "cnn-bn-sgd-smooth": {**RECIPES["cnn-sgd-smooth"], "arch": "cnn-bn"},
        "cnn-bn-adam-smooth": {**RECIPES["cnn-adam-smooth"], "arch": "cnn-bn"},
        "mlp-dropout-sgd-smooth": {**RECIPES["mlp-sgd-smooth"], "arch": "mlp-dropout"},
    }
)

# Smooth-recipe candidates, judged on held-out queries and subsets (``--select``): Adam's eps,
# step size, epochs, warm-up; "normalization" (default "mean") is the replay's batch loss.
_ADAM = {"arch": "mlp", "opt": "adam", "momentum": 0.0, "decay": 1}
CANDIDATES: dict[str, dict[str, Any]] = {
    "mlp-sgd-smooth-n": {**RECIPES["mlp-sgd-smooth"], "normalization": "n"},
    "mlp-sgd-sharp-n": {**RECIPES["mlp-sgd-sharp"], "normalization": "n"},
    "mlp-adam-smooth-eps1e-8": {**_ADAM, "lr": 1e-3, "epochs": 20, "warmup": 100},
    "mlp-adam-smooth-eps1e-4": {**_ADAM, "lr": 1e-3, "epochs": 20, "warmup": 100, "eps": 1e-4},
    "mlp-adam-smooth-eps1e-3": {**_ADAM, "lr": 1e-3, "epochs": 20, "warmup": 100, "eps": 1e-3},
    "mlp-adam-lr2e-3-eps1e-4": {**_ADAM, "lr": 2e-3, "epochs": 20, "warmup": 100, "eps": 1e-4},
    "mlp-adam-lr2e-3-eps1e-3": {**_ADAM, "lr": 2e-3, "epochs": 20, "warmup": 100, "eps": 1e-3},
    "mlp-adam-30ep-eps1e-4": {**_ADAM, "lr": 1e-3, "epochs": 30, "warmup": 100, "eps": 1e-4},
    "mlp-adam-warm200-eps1e-4": {**_ADAM, "lr": 1e-3, "epochs": 20, "warmup": 200, "eps": 1e-4},
    "mlp-adam-lr5e-4-30ep": {**_ADAM, "lr": 5e-4, "epochs": 30, "warmup": 200},
    "mlp-adam-smooth-nowarmup": {**RECIPES["mlp-adam-smooth"], "warmup": 0},
    "mlp-sgd-smooth-wd0": {**RECIPES["mlp-sgd-smooth"], "wd": 0.0},
    "mlp-sgd-smooth-wd1e-2": {**RECIPES["mlp-sgd-smooth"], "wd": 1e-2},
    "mlp-sgd-smooth-batch100": {**RECIPES["mlp-sgd-smooth"], "batch": 100, "lr": 0.02},
    "mlp-sgd-smooth-batch25": {**RECIPES["mlp-sgd-smooth"], "batch": 25, "lr": 0.005},
    "cnn-bn-sgd-lr1e-2-decay": {**RECIPES["cnn-bn-sgd-smooth"], "lr": 0.01, "decay": 1},
    "cnn-bn-adam-eps3e-4-decay": {**RECIPES["cnn-bn-adam-smooth"], "eps": 3e-4, "decay": 1},
    "cnn-bn-adam-lr1e-3-eps3e-4-decay": {
        **RECIPES["cnn-bn-adam-smooth"],
        "lr": 1e-3,
        "eps": 3e-4,
        "decay": 1,
    },
    "cnn-bn-sgd-lr2e-2-decay-30ep": {
        **RECIPES["cnn-bn-sgd-smooth"],
        "lr": 0.02,
        "decay": 1,
        "epochs": 30,
    },
}


def build(arch: str) -> nn.Module:
    if arch in ("cnn", "cnn-bn"):
        return _build_cnn(0, batch_norm=arch == "cnn-bn")
    torch.manual_seed(0)
    if arch in ("mlp", "mlp-dropout"):

        def drop() -> list[nn.Module]:
            return [nn.Dropout(0.1)] if arch == "mlp-dropout" else []

        return nn.Sequential(
            nn.Linear(64, 64),
            nn.Tanh(),
            *drop(),
            nn.Linear(64, 64),
            nn.Tanh(),
            *drop(),
            nn.Linear(64, 10),
        )
    raise ValueError(f"arch: 'mlp', 'mlp-dropout', 'cnn' or 'cnn-bn', got {arch!r}")


def train(
    recipe: dict[str, Any], x: torch.Tensor, y: torch.Tensor, task
) -> tuple[nn.Module, RunRecord]:
    """The user's loop: a shuffled order per epoch, an lr schedule, the recorder around the step."""
    model = build(recipe["arch"])
    if recipe["opt"] == "sgd":
        opt = torch.optim.SGD(
            model.parameters(),
            lr=recipe["lr"],
            momentum=recipe["momentum"],
            weight_decay=recipe.get("wd", WEIGHT_DECAY),
        )
    else:
        opt = torch.optim.Adam(
            model.parameters(),
            lr=recipe["lr"],
            eps=recipe.get("eps", 1e-8),
            weight_decay=recipe.get("wd", WEIGHT_DECAY),
        )
    batch = recipe.get("batch", 50)
    steps = recipe["epochs"] * math.ceil(x.shape[0] / batch)
    warm, decay = recipe["warmup"], recipe.get("decay", 0)

    def factor(t: int) -> float:  # linear warm-up from 10%, then (with decay) linear decay to 0
        up = min(1.0, 0.1 + 0.9 * t / warm) if warm else 1.0
        return up * (1.0 - t / steps if decay else 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    rec = Recorder(model, opt, n_train=x.shape[0], checkpoint_every=round(math.sqrt(steps)), seed=1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(recipe["epochs"]):
        for idx in torch.randperm(x.shape[0], generator=gen).split(batch):
            opt.zero_grad()
            task.train_loss(model, (x[idx], y[idx])).mean().backward()
            rec.step(idx)
            sched.step()
    return model.eval(), rec.finish()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def measured_metagradient(model, task, run, query, train) -> tuple[torch.Tensor, float]:
    """Scores and CPU seconds of the exact metagradient."""
    start = time.process_time()
    scores = Metagradient(model, task, run).scores(query, train)
    return scores, time.process_time() - start


def peak_rise(arch: str, model: nn.Module, run: RunRecord) -> float:
    """Rise of peak RSS (MiB) of the metagradient of the 200 test queries, measured in a fresh
    process (this one's heap holds earlier recipes' freed memory): the model and run are
    saved, the child loads them and the data, makes a one-query warm-up call (first-call
    code loading), resets its peak (VmHWM, /proc/self/clear_refs) and reports the rise."""
    with tempfile.TemporaryDirectory() as tmp:
        run.save(Path(tmp) / "run")
        torch.save(model.state_dict(), Path(tmp) / "model.pt")
        proc = subprocess.run(
            [sys.executable, "-m", "bench.metagradient", "--peak-of", tmp, "--arch", arch],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
    return float(proc.stdout.strip().splitlines()[-1])


def _child_peak(folder: str, arch: str) -> None:
    x, y, xq, yq = _tensors(torch.float32)
    model = build(arch)
    model.load_state_dict(torch.load(Path(folder) / "model.pt"))
    run, task = load_run(Path(folder) / "run"), ClassificationTask()
    Metagradient(model, task, run).scores((xq[:1], yq[:1]), (x, y))
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
        base = _rss_kib("VmRSS")
    except OSError:
        print("nan")
        return
    Metagradient(model, task, run).scores((xq, yq), (x, y))
    print((_rss_kib("VmHWM") - base) / 1024)


def product_flops(
    model: nn.Module, task, run: RunRecord, x, y, n_query: int
) -> tuple[float, float]:
    """``(FLOPs of the n_query Hessian-vector products of one reverse step, FLOPs of one
    training step's forward and backward on the same batch)``, counted by FlopCounterMode on
    the vmapped pullback the estimator runs and on ``torch.func.grad`` of the batch loss."""
    idx, theta = run.batches[0], run.checkpoints[-1].theta
    products, _ = Metagradient(model, task, run)._products(
        theta, x[idx], y[idx], torch.ones(len(idx)), None, 0
    )
    probe = torch.randn(8, theta.shape[0])
    with FlopCounterMode(display=False) as counter:
        products(probe)
    per_query = counter.get_total_flops() / probe.shape[0]
    params = {k: v.detach() for k, v in model.named_parameters()}
    with FlopCounterMode(display=False) as counter:
        torch.func.grad(
            lambda p: task.train_loss(
                lambda inp: torch.func.functional_call(model, p, (inp,)), (x[idx], y[idx])
            ).mean()
        )(params)
    return n_query * per_query, float(counter.get_total_flops())


def matmul_rate() -> float:
    """FLOPs per CPU second of a 1024 x 1024 float32 matrix product here (best of 3)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = math.inf
    for _ in range(3):
        start = time.process_time()
        for _ in range(10):
            a @ b
        best = min(best, (time.process_time() - start) / 10)
    return 2 * 1024**3 / best


def heldout_queries(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` digits outside the bench's train and test sets (the same split and scaling)."""
    import numpy as np
    from sklearn.datasets import load_digits

    from bench.problems import N_TEST, N_TRAIN, SPLIT_SEED

    X, Y = load_digits(return_X_y=True)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(Y))
    tr, held = perm[:N_TRAIN], perm[N_TRAIN + N_TEST :][:n]
    X = X.astype(np.float64)
    sd = X[tr].std(axis=0)
    sd[sd == 0] = 1.0
    xs = (X[held] - X[tr].mean(axis=0)) / sd
    return torch.as_tensor(xs, dtype=torch.float32), torch.as_tensor(Y[held])


def ground_truths(
    model,
    task,
    train_data,
    query,
    run,
    subsets: int,
    *,
    seed: int = 0,
    normalization: str = "mean",
    folder: str = "metagradient",
) -> dict:
    """The single-model ground truth at each of :data:`FRACTIONS` (cached in
    ``bench/.cache/<folder>``)."""
    return {
        f: single_model_ground_truth(
            model,
            task,
            train_data,
            query,
            run,
            fraction=f,
            n_subsets=subsets,
            seed=seed,
            normalization=normalization,
            store_dir=CACHE_DIR / folder,
        )
        for f in FRACTIONS
    }


def select(names: list[str], subsets: int, out: Path) -> None:
    """Exact-replay LDS of each recipe on held-out queries and subsets (seed 1; the bench's
    rows use the test queries and seed 0): the data recipes are chosen on. A table is
    appended to ``out``, row by row."""
    with out.open("a") as f:
        f.write(f"\n`python -m bench.metagradient {' '.join(sys.argv[1:])}`:\n\n")
        f.write(
            "| recipe | settings | test acc | LDS 1% | LDS 5% | LDS 50% |\n|---|---|---|---|---|---|\n"
        )
    x, y, xt, yt = _tensors(torch.float32)
    xq, yq = heldout_queries()
    task = ClassificationTask()
    for name in names:
        recipe = {**RECIPES, **CANDIDATES}[name]
        norm = recipe.get("normalization", "mean")
        model, run = train(recipe, x, y, task)
        with torch.no_grad():
            acc = float((model(xt).argmax(1) == yt).float().mean())
        scores = Metagradient(model, task, run, normalization=norm).scores((xq, yq), (x, y))
        truths = ground_truths(
            model,
            task,
            (x, y),
            (xq, yq),
            run,
            subsets,
            seed=1,
            normalization=norm,
            folder="metagradient-select",
        )
        quality = [lds(scores, truths[f]).mean for f in FRACTIONS]
        row = f"| {name} | {recipe} | {acc:.3f} | " + " | ".join(f"{q:.3f}" for q in quality) + " |"
        print(row, flush=True)
        with out.open("a") as f:
            f.write(row + "\n")


def peer_estimators(
    model: nn.Module, run: RunRecord, recipe: dict[str, Any], train, query
) -> dict[str, tuple[torch.Tensor, float]]:
    """The reference libraries where they have anything comparable (none replays a run):
    Kronfluence's EK-FAC influence as a user calls it (its own damping heuristic, the loss
    as measurement) and Captum's TracInCP over the recorded checkpoints (the same sum as
    headwater's TracIn). ``{row: (scores, CPU seconds)}``; a peer that fails is left out
    and printed."""
    from bench.extras_peers import captum_tracin_scores
    from bench.peers import kronfluence_ekfac_heuristic
    from bench.problems import Problem

    (x, y), (xq, yq) = train, query
    problem = Problem("metagradient", x, y, xq, yq, model, recipe.get("wd", WEIGHT_DECAY))
    rows = {}
    start = time.process_time()
    kron = kronfluence_ekfac_heuristic(model, problem, damping=0.0, measurement="loss")
    if kron.failed:
        print(f"kronfluence: {kron.note}", flush=True)
    else:
        rows["Kronfluence EK-FAC (peer)"] = (kron.scores, time.process_time() - start)
    start = time.process_time()
    try:
        traced = captum_tracin_scores(model, run_checkpoints(run), x, y, xq, yq)
        rows["Captum TracInCP (peer)"] = (traced, time.process_time() - start)
    except Exception as err:  # a peer failing is a result, not a crash
        print(f"captum TracInCP failed: {type(err).__name__}: {err}", flush=True)
    return rows


def timed_training(recipe: dict[str, Any], x, y, task) -> tuple[nn.Module, RunRecord, float]:
    """``(model, run, one run's CPU seconds)``: the median of 5 recorded runs after a warm-up
    (the machine may be shared)."""
    train(recipe, x, y, task)
    times = []
    for _ in range(5):
        start = time.process_time()
        model, run = train(recipe, x, y, task)
        times.append(time.process_time() - start)
    return model, run, sorted(times)[2]


def bench_recipe(
    name: str, recipe: dict[str, Any], subsets: int, peers: bool = False
) -> dict[str, Any]:
    x, y, xq, yq = _tensors(torch.float32)
    task = ClassificationTask()
    model, run, one_run = timed_training(recipe, x, y, task)
    with torch.no_grad():
        acc = float((model(xq).argmax(1) == yq).float().mean())
    scores, seconds = measured_metagradient(model, task, run, (xq, yq), (x, y))
    peak = peak_rise(recipe["arch"], model, run)
    products, step_flops = product_flops(model, task, run, x, y, xq.shape[0])
    floor = products * run.num_steps / matmul_rate() / one_run  # runs, at the matmul rate
    p = run.layout.num_params
    n_state = len(run.checkpoints[0].state)
    budget = (1 + n_state + xq.shape[0]) * p * 4 / 2**20
    estimators = {"metagradient (exact)": (scores, seconds)}
    if not (run.norms or run.rng):  # HYDRA's variant refuses them
        start = time.process_time()
        free = Metagradient(model, task, run, hessian_free=True).scores((xq, yq), (x, y))
        estimators["Hessian-free (HYDRA)"] = (free, time.process_time() - start)
    l2 = ClassificationTask(weight_decay=recipe.get("wd", WEIGHT_DECAY))
    for curvature in (None, "ekfac", "cg"):  # the default (auto), EK-FAC, CG: at their defaults
        start = time.process_time()
        found = headwater.influence(model, (x, y), (xq, yq), task=l2, curvature=curvature)
        row = {"ekfac": "EK-FAC influence", "cg": "CG influence"}.get(
            curvature, f"influence, default ({found.settings['curvature']})"
        )
        estimators[row] = (found.values, time.process_time() - start)
    start = time.process_time()
    tr = headwater.influence(
        model, (x, y), (xq, yq), task=task, method="tracin", checkpoints=run_checkpoints(run)
    ).values
    estimators["TracIn (checkpoints)"] = (tr, time.process_time() - start)
    if peers:
        estimators.update(peer_estimators(model, run, recipe, (x, y), (xq, yq)))
    truths = ground_truths(model, task, (x, y), (xq, yq), run, subsets)
    rows = []
    for est, (values, secs) in estimators.items():
        quality = [lds(values, truths[f]) for f in FRACTIONS]
        rows.append((est, [(r.mean, r.stderr) for r in quality], secs / one_run))
        print(
            f"{name:16s} {est:22s} "
            + " ".join(f"{m:.3f}±{s:.3f}" for m, s in rows[-1][1])
            + f"  {rows[-1][2]:.1f} runs",
            flush=True,
        )
    return {
        "name": name,
        "recipe": recipe,
        "acc": acc,
        "one_run": one_run,
        "seconds": seconds,
        "peak": peak,
        "floor": floor,
        "flop_ratio": products / step_flops,
        "budget": budget,
        "P": p,
        "steps": run.num_steps,
        "rows": rows,
    }


def write(results: list[dict[str, Any]], subsets: int, total: float, path: Path) -> None:
    lines = [
        "# Exact metagradients (REPLAY) vs influence: single-model LDS on the digits",
        "",
        f"`python -m bench.metagradient {' '.join(sys.argv[1:])}`, {platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s), float32, {subsets} replays per drop "
        f"fraction (LDS ± standard error over the 200 test queries), {total:.0f} s of CPU time in all. "
        "Times are CPU seconds of the process; 1-minute load average "
        f"{os.getloadavg()[0]:.1f} at the end (2 cores: above 1, another job shared the "
        "machine and every time, the training run's too, is inflated).",
        "",
        "| recipe | test acc | steps | one run (s) | estimator | LDS 1% | LDS 5% | LDS 50% | time (runs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for est, quality, runs in r["rows"]:
            cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in quality)
            lines.append(
                f"| {r['name']} | {r['acc']:.3f} | {r['steps']} | {r['one_run']:.2f} | {est} | {cells} | "
                f"{runs:.1f} |"
            )
    lines += [
        "",
        "| recipe | P | metagradient of 200 queries (s) | runs | products / training step "
        "FLOPs | floor at matmul rate (runs) | peak RSS rise (MiB) | (1 + state + 200)·P "
        "floats (MiB) | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['P']} | {r['seconds']:.1f} | {r['seconds'] / r['one_run']:.1f} | "
            f"{r['flop_ratio']:.0f} | {r['floor']:.1f} | {r['peak']:.1f} | {r['budget']:.1f} | {r['peak'] / r['budget']:.1f} |"
        )
    lines += [
        "",
        "Recipes: " + "; ".join(f"{r['name']}: {r['recipe']}" for r in results),
        "",
        "Reading: the exact metagradient is exact for each run (tests: finite differences of "
        "retraining to 1e-5 in float64), so its LDS measures how linear the run's response to "
        "dropping data is: the sharp and smooth recipe of one optimizer reach the same test "
        "accuracy, the smooth one is far more attributable. Its time is dominated by the "
        "200 batched Hessian-vector products per step (H·a and J·a from one pass: these "
        "Sequential models take the layer-by-layer R-operator pass of "
        "headwater.methods.metagradient_layers, other models autograd's vmapped reverse over "
        "reverse; chunks of at most 35 queries, fewer where a batch's activations are large: "
        "the layer pass keeps a chunk's temporaries and the adjoints within 4.5x the queries' "
        "adjoints of θ, the autograd path its temporaries within 4x). Their FLOPs per "
        "reverse step, over one training step's "
        "(FlopCounterMode), are several hundred: the time in runs is far below that only "
        "because a training step on these small layers runs at a low FLOP rate. The floor "
        "is the products' FLOPs over the whole run at this core's rate for a 1024 x 1024 "
        "matrix product, in runs: what the exact method costs if its products ran as fast as "
        "a large matrix product (small convolutions run far slower). "
        "The Hessian-free column shows the rest (replay, optimizer pullback, J·a: the layer "
        "pass's R-forward pass, or forward mode). The peak RSS rise (after a one-query warm-up call, so first-call code "
        "loading is not counted) holds the adjoints of θ and the optimizer state "
        "((1 + state)·200·P floats), a chunk's temporaries and the "
        "allocator's slack. Dropping an example leaves each batch's loss the mean over its "
        "kept examples (normalization='mean'; held-out comparison with the batch-size "
        "normalisation in bench/metagradient_selection.md).",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also Kronfluence EK-FAC and Captum TracInCP (the bench environment, .venv-bench)",
    )
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # the child of peak_rise
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument(
        "--select",
        action="store_true",
        help="held-out LDS of --recipes (also the CANDIDATES), rows appended to --out",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_of:
        _child_peak(args.peak_of, args.arch)
        return
    if args.select:
        select(args.recipes, args.subsets, Path(args.out))
        return
    start = time.process_time()
    results = [bench_recipe(name, RECIPES[name], args.subsets, args.peers) for name in args.recipes]
    if not args.no_write:
        write(results, args.subsets, time.process_time() - start, Path(args.out))


if __name__ == "__main__":
    main()
