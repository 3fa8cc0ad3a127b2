"""``headwater score``: attribute a user's model given as a Python spec.

A spec is a ``.py`` file or an importable module defining:

    model   a trained torch.nn.Module (required)
    train   the training data: an (inputs, targets) pair of tensors, a Dataset or a
            DataLoader, in a fixed order (required)
    query   the examples to explain, in the same forms (required)
    task    a headwater Task (optional; default: classification for integer targets,
            regression for float targets)
    image_shape   (H, W) to show inputs as images in the report (optional)
    display       a function ``inputs [n, ...] -> images [n, H, W]`` (or ``[n, H, W, 3]``
                  RGB) that undoes the preprocessing, so the report shows the examples
                  as people see them: raw pixel values, ink dark on light (optional;
                  called with the inputs, not without arguments)
    class_names   display names of the classes (optional)
    run     the recorded training run of ``model`` (``--method metagradient``; TracIn's
            checkpoints with ``--method tracin``): a ``RunRecord`` or the path it was saved
            to (``Recorder.finish(path)``) (optional)
    trajectory    the recorded SGD run of ``model`` (``--method hydra``): the
            ``Trajectory`` of ``headwater.train.train_sgd`` (optional)
    checkpoints   TracIn's checkpoints (``--method tracin``, instead of ``run``): a list
            of ``headwater.methods.tracin.Checkpoint`` (optional)

Any of these may instead be a function without arguments that returns the value
(called once, after the random seed is set). Outputs in --out: results.safetensors
+ results.json (scores [n_query, n_train], self-influence, labels), top_k.csv,
config.json (rerun with --config) and report/index.html.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
import math
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from headwater.cli.common import (
    ProgressBars,
    Timer,
    UserError,
    add_attribution_options,
    check_attribution_options,
    check_data_sizes,
    check_device,
    prepare_output,
    seed_all,
)
from headwater.cli.run import attribute, write_outputs
from headwater.data import as_tensors, iter_batches, map_inputs
from headwater.distributed import world
from headwater.gradients.functional import evaluation_mode, prepare_batch
from headwater.gradients.per_example import Objective, check_batch
from headwater.methods.registry import METHODS
from headwater.report import RunResult, format_top_k_table
from headwater.task import ClassificationTask, Task, default_task
from headwater.train.recorder import load_run

__all__ = ["Spec", "add_parser", "load_spec", "run"]

log = logging.getLogger("headwater.cli")

_MAX_SCORES = 200_000_000  # n_query * n_train kept in memory (1.6 GB in float64)


class Spec:
    """The user's model, data and task, read from a spec file or module."""

    def __init__(self, ref: str, module: ModuleType):
        self.ref = ref
        self.module = module

    def parts(self) -> tuple[nn.Module, Any, Any, Task | None]:
        """``(model, train, query, task)``, checked (``task`` may be ``None``)."""
        model, train, query = self.get("model"), self.get("train"), self.get("query")
        task = self.get("task", required=False)
        if not isinstance(model, nn.Module):
            raise UserError(f"spec: `model` must be a torch.nn.Module, got {type(model).__name__}")
        if task is not None and not isinstance(task, Task):
            raise UserError(f"spec: `task` must be a headwater Task, got {type(task).__name__}")
        return model, train, query, task

    def get(self, name: str, required: bool = True) -> Any:
        if not hasattr(self.module, name):
            if required:
                raise UserError(
                    f"spec: {self.ref} defines no `{name}` (needs model, train and query)"
                )
            return None
        value = getattr(self.module, name)
        if inspect.isfunction(value):
            try:
                value = value()
            except (UserError, KeyboardInterrupt):
                raise
            except Exception as err:
                raise UserError(
                    f"spec: {self.ref}: `{name}()` raised {type(err).__name__}: "
                    f"{err} (rerun with --debug)"
                ) from err
        return value


def load_spec(ref: str) -> Spec:
    """Execute a spec file (``path/to/spec.py``) or import a module (``package.module``)."""
    path = Path(ref)
    if ref.endswith(".py") or path.exists() or "/" in ref or "\\" in ref:
        if path.is_dir():
            raise UserError(
                f"spec: {ref} is a directory; expected a spec file (path/to/spec.py) or a "
                "module (package.module)"
            )
        if not path.is_file():
            raise UserError(f"spec: no such file {ref}")
        name = f"_headwater_spec_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise UserError(f"spec: cannot load {ref} as Python")
        module = importlib.util.module_from_spec(loader_spec)
        sys.path.insert(0, str(path.resolve().parent))  # sibling imports of the spec
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:
            raise UserError(
                f"spec: {ref} failed: {type(err).__name__}: {err} (rerun with --debug)"
            ) from err
        return Spec(ref, module)
    try:
        module = importlib.import_module(ref)
    except ModuleNotFoundError as err:
        if err.name and ref.startswith(err.name):
            raise UserError(f"spec: no file or module named {ref!r}") from err
        raise UserError(f"spec: importing {ref} failed: {err} (rerun with --debug)") from err
    except Exception as err:
        raise UserError(
            f"spec: importing {ref} failed: {type(err).__name__}: {err} (rerun with --debug)"
        ) from err
    return Spec(ref, module)


def _images(inputs: Any, image_shape: Any, display: Any = None) -> Tensor | None:
    """``[n, H, W]`` (or ``[n, H, W, 3]``) images of the inputs for display, or ``None`` if
    they are not images. ``display`` maps the inputs to them; otherwise the inputs are drawn as
    they are (reshaped to ``image_shape``)."""
    if display is not None:
        if not callable(display):
            raise UserError(
                f"spec: `display` must be a function inputs -> images, got {type(display).__name__}"
            )
        images = torch.as_tensor(display(inputs)).detach().cpu()
        n = _rows(inputs)
        if images.shape[0] != n or not (
            images.dim() == 3 or (images.dim() == 4 and images.shape[-1] == 3)
        ):
            raise UserError(
                f"spec: `display` must return images [{n}, H, W] or [{n}, H, W, 3], got "
                f"{tuple(images.shape)}"
            )
        return images.float()
    if not isinstance(inputs, Tensor):
        return None
    inputs = inputs.cpu()
    if image_shape is not None:
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 2 or math.prod(shape) != inputs[0].numel():
            raise UserError(
                f"spec: image_shape {shape} does not match inputs of shape {tuple(inputs.shape[1:])}"
            )
        return inputs.reshape(inputs.shape[0], *shape).float()
    if inputs.dim() == 4 and inputs.shape[1] == 1:
        return inputs[:, 0].float()
    if inputs.dim() == 3 and min(inputs.shape[1:]) >= 4:
        return inputs.float()
    return None


def _rows(inputs: Any) -> int:
    return int(tree_flatten(inputs)[0][0].shape[0])


def _first_param(model: nn.Module, task: Task) -> Tensor:
    return next(iter(task.parameters(model).values()))


def _predictions(model: nn.Module, task: Task, query: Any, device: str) -> Tensor | None:
    if not isinstance(task, ClassificationTask):
        return None
    out = []
    with torch.no_grad(), evaluation_mode(model):
        for x, _ in iter_batches(query, 512, "query"):
            logits = task.output(model, map_inputs(lambda t: t.to(device), x))
            out.append(logits.argmax(dim=-1).cpu())
    return torch.cat(out)


_RECORDED = {
    "run": "a RunRecord of headwater.train.Recorder, or the path it was saved to",
    "trajectory": "the Trajectory of headwater.train.train_sgd",
    "checkpoints": "a list of headwater.methods.tracin.Checkpoint",
}
"""The recorded training a spec may define, by the name of the ``headwater.influence``
argument it becomes (``MethodSpec.inputs`` says which methods read which)."""


def _recorded(spec: Spec, method: str) -> dict[str, Any]:
    """The spec's recorded training that ``method`` reads (``{}`` for a method that reads
    none; a saved run's path loaded); :class:`UserError` if the method needs one and the spec
    defines none. Their types are checked by ``headwater.influence`` before any step."""
    reads = sorted(METHODS[method].inputs)
    given = {name: spec.get(name, required=False) for name in reads}
    given = {name: value for name, value in given.items() if value is not None}
    if reads and not given:
        needed = " or ".join(f"`{name}` ({_RECORDED.get(name, 'see its docs')})" for name in reads)
        raise UserError(f"spec: --method {method} needs {needed}")
    if isinstance(given.get("run"), str | Path):
        given["run"] = load_run(given["run"])
    return given


def add_parser(sub: argparse._SubParsersAction, parents: list) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "score",
        parents=parents,
        help="attribute your own model: scores, top-k CSV and report from a Python spec",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "spec",
        nargs="?",
        help="a spec file (path/to/spec.py) or module (package.module); may come from --config",
    )
    p.add_argument(
        "--queries",
        type=int,
        nargs="+",
        default=None,
        help="query indices detailed in the printed table and report (default: the first 3)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="run under torchrun: initialise torch.distributed from its environment (gloo on "
        "CPU, nccl with --device cuda, one GPU per rank); the training data is split "
        "between the ranks and rank 0 writes the outputs",
    )
    add_attribution_options(p, out_default=None, out_help="headwater-out/<spec name>")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if not args.distributed:
        return _run(args)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError(
            "--distributed: RANK/WORLD_SIZE are not set; start the command with torchrun "
            "(e.g. torchrun --standalone --nproc_per_node=2 -m headwater score SPEC --distributed)"
        )
    check_device(args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        if dist.get_rank() != 0:
            args.quiet, args.report = True, False
        code = _run(args)
        dist.barrier()  # the other ranks wait while rank 0 writes, then all leave together
        return code
    finally:
        dist.destroy_process_group()


def _run(args: argparse.Namespace) -> int:
    if not args.spec:
        raise UserError(
            "spec: expected a spec file (path/to/spec.py) or module (package.module), or the "
            "--config of a score run"
        )
    check_attribution_options(args)
    if not args.out:
        args.out = str(Path("headwater-out") / Path(args.spec).stem.replace(".", "_"))
    folder = prepare_output(args.out)
    progress, timer = ProgressBars(enabled=not args.quiet), Timer()

    seed_all(args.seed)
    with timer("spec"):
        spec = load_spec(args.spec)
        model, train, query, task = spec.parts()
    model = model.to(args.device)
    x_train, y_train = as_tensors(train, "train")
    x_query, y_query = as_tensors(query, "query")
    n_train, n_query = y_train.shape[0], y_query.shape[0]
    check_data_sizes(args, n_train, n_query)
    n_scores = n_query * n_train
    if n_scores > _MAX_SCORES:
        raise UserError(
            f"query: {n_query} x {n_train} scores do not fit in memory; score fewer queries per run"
        )
    task = task or default_task(y_train)
    recorded = _recorded(spec, args.method)
    for name, data, objective in (
        ("train", train, Objective.TRAIN),
        ("query", query, Objective.MEASUREMENT),
    ):
        check_batch(
            model,
            task,
            prepare_batch(next(iter_batches(data, 2, name)), _first_param(model, task)),
            name,
            objective,
        )  # fail fast, before any long step
    log.info(
        "spec %s: %s with %d analysed parameters; %d train, %d query examples",
        args.spec,
        type(model).__name__,
        sum(p.numel() for p in task.parameters(model).values()),
        n_train,
        n_query,
    )
    scores = attribute(model, train, query, task, args, progress, timer, **recorded)
    if world()[0] != 0:  # every rank holds the same scores; rank 0 writes them
        return 0
    queries = args.queries or list(range(min(3, n_query)))
    image_shape = spec.get("image_shape", required=False)
    class_names = spec.get("class_names", required=False) or ()
    display = getattr(spec.module, "display", None)  # a function of the inputs: not called by get
    result = RunResult(
        scores=scores.values.detach().cpu(),
        train_labels=y_train.cpu(),
        query_labels=y_query.cpu(),
        query_predictions=_predictions(model, task, query, args.device),
        self_influence=None
        if scores.self_influence is None
        else scores.self_influence.detach().cpu(),
        train_images=_images(x_train, image_shape, display),
        query_images=_images(x_query, image_shape, display),
        shown=tuple(queries),
        settings=scores.settings,
        class_names=tuple(str(c) for c in class_names),
    )
    write_outputs(folder, "score", args, result, timer, spec=str(args.spec))
    print(format_top_k_table(result, queries, args.top_k))
    print(
        f"scores: {folder / 'results.safetensors'}  top-{args.top_k} per query: {folder / 'top_k.csv'}"
    )
    if args.report:
        print(f"report: {folder / 'report' / 'index.html'}")
    return 0
