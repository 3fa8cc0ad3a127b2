"""``headwater plan``: memory of every method for your model and data, before a long run.

Reads the same spec as ``headwater score`` (model, train, query, optional task) and
prints, per method, the bytes of its stored state and of its working set (the sizes
of the tensors it holds: allocator slack and activations come on top), whether they
fit ``--memory-gb``, and the measured time of one pass of per-example gradients over
the training data. Nothing is fitted.
"""

from __future__ import annotations

import argparse
import json

from headwater.cli.common import UserError, check_device, seed_all, set_threads
from headwater.cli.score import load_spec
from headwater.data import as_tensors
from headwater.plan import formulas, plan
from headwater.task import default_task

__all__ = ["add_parser", "format_plan", "run"]


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_plan(result) -> str:
    lines = [
        f"{result.num_params:,} analysed parameters ({str(result.dtype).replace('torch.', '')}), "
        f"{result.outputs} outputs per example, {result.n_train:,} train x {result.n_query:,} query; "
        f"per-example gradients over the training set: {result.seconds_per_pass:.3g} s per pass",
        f"budget {_size(result.budget)}"
        + (
            ""
            if result.factored
            else "; K-FAC/EK-FAC/Kronecker projection: not every analysed "
            "parameter is in a Linear/Conv layer"
        ),
        "",
        f"{'method':<28} {'stored':>10} {'working':>10} {'total':>10}  fits  note",
    ]
    for r in result.rows:
        lines.append(
            f"{r.method:<28} {_size(r.stored):>10} {_size(r.working):>10} {_size(r.total):>10}  "
            f"{'yes' if r.fits else 'NO ':<4}  {r.note}"
        )
    best = result.recommended()
    lines += [
        "",
        f"recommended: {best.method} (the most accurate on our benchmarks that fits the budget"
        + (f"; {best.note}" if best.note else "")
        + ")"
        if best
        else "recommended: nothing fits; raise --memory-gb, pass --query-batch or --top-k, "
        "or score fewer queries",
    ]
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction, parents: list) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plan",
        parents=parents,
        help="memory of every method for a spec, before a long run",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "spec", help="a spec file (path/to/spec.py) or module (package.module), as for `score`"
    )
    p.add_argument("--memory-gb", type=float, default=8.0, help="memory available (default 8)")
    p.add_argument(
        "--chunk-size", type=int, default=64, help="examples per vectorised gradient step"
    )
    p.add_argument(
        "--top-k", action="store_true", help="scores streamed to a top-k (no full score matrix)"
    )
    p.add_argument(
        "--query-batch", type=int, default=None, help="preconditioned query gradients held at once"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r = p.add_argument_group("run")
    r.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed set before the spec runs, as `score` sets it (default 0)",
    )
    r.add_argument(
        "--device",
        default="cpu",
        help="torch device the gradients are timed on, e.g. cpu or cuda:0 (default cpu)",
    )
    r.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.memory_gb <= 0:
        raise UserError(f"--memory-gb: must be > 0, got {args.memory_gb}")
    if args.chunk_size <= 0:
        raise UserError(f"--chunk-size: must be a positive integer, got {args.chunk_size}")
    if args.query_batch is not None and args.query_batch <= 0:
        raise UserError(f"--query-batch: must be a positive integer, got {args.query_batch}")
    set_threads(args.threads)
    check_device(args.device)
    seed_all(args.seed)
    model, train, query, task = load_spec(args.spec).parts()
    model = model.to(args.device)
    task = task or default_task(as_tensors(train, "train")[1])
    result = plan(
        model,
        task,
        train,
        query,
        budget_bytes=int(args.memory_gb * 2**30),
        chunk_size=args.chunk_size,
        query_batch=args.query_batch,
        top_k=args.top_k,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "num_params": result.num_params,
                    "n_train": result.n_train,
                    "n_query": result.n_query,
                    "outputs": result.outputs,
                    "seconds_per_pass": result.seconds_per_pass,
                    "budget_bytes": result.budget,
                    "formulas": formulas(),
                    "recommended": None
                    if result.recommended() is None
                    else result.recommended().method,
                    "rows": [
                        {
                            "method": r.method,
                            "stored_bytes": r.stored,
                            "working_bytes": r.working,
                            "fits": r.fits,
                            "note": r.note,
                        }
                        for r in result.rows
                    ],
                },
                indent=2,
            )
        )
    else:
        print(format_plan(result))
    return 0
