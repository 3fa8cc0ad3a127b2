"""``headwater report``: render the HTML report of a saved output folder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from headwater.cli.common import UserError, prepare_output
from headwater.report import load_result, render

__all__ = ["add_parser", "run"]

log = logging.getLogger("headwater.cli")


def add_parser(sub: argparse._SubParsersAction, parents: list) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "report",
        parents=parents,
        help="render the HTML report of a saved output folder",
        description="Render index.html and its PNG figures from the results a `demo` or `score` run "
        "saved in FOLDER (results.safetensors + results.json).",
    )
    p.add_argument("folder", help="output folder of a previous run")
    p.add_argument("--to", default=None, help="report folder (default: FOLDER/report)")
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="proponents and opponents per test example (default: the run's --top-k)",
    )
    p.add_argument(
        "--queries",
        type=int,
        nargs="+",
        default=None,
        help="query indices to detail (default: the run's choice)",
    )
    p.add_argument(
        "--mislabeled", type=int, default=16, help="training examples listed by self-influence"
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"folder: {folder} does not exist or is not a folder")
    try:
        result = load_result(folder)
    except FileNotFoundError as err:
        raise UserError(f"folder: {folder} holds no headwater results ({err})") from err
    except OSError as err:
        raise UserError(
            f"folder: cannot read the results in {folder}: {err.strerror or err}"
        ) from err
    except Exception as err:  # a damaged file: safetensors/JSON errors of several types
        raise UserError(
            f"folder: the results in {folder} are unreadable ({type(err).__name__}: {err})"
        ) from err
    k = args.top_k or int(result.config.get("args", {}).get("top_k", 5))
    if k <= 0:
        raise UserError(f"--top-k: must be a positive integer, got {k}")
    if args.queries:
        bad = [q for q in args.queries if not 0 <= q < result.n_query]
        if bad:
            raise UserError(f"--queries: indices {bad} are outside [0, {result.n_query})")
        import dataclasses

        result = dataclasses.replace(result, shown=tuple(args.queries))
    out = prepare_output(args.to or folder / "report")
    html = render(result, out, k=k, n_mislabeled=args.mislabeled)
    print(html)
    return 0
