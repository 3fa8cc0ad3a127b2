"""Scale: 25k to 200k training examples x 100 queries on a 1.1M-parameter MLP, one thread.

Run: ``make bench-scale`` (``python -m bench.scale_sizes``; about 15 minutes). Synthetic
64-dimensional digit-like inputs (8x8 images: smooth random strokes, standardised)
labelled by a fixed random teacher network, so nothing is downloaded; a 64-1024-1024-10
tanh MLP (1,126,410 parameters, float32) trained once with Adam on the 200k examples;
``n`` training examples are the first ``n`` of them. Each (method, n) runs in a fresh
subprocess, so its peak RSS (``ru_maxrss``) is its own; the store goes to a temporary
folder whose size on disk is reported. Methods: EK-FAC with low-rank queries (rank
``--rank``) and the Kronecker projection 32x32, both top-10 (proponents and opponents),
both with the GGN from one sampled label per example (``ggn_estimator="sampled"``): the
exact expectation over the 10 classes costs 10 backward passes per example and was
measured at 3 ms per example for EK-FAC's fit at 25k (30x the floor).

Per run: wall time (fit + scores), peak RSS, the planner's prediction
(:func:`headwater.plan.plan` with ``top_k=True``: the process's resident memory when
it plans plus the method's stored + working bytes; for time, the method's passes over
the data (:data:`PASSES`) priced at the measured gradient floor), and the *gradient floor*: one batched
forward+backward (parameter gradients of the summed loss) per chunk of 64 on the same
training batches, the least any per-example method can cost. Writes
``bench/scale_results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

RESULTS = Path(__file__).resolve().parent / "scale_results.md"
SIZES = (25_000, 50_000, 100_000, 200_000)
N_QUERY, TOP_K, CHUNK, WIDTH, WEIGHT_DECAY = 100, 10, 64, 1024, 1e-3
METHODS = ("ekfac", "kronecker")
PASSES = {"ekfac": 3, "kronecker": 2}
"""Passes over the training data (EK-FAC: factors, correction, scores; the projection: its
features, its GGN), priced at the gradient floor: the time estimate the plan implies."""


def student() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 10)
    )


def digit_like(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 8x8 "digits" ``[n, 64]`` (a few random strokes through a blur, standardised) and
    the labels a fixed random teacher (64-32-10 tanh, seed 0) gives them."""
    g = torch.Generator().manual_seed(seed)
    teacher_g = torch.Generator().manual_seed(0)
    w1 = torch.randn(64, 32, generator=teacher_g) / 8
    w2 = torch.randn(32, 10, generator=teacher_g) / 32**0.5
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    xs, ys = [], []
    for start in range(0, n, 50_000):  # in chunks: no transient larger than the result
        m = min(50_000, n - start)
        strokes = (torch.rand(m, 1, 8, 8, generator=g) < 0.18).float()
        img = torch.nn.functional.conv2d(strokes, kernel.view(1, 1, 3, 3), padding=1)
        x = ((img.flatten(1) - 0.1) / 0.12).clamp(-2, 4)
        xs.append(x)
        ys.append((torch.tanh(x @ w1) @ w2).argmax(1))
    return torch.cat(xs), torch.cat(ys)


def train_student(path: Path, n: int) -> None:
    torch.manual_seed(0)
    model = student()
    x, y = digit_like(n, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY)
    for _ in range(2):
        order = torch.randperm(n)
        for i in range(0, n, 256):
            idx = order[i : i + 256]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    xq, yq = digit_like(N_QUERY, seed=2)
    accuracy = float((model(xq).argmax(1) == yq).float().mean())
    save_file(dict(model.state_dict()), str(path))
    print(f"student trained on {n} examples, query accuracy {accuracy:.2f}", flush=True)


def _rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _disk(folder: Path) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def gradient_floor(model: nn.Module, train) -> float:
    """Seconds of one batched forward+backward per chunk of ``CHUNK`` over ``train``."""
    x, y = train
    start = time.perf_counter()
    for i in range(0, x.shape[0], CHUNK):
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(
            model(x[i : i + CHUNK]), y[i : i + CHUNK], reduction="sum"
        )
        loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def child(method: str, n: int, rank: int, weights: Path) -> dict:
    """One (method, n) in this fresh process: the measurements as a dict."""
    from headwater.curvature import EKFAC
    from headwater.gradients.projection import KroneckerProjection
    from headwater.methods import InfluenceFunction
    from headwater.methods.projected import ProjectedInfluence
    from headwater.plan import plan
    from headwater.task import ClassificationTask

    torch.set_num_threads(1)
    model = student()
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    train, query = digit_like(n, seed=1), digit_like(N_QUERY, seed=2)
    task = ClassificationTask(weight_decay=WEIGHT_DECAY, measurement="margin")
    folder = Path(tempfile.mkdtemp(prefix=f"scale-{method}-"))
    resident = _rss()
    try:
        start = time.perf_counter()
        if method == "ekfac":
            curvature = EKFAC(query_rank=rank, ggn_estimator="sampled")
            est = InfluenceFunction(model, task, curvature, chunk_size=CHUNK)
            est.fit(train, store=folder / "ekfac")
            fitted = time.perf_counter()
            result = est.attribute(query, train, top_k=TOP_K)
        else:
            est = ProjectedInfluence(
                model,
                task,
                KroneckerProjection(32, 32),
                ggn_estimator="sampled",
                store=folder / "kron",
                chunk_size=CHUNK,
            )
            est.fit(train)
            fitted = time.perf_counter()
            result = est.attribute(query, None, top_k=TOP_K)
        seconds, fit_seconds = time.perf_counter() - start, fitted - start
        peak, disk = _peak(), _disk(folder)
        assert bool(result.values.isfinite().all())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    predicted = plan(
        model, task, train, query, top_k=True, chunk_size=CHUNK, query_rank=rank, measure=False
    )
    row = predicted.row("ekfac" if method == "ekfac" else "kronecker projection 32x32")
    floor = gradient_floor(model, train)
    return {
        "method": method,
        "n": n,
        "seconds": seconds,
        "fit_seconds": fit_seconds,
        "peak": peak,
        "resident": resident,
        "disk": disk,
        "planned_peak": resident + row.total,
        "planned_seconds": PASSES[method] * floor,
        "floor": floor,
    }


def _row(r: dict) -> str:
    gib, n = 2**30, r["n"]
    per = 1e3 * r["seconds"] / n
    floor = 1e3 * r["floor"] / n
    return (
        f"| {r['label']} | {n:,} | {r['seconds']:.0f} ({r['fit_seconds']:.0f} + "
        f"{r['seconds'] - r['fit_seconds']:.0f}) | {r['peak'] / gib:.2f} | "
        f"{r['planned_peak'] / gib:.2f} ({100 * (r['planned_peak'] / r['peak'] - 1):+.0f}%) | "
        f"{r['disk'] / 2**20:.0f} | {r['planned_seconds']:.0f} | {per:.3f} | {floor:.3f} | "
        f"{per / floor:.1f}x |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rank", type=int, default=32, help="EK-FAC query_rank")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--child", nargs=3, metavar=("METHOD", "N", "WEIGHTS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        method, n, weights = args.child
        print(json.dumps(child(method, int(n), args.rank, Path(weights))), flush=True)
        return 0
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "student.safetensors"
        train_student(weights, max(args.sizes))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for method in args.methods:
            for n in args.sizes:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.scale_sizes",
                        "--rank",
                        str(args.rank),
                        "--child",
                        method,
                        str(n),
                        str(weights),
                    ],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=False,
                )
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return out.returncode
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["label"] = (
                    f"EK-FAC, query_rank={args.rank}"
                    if method == "ekfac"
                    else "Kronecker projection 32x32"
                )
                rows.append(r)
                print(_row(r), flush=True)
                write(rows, args, time.perf_counter() - started)  # kept if a later run fails
    write(rows, args, time.perf_counter() - started)
    return 0


def write(rows: list[dict], args, total: float) -> None:
    lines = [
        "# Scale: 25k-200k training examples (bench/scale_sizes.py)",
        "",
        f"Written by `make bench-scale` (`python -m bench.scale_sizes --rank {args.rank}`) on "
        f"{time.strftime('%Y-%m-%d')} in {total / 60:.1f} minutes: 64-{WIDTH}-{WIDTH}-10 tanh MLP "
        "(1,126,410 parameters, float32), synthetic 8x8 digit-like inputs labelled by a random "
        f"teacher, {N_QUERY} queries on the margin, top-{TOP_K} proponents and opponents, one "
        "thread, each run in a fresh process. Time = fit + scoring (s); peak = the process's "
        "ru_maxrss (GiB); planned = `headwater.plan` (resident memory when planning + the "
        "method's stored and working bytes), and its time (the method's passes x the floor); "
        "disk = the store's size (MiB); floor = one batched forward+backward per example "
        "(chunks of 64) on the same training data; per-example figures in ms.",
        "",
        "| method | n | time (s) (fit + scores) | peak (GiB) | planned peak (GiB) | disk (MiB) | "
        "planned time (s) | ms / example | floor ms / example | x floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(_row(r) for r in rows),
        "",
    ]
    for method in {r["label"] for r in rows}:
        mine = {r["n"]: r for r in rows if r["label"] == method}
        if len(mine) > 1:
            lo, hi = min(mine), max(mine)
            ratio = mine[hi]["seconds"] / mine[lo]["seconds"]
            lines.append(
                f"- {method}: t({hi:,}) / t({lo:,}) = {ratio:.2f} for {hi / lo:.0f}x the data "
                f"(linear: {hi / lo:.1f}; limit 1.3x linear = {1.3 * hi / lo:.1f})."
            )
    old = args.output.read_text() if args.output.exists() else ""
    lds = old[old.index("## LDS") :] if "## LDS" in old else ""
    args.output.write_text("\n".join(lines) + "\n" + ("\n" + lds if lds else ""))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
