"""``headwater bench``: run the benchmarks (``python -m bench.run``) when they are present."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from headwater.cli.common import UserError

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction, parents: list) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        parents=parents,
        help="run the benchmarks (python -m bench.run, from a source checkout)",
        description="Run `python -m bench.run` from the source checkout (found from the current folder "
        "upwards); every argument after `bench` is passed on, e.g. "
        "`headwater bench --problems logreg --no-peers`.",
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to bench.run")
    p.set_defaults(func=run)
    return p


def _find_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / "bench" / "run.py").is_file():
            return folder
    return None


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def run(args: argparse.Namespace) -> int:
    root = _find_root(Path.cwd())
    if root is None and not _importable("bench.run"):
        raise UserError(
            "bench: no benchmarks found (bench/run.py); run from a source checkout of headwater"
        )
    env = dict(os.environ)
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "bench.run", *args.bench_args]
    return subprocess.call(cmd, cwd=root, env=env)
