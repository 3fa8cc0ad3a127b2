"""Shared pieces of the commands: progress bars, logging, run configs, output folders."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

import headwater
from headwater import store
from headwater.bars import ProgressBars
from headwater.curvature import CURVATURES
from headwater.errors import ConfigError
from headwater.gradients.functional import check_device as core_check_device
from headwater.gradients.projection import KroneckerProjection, RandomProjection
from headwater.methods.scoring import check_top_k

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
    "check_data_sizes",
    "check_device",
    "known_methods",
    "load_config_defaults",
    "parse_options",
    "parse_projection",
    "prepare_output",
    "seed_all",
    "self_influence",
    "set_threads",
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
    p: argparse.ArgumentParser,
    *,
    out_default: str | None,
    out_help: str | None = None,
    threads_default: int | None = None,
) -> None:
    """The options of ``demo`` and ``score`` (``out_help``: how the default ``--out`` is
    derived when ``out_default`` is ``None``)."""
    from headwater.methods.registry import METHODS

    g = p.add_argument_group("attribution")
    g.add_argument(
        "--method",
        default="influence",
        help=f"estimator (default: influence; available: {', '.join(known_methods())})",
    )
    curved = ", ".join(name for name, spec in METHODS.items() if "curvature" in spec.options)
    g.add_argument(
        "--curvature",
        default="auto",
        help="curvature approximation: 'auto' (default) solves the dense GGN when it fits "
        f"the time and memory budget, else {best_curvature()!r}; or one of "
        f"{', '.join(sorted(CURVATURES))} (only with --method {curved})",
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
    defined = ", ".join(name for name, spec in METHODS.items() if spec.self_influence)
    g.add_argument(
        "--self-influence",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score every training example against itself, to flag likely mislabeled ones "
        f"(default: on for --method {defined}, the methods that define it; off otherwise)",
    )
    g.add_argument(
        "--curvature-option",
        dest="curvature_options",
        action="append",
        type=_key_value,
        default=None,
        metavar="KEY=VALUE",
        help="extra argument of the curvature class, e.g. rank=50 "
        "(repeatable; values are read as JSON, else as text)",
    )
    g.add_argument(
        "--method-option",
        dest="method_options",
        action="append",
        type=_key_value,
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
        type=_projection_text,
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
        f"settings, model and data reuses or resumes it (default: {out_default or out_help})",
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
    curvature_options = parse_options(args.curvature_options, "curvature-option")
    method_options = parse_options(getattr(args, "method_options", None), "method-option")
    with_self_influence = self_influence(args)
    try:
        return AttributionSettings(
            method=args.method,
            curvature=None if args.curvature == "auto" else args.curvature,  # auto: chosen at fit
            damping=args.damping,
            projection=projection,
            kind=args.kind,
            self_influence=with_self_influence,
            chunk_size=args.chunk_size,
            query_batch=args.query_batch,
            store=store,
            read_only_store=bool(getattr(args, "read_only_store", False)) and store is not None,
            curvature_options=curvature_options or None,
            method_options=method_options or None,
        )
    except (TypeError, ValueError) as err:
        field, sep, message = str(err).partition(": ")
        flag = _FLAGS.get(field, field.replace("_", "-"))
        raise UserError(f"--{flag}: {message}" if sep else str(err)) from err


def self_influence(args: argparse.Namespace) -> bool:
    """``--self-influence`` / ``--no-self-influence``, or without either whether the method
    defines self-influence (``MethodSpec.self_influence``)."""
    from headwater.methods.registry import METHODS

    defined = METHODS[args.method].self_influence
    if args.self_influence is None:
        return defined
    if args.self_influence and not defined:
        users = [name for name, spec in METHODS.items() if spec.self_influence]
        raise UserError(
            f"--self-influence: not defined for method={args.method!r} (defined for: "
            f"{', '.join(users)}); leave the flag out or pass --no-self-influence"
        )
    return bool(args.self_influence)


def check_attribution_options(args: argparse.Namespace) -> None:
    """Validate the cheap options before any long step (``--curvature auto`` is resolved at fit)."""
    settings = attribution_settings(args)
    if settings.projection is not None:
        args.curvature = "exact"
    _check_top_k(args.top_k)
    set_threads(args.threads)
    check_device(args.device)


def check_data_sizes(
    args: argparse.Namespace, n_train: int, n_query: int, queries: str = "query examples"
) -> None:
    """Check ``--top-k`` against ``n_train`` and ``--queries`` against ``n_query`` as soon as
    the data's sizes are known, before any long step (``queries`` names the query examples)."""
    _check_top_k(args.top_k, n_train)
    bad = [q for q in args.queries or () if not 0 <= q < n_query]
    if bad:
        raise UserError(
            f"--queries: indices {bad} are outside [0, {n_query}) (the {n_query} {queries})"
        )


def _check_top_k(top_k: Any, n_train: int | None = None) -> None:
    """The API's ``top_k`` rule (:func:`headwater.methods.scoring.check_top_k`), naming the flag."""
    try:
        check_top_k(top_k, n_train)
    except ValueError as err:
        raise UserError(f"--top-k: {str(err).partition(': ')[2]}") from err


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU threads (``None``: torch's choice)."""
    if threads is None:
        return
    if threads <= 0:
        raise UserError(f"--threads: must be a positive integer, got {threads}")
    torch.set_num_threads(threads)


def seed_all(seed: int) -> None:
    """``--seed``: seed Python's, NumPy's and torch's global generators before the spec runs,
    so its random numbers (initialisation, data order) are the same in every command."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_device(device: str, name: str = "--device") -> None:
    """Raise :class:`UserError` (one line) unless tensors can be made on ``device``."""
    try:
        core_check_device(device, name)
    except ValueError as err:
        raise UserError(str(err).replace("use 'cpu'", "use --device cpu")) from err


_PROJECTION_FORM = "K or KOUTxKIN (positive integers, e.g. 512 or 32x32)"


def _projection_dims(spec: str) -> tuple[int, ...]:
    """``"512"`` -> ``(512,)``, ``"32x32"`` -> ``(32, 32)``; ``ValueError`` for anything else."""
    parts = spec.strip().lower().split("x")
    if len(parts) in (1, 2) and all(
        part.strip().isascii() and part.strip().isdigit() and int(part) > 0 for part in parts
    ):
        return tuple(int(part) for part in parts)
    raise ValueError(f"expected {_PROJECTION_FORM}, got {spec!r}")


def _projection_text(text: str) -> str:
    """argparse type of ``--projection``: the text, checked to be ``K`` or ``KOUTxKIN``."""
    try:
        _projection_dims(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def parse_projection(spec: str | None, seed: int) -> RandomProjection | KroneckerProjection | None:
    """``"512"`` -> flat projection to 512 dimensions; ``"32x32"`` -> per-layer 32 x 32."""
    if spec is None:
        return None
    try:
        dims = _projection_dims(str(spec))
        if len(dims) == 1:
            return RandomProjection(dims[0], seed=seed)
        return KroneckerProjection(dims[0], dims[1], seed=seed)
    except ValueError as err:
        raise UserError(f"--projection: {err}") from err


def _key_value(text: str) -> str:
    """argparse type of ``--curvature-option`` / ``--method-option``: ``KEY=VALUE`` text."""
    key, sep, _ = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def parse_options(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``["rank=50", "seed=1"]`` -> ``{"rank": 50, "seed": 1}`` (``flag`` names the option
    in the error for a malformed item)."""
    options: dict[str, Any] = {}
    for item in items or []:
        try:
            key, _, value = _key_value(item).partition("=")
        except argparse.ArgumentTypeError as err:
            raise UserError(f"--{flag}: {err}") from err
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


def load_config_defaults(
    path: str, command: str, parser: argparse.ArgumentParser
) -> dict[str, Any]:
    """The saved arguments of a ``command`` run (its ``config.json``, or the folder holding it),
    to use as the defaults of the command's ``parser``.

    Every value goes through the conversion of its flag on the command line (its type, such as
    ``--projection``'s ``K | KOUTxKIN``, and its choices), so a damaged or hand-edited file ends
    in one ``--config`` line naming the file, the argument and what was expected; the checks
    that follow (method, curvature, damping, ...) are those of the flags.
    """
    file = Path(path)
    if file.is_dir():
        file = file / CONFIG_NAME
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise UserError(f"--config: no such file {file}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--config: cannot read {file}: {err}") from err
    where = f"--config: {file}"
    if not isinstance(config, dict):
        raise UserError(
            f"{where}: expected a JSON object (a run's {CONFIG_NAME}), got {_json_kind(config)}"
        )
    if "command" not in config:
        raise UserError(f'{where}: no "command" (expected "{command}")')
    if config["command"] != command:
        saved = config["command"]
        raise UserError(
            f"{where}: is a {saved!r} run, not {command!r}"
            if isinstance(saved, str)
            else f'{where}: "command": expected "{command}", got {_json_kind(saved)}'
        )
    args = config.get("args")
    if not isinstance(args, dict):
        raise UserError(
            f'{where}: "args": expected an object of option names and values, got '
            f"{'nothing' if 'args' not in config else _json_kind(args)}"
        )
    actions = {
        a.dest: a for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help", "config")
    }
    defaults = {}
    for key, value in args.items():
        if key == "command":  # saved with the arguments; must agree
            if value != command:
                raise UserError(
                    f'{where}: args.command: expected "{command}", got {_json_kind(value)}'
                )
            continue
        if key not in actions:
            raise UserError(f"{where}: args.{key}: not an option of `headwater {command}`")
        defaults[key] = _config_value(actions[key], value, f"{where}: args.{key}")
    return defaults


_EXPECTED = {
    None: ("a string", "strings"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    _projection_text: (f"a string {_PROJECTION_FORM}", ""),
    _key_value: ("a string KEY=VALUE", "strings KEY=VALUE"),
}
"""What a config value of each flag type must be (the flag's argparse ``type``): one, several."""


def _expected(action: argparse.Action) -> tuple[str, str]:
    """:data:`_EXPECTED` of the flag's type (another type: any text it converts)."""
    return _EXPECTED.get(action.type, ("a value", "values"))


def _config_value(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` converted as its flag's command-line text would be, or :class:`UserError`."""
    if action.option_strings:
        where += f" ({action.option_strings[0]})"
    if action.nargs == 0:  # a switch: --flag / --no-flag
        if isinstance(value, bool) or (value is None and action.default is None):
            return value
        raise UserError(f"{where}: expected true or false, got {_json_kind(value)}")
    if value is None:
        if action.default is None and not action.required:
            return None
        raise UserError(f"{where}: expected {_expected(action)[0]}, got null")
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        if not isinstance(value, list):
            raise UserError(
                f"{where}: expected an array of {_expected(action)[1]}, got {_json_kind(value)}"
            )
        return [_config_item(action, item, where) for item in value]
    return _config_item(action, value, where)


def _config_item(action: argparse.Action, value: Any, where: str) -> Any:
    expected = _expected(action)[0]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (isinstance(value, str) or (number and action.type is not None)):
        raise UserError(f"{where}: expected {expected}, got {_json_kind(value)}")
    converted = value
    if action.type is not None:  # the flag's own conversion of the text
        try:
            converted = action.type(value if isinstance(value, str) else json.dumps(value))
        except argparse.ArgumentTypeError as err:
            raise UserError(f"{where}: {err}") from err
        except (TypeError, ValueError) as err:
            raise UserError(f"{where}: expected {expected}, got {_json_kind(value)}") from err
    if action.choices is not None and converted not in action.choices:
        raise UserError(
            f"{where}: expected one of {', '.join(map(str, action.choices))}, "
            f"got {_json_kind(value)}"
        )
    return converted


def _json_kind(value: Any) -> str:
    """A JSON value as an error message names it: ``null``, ``true``, ``the number 3``,
    ``the string "x"``, ``an array``, ``an object``."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        text = json.dumps(value)
        return f"the string {text if len(text) <= 60 else text[:57] + '...'}"
    return "an array" if isinstance(value, list) else "an object"
