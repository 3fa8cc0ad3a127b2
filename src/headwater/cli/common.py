"""Shared pieces of the commands: progress bars, logging, run configs, output folders."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

import headwater
from headwater import store
from headwater.bars import ProgressBars
from headwater.curvature import CURVATURES
from headwater.errors import ConfigError
from headwater.gradients.functional import check_device as core_check_device
from headwater.gradients.projection import KroneckerProjection, RandomProjection

if TYPE_CHECKING:
    from headwater.methods.registry import AttributionSettings

__all__ = [
    "CONFIG_NAME",
    "ProgressBars",
    "Timer",
    "UserError",
    "add_attribution_options",
    "attribution_settings",
    "best_curvature",
    "check_attribution_options",
    "check_device",
    "known_methods",
    "parse_options",
    "parse_projection",
    "prepare_output",
    "setup_logging",
    "write_config",
]

log = logging.getLogger("headwater.cli")

CONFIG_NAME = "config.json"
_CURVATURE_PREFERENCE = ("ekfac", "kfac", "exact")


class UserError(ConfigError):
    """A mistake in the command line or the user's files: printed as one line, no traceback."""


# -- progress and logging ------------------------------------------------------------


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(quiet: bool, verbose: bool = False) -> None:
    """Log ``headwater.*`` messages to stderr (around any progress bars)."""
    root = logging.getLogger("headwater")
    root.handlers.clear()
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    logging.captureWarnings(True)
    warn_log = logging.getLogger("py.warnings")
    warn_log.handlers = [handler]
    warn_log.propagate = False


class Timer:
    """Wall-clock seconds per named stage: ``with timer("fit"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            log.debug("%s: %.2f s", stage, self.seconds[stage])


# -- options shared by demo and score -------------------------------------------------


def known_methods() -> tuple[str, ...]:
    """The estimator names ``headwater.influence(method=...)`` accepts."""
    from headwater.methods.registry import METHODS

    return tuple(METHODS)


def best_curvature() -> str:
    """The preferred registered curvature: EK-FAC, else K-FAC, else exact."""
    for name in _CURVATURE_PREFERENCE:
        if name in CURVATURES:
            return name
    return min(CURVATURES)


def add_attribution_options(
    p: argparse.ArgumentParser, *, out_default: str | None, threads_default: int | None = None
) -> None:
    g = p.add_argument_group("attribution")
    g.add_argument(
        "--method",
        default="influence",
        help=f"estimator (default: influence; available: {', '.join(known_methods())})",
    )
    g.add_argument(
        "--curvature",
        default="auto",
        help="curvature approximation: 'auto' (default) solves the dense GGN when it fits "
        f"the time and memory budget, else {best_curvature()!r}; or one of "
        f"{', '.join(sorted(CURVATURES))}",
    )
    g.add_argument("--kind", default="ggn", help="curvature matrix: ggn (default), hessian or ef")
    g.add_argument(
        "--damping",
        type=float,
        default=None,
        help="damping λ >= 0 added to the curvature (default: chosen relative to its scale)",
    )
    g.add_argument(
        "--top-k", type=int, default=5, help="proponents and opponents listed per query (default 5)"
    )
    g.add_argument(
        "--no-self-influence",
        dest="self_influence",
        action="store_false",
        help="skip self-influence (used to flag likely mislabeled training examples)",
    )
    g.add_argument(
        "--curvature-option",
        dest="curvature_options",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="extra argument of the curvature class, e.g. rank=50 "
        "(repeatable; values are read as JSON, else as text)",
    )
    g.add_argument(
        "--method-option",
        dest="method_options",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="extra argument of the method's class, e.g. normalization=n with --method "
        "metagradient (repeatable; values are read as JSON, else as text)",
    )
    g.add_argument(
        "--chunk-size", type=int, default=64, help="examples per vectorised gradient step"
    )
    g.add_argument(
        "--query-batch",
        type=int,
        default=None,
        help="preconditioned query gradients held at once (default: all; smaller saves memory "
        "on large models at one more pass over the training data per batch)",
    )
    g.add_argument(
        "--projection",
        default=None,
        metavar="K | KOUTxKIN",
        help="influence on randomly projected gradients: K dimensions (flat), or KOUTxKIN per "
        "linear/conv layer (never forms a gradient)",
    )
    r = p.add_argument_group("run")
    r.add_argument(
        "-o",
        "--out",
        default=out_default,
        help="output folder for results, report and config; the fitted curvature (or the "
        "projected training gradients) is kept there too, and a rerun with the same "
        "settings, model and data reuses or resumes it"
        + (f" (default: {out_default})" if out_default else " (required)"),
    )
    r.add_argument(
        "--read-only-store",
        action="store_true",
        help="use the stored curvature or projected gradients in --out as they are: a damaged or "
        "mismatched store is an error (exit 2) instead of being recomputed",
    )
    r.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    r.add_argument(
        "--threads",
        type=int,
        default=threads_default,
        help=f"CPU threads for torch (default: {threads_default or 'torch' + chr(39) + 's choice'})",
    )
    r.add_argument(
        "--config",
        default=None,
        help="rerun with the arguments saved in a run's config.json (flags given here override it)",
    )
    r.add_argument(
        "--no-report", dest="report", action="store_false", help="do not write the HTML report"
    )


_FLAGS = {"curvature_options": "curvature-option", "method_options": "method-option"}
"""Settings fields whose command-line flag is not the field's name with dashes."""


def attribution_settings(
    args: argparse.Namespace, *, store: str | os.PathLike | None = None
) -> AttributionSettings:
    """The validated :class:`~headwater.methods.registry.AttributionSettings` of the command
    line (``--curvature auto`` resolved); an invalid value raises :class:`UserError` naming the flag."""
    from headwater.methods.registry import METHODS, AttributionSettings

    if args.method not in METHODS:
        raise UserError(
            f"--method: unknown method {args.method!r}; available: {', '.join(METHODS)}"
        )
    projection = parse_projection(args.projection, args.seed)
    curvature: str | None = args.curvature
    if "curvature" not in METHODS[args.method].options or curvature == "auto":
        curvature = None  # 'auto': chosen at fit by the budget (headwater.methods.auto)
    try:
        return AttributionSettings(
            method=args.method,
            curvature=curvature,
            damping=args.damping,
            projection=projection,
            kind=args.kind,
            self_influence=args.self_influence,
            chunk_size=args.chunk_size,
            query_batch=args.query_batch,
            store=store,
            read_only_store=bool(getattr(args, "read_only_store", False)) and store is not None,
            curvature_options=parse_options(args.curvature_options, "curvature-option") or None,
            method_options=parse_options(getattr(args, "method_options", None), "method-option")
            or None,
        )
    except (TypeError, ValueError) as err:
        field, sep, message = str(err).partition(": ")
        flag = _FLAGS.get(field, field.replace("_", "-"))
        raise UserError(f"--{flag}: {message}" if sep else str(err)) from err


def check_attribution_options(args: argparse.Namespace) -> None:
    """Validate the cheap options before any long step (``--curvature auto`` is resolved at fit)."""
    from headwater.methods.registry import METHODS

    settings = attribution_settings(args)
    if settings.projection is not None:
        args.curvature = "exact"
    elif "curvature" not in METHODS[args.method].options and args.curvature == "auto":
        args.curvature = best_curvature()  # recorded in the config; the method reads no curvature
    if args.top_k <= 0:
        raise UserError(f"--top-k: must be a positive integer, got {args.top_k}")
    if args.threads is not None:
        if args.threads <= 0:
            raise UserError(f"--threads: must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    check_device(args.device)


def check_device(device: str, name: str = "--device") -> None:
    """Raise :class:`UserError` (one line) unless tensors can be made on ``device``."""
    try:
        core_check_device(device, name)
    except ValueError as err:
        raise UserError(str(err).replace("use 'cpu'", "use --device cpu")) from err


def parse_projection(spec: str | None, seed: int) -> RandomProjection | KroneckerProjection | None:
    """``"512"`` -> flat projection to 512 dimensions; ``"32x32"`` -> per-layer 32 x 32."""
    if spec is None:
        return None
    try:
        dims = [int(part) for part in spec.lower().split("x")]
        if len(dims) == 1:
            return RandomProjection(dims[0], seed=seed)
        if len(dims) == 2:
            return KroneckerProjection(dims[0], dims[1], seed=seed)
    except ValueError as err:
        raise UserError(f"--projection: {err}") from err
    raise UserError(f"--projection: expected K or KOUTxKIN (positive integers), got {spec!r}")


def parse_options(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``["rank=50", "seed=1"]`` -> ``{"rank": 50, "seed": 1}`` (``flag`` names the option
    in the error for a malformed item)."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--{flag}: expected KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def prepare_output(path: str | os.PathLike | None) -> Path:
    """Create the output folder (if needed) and check that it can be written."""
    if not path:
        raise UserError("--out: an output folder is required")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out: {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out: cannot create {folder}: {err.strerror or err}") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out: {folder} is not writable")
    return folder


# -- run configuration -----------------------------------------------------------------

_NOT_SAVED = {"config", "func", "quiet", "verbose", "debug", "distributed"}


def config_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_SAVED}


def write_config(
    folder: Path, command: str, args: argparse.Namespace, **extra: Any
) -> dict[str, Any]:
    """Write ``folder/config.json``: every resolved argument, versions and how to rerun."""
    config = {
        "command": command,
        "args": config_args(args),
        "argv": sys.argv[1:],
        "reproduce": f"headwater {command} --config {shlex.quote(str(folder / CONFIG_NAME))}",
        "versions": {
            "headwater": headwater.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "torch_threads": torch.get_num_threads(),
        **extra,
    }
    store.atomic_write_bytes(
        folder / CONFIG_NAME, json.dumps(config, indent=2, default=str).encode()
    )
    return config


def load_config_defaults(path: str, command: str) -> dict[str, Any]:
    """The saved arguments of a run, to use as defaults."""
    file = Path(path)
    if file.is_dir():
        file = file / CONFIG_NAME
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise UserError(f"--config: no such file {file}") from err
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--config: cannot read {file}: {err}") from err
    if config.get("command") != command:
        raise UserError(f"--config: {file} is a {config.get('command')!r} run, not {command!r}")
    return dict(config.get("args", {}))
