"""``headwater.influence`` refuses bad arguments up front, naming the argument and what was
expected: an input the method does not read, objects of the wrong type, data whose shape
does not fit the model on every curvature path, DataLoaders that do not yield every example
in order, and method options of the wrong type."""

from __future__ import annotations

import re

import pytest
import torch
from cases import Case, mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import headwater
from headwater.errors import InputError
from headwater.methods.metagradient import Metagradient
from headwater.methods.registry import AttributionSettings
from headwater.methods.tracin import Checkpoint
from headwater.task import ClassificationTask
from headwater.train import Recorder, with_indices


def _recorded(case):
    """A short SGD run of ``case``'s model recorded from a user-style loop."""
    x, y = case.train
    n = y.shape[0]
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    rec = Recorder(case.model, opt, n_train=n, checkpoint_every=2)
    for idx in torch.randperm(n, generator=torch.Generator().manual_seed(0)).split(6):
        opt.zero_grad()
        case.task.train_loss(case.model, (x[idx], y[idx])).mean().backward()
        rec.step(idx)
    return rec.finish()


@pytest.mark.parametrize(
    ("method", "given", "users"),
    [
        ("influence", "run", "tracin, metagradient"),
        ("influence", "checkpoints", "tracin"),
        ("influence", "trajectory", "hydra"),
        ("hydra", "run", "tracin, metagradient"),
        ("metagradient", "trajectory", "hydra"),
        ("metagradient", "checkpoints", "tracin"),
        ("tracin", "trajectory", "hydra"),
    ],
)
def test_an_input_the_method_does_not_read_is_refused(method, given, users):
    case = mlp(n_train=12, n_query=3)
    run = _recorded(case)
    objects = {
        "run": run,
        "checkpoints": [Checkpoint(case.model.state_dict(), lr=0.1)],
        "trajectory": object(),  # refused for not being used, before its type is looked at
    }
    needed = {"tracin": {"run": run}, "metagradient": {"run": run}}.get(method, {})
    if method == "hydra":
        needed = {"trajectory": object()}
    kwargs = {**needed, given: objects[given]}
    with pytest.raises(
        ValueError, match=rf"^{given}: not used by method='{method}' \(used by: {users}\)$"
    ):
        headwater.influence(
            case.model,
            case.train,
            case.query,
            task=case.task,
            method=method,
            progress=False,
            **kwargs,
        )


def test_the_run_is_read_by_tracin_and_the_metagradient_and_type_checked():
    case = mlp(n_train=12, n_query=3)
    run = _recorded(case)
    tracin = headwater.influence(
        case.model,
        case.train,
        case.query,
        task=case.task,
        method="tracin",
        run=run,
        progress=False,
    )
    assert tracin.values.shape == (3, 12) and bool(tracin.values.isfinite().all())
    with pytest.raises(TypeError, match=r"^run: expected a headwater RunRecord .*got object$"):
        headwater.influence(
            case.model,
            case.train,
            case.query,
            task=case.task,
            method="tracin",
            run=object(),
            progress=False,
        )
    with pytest.raises(TypeError, match=r"^trajectory: expected a headwater Trajectory"):
        headwater.influence(
            case.model,
            case.train,
            case.query,
            task=case.task,
            method="hydra",
            trajectory=object(),
            progress=False,
        )
    with pytest.raises(ValueError, match=r"^run: method='tracin' takes its checkpoints"):
        headwater.influence(
            case.model,
            case.train,
            case.query,
            task=case.task,
            method="tracin",
            run=run,
            checkpoints=[Checkpoint(case.model.state_dict(), lr=0.1)],
            progress=False,
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"task": "classification"},
            TypeError,
            r"^task: expected a headwater Task instance \(e\.g\. headwater\.ClassificationTask\(\)\), "
            r"got str 'classification'$",
        ),
        (
            {"task": headwater.ClassificationTask},
            TypeError,
            r"^task: expected a headwater Task instance .*got the class ClassificationTask "
            r"\(instantiate it: ClassificationTask\(\)\)$",
        ),
        ({"model": lambda t: t}, TypeError, r"^model: expected a torch\.nn\.Module"),
        ({"self_influence": "no"}, TypeError, r"^self_influence: expected a bool .*got 'no'$"),
        ({"self_influence": 1}, TypeError, r"^self_influence: expected a bool"),
        ({"read_only_store": "yes"}, TypeError, r"^read_only_store: expected a bool"),
        (
            {"method": "tracin", "renormalize": "false", "checkpoints": []},
            TypeError,
            r"^renormalize: expected a bool",
        ),
        ({"progress": "no"}, TypeError, r"^progress: expected True, False or a callable"),
    ],
)
def test_an_argument_of_the_wrong_type_is_named(kwargs, error, message):
    case = mlp(n_train=12, n_query=3)
    kwargs = {"model": case.model, "task": case.task, "progress": False, **kwargs}
    model = kwargs.pop("model")
    with pytest.raises(error, match=message):
        headwater.influence(model, case.train, case.query, **kwargs)


def test_a_model_of_the_wrong_type_is_named_wherever_parameters_are_selected():
    case = mlp(n_train=12, n_query=3)
    with pytest.raises(TypeError, match=r"^model: expected a torch\.nn\.Module .*got function$"):
        case.task.parameters(lambda t: t)


PATHS = {  # every way headwater.influence runs the model first
    "auto": {},
    "ekfac": {"curvature": "ekfac"},
    "exact": {"curvature": "exact"},
    "projection": {"projection": 8},
    "tracin": {"method": "tracin"},
    "metagradient": {"method": "metagradient"},
}


def _shape_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("where", ["train", "query"])
def test_inputs_of_the_wrong_shape_name_the_set_on_every_path_before_any_step(path, where):
    model, x, y = _shape_case()
    wide = torch.randn(30, 6)
    train, query = ((wide, y), (x[:4], y[:4])) if where == "train" else ((x, y), (wide[:4], y[:4]))
    kwargs = dict(PATHS[path])
    if kwargs.get("method") == "tracin":
        kwargs["checkpoints"] = [Checkpoint(model.state_dict(), lr=0.1)]
    if kwargs.get("method") == "metagradient":
        kwargs["run"] = _recorded(Case("mlp", model, headwater.ClassificationTask(), (x, y), ()))
    stages = []
    with pytest.raises(InputError, match=rf"^{where}: inputs of shape \(2, 6\) .*do not fit"):
        headwater.influence(model, train, query, progress=lambda *a: stages.append(a), **kwargs)
    assert stages == []  # refused before the curvature choice, a fit or any gradient


@pytest.mark.parametrize(
    ("labels", "shape"),
    [
        (lambda y: y[:, None], r"\(30, 1\)"),
        (lambda y: torch.nn.functional.one_hot(y, 3), r"\(30, 3\)"),
    ],
    ids=["column", "one-hot"],
)
def test_classifier_labels_of_the_wrong_shape_name_the_targets(labels, shape):
    model, x, y = _shape_case()
    with pytest.raises(
        InputError,
        match=rf"^targets: integer labels of shape {shape} \(the model's outputs: \[B, 3\]\); "
        r"expected shape \(30,\) for classification .*or pass task=",
    ):
        headwater.influence(model, (x, labels(y)), (x[:4], y[:4]), progress=False)
    with pytest.raises(
        InputError, match=r"^train: .*targets must be class indices of shape \[B\] = \(2,\)"
    ):
        headwater.influence(
            model,
            (x, labels(y)),
            (x[:4], y[:4]),
            task=headwater.ClassificationTask(),
            progress=False,
        )
    with pytest.raises(InputError, match=r"^targets: integer labels of shape \(30, 2, 2\);"):
        headwater.influence(
            model, (x, torch.zeros(30, 2, 2, dtype=torch.long)), (x[:4], y[:4]), progress=False
        )


def test_a_dataset_wrapped_for_the_training_loop_is_refused_naming_the_set():
    model, x, y = _shape_case()
    wrapped = with_indices(TensorDataset(x, y))
    for data in (wrapped, DataLoader(wrapped, batch_size=8)):
        with pytest.raises(
            TypeError,
            match=r"^train: a dataset wrapped by headwater\.train\.with_indices yields "
            r"\(item, index\) pairs .*pass the dataset itself",
        ):
            headwater.influence(model, data, (x[:4], y[:4]), progress=False)
        with pytest.raises(TypeError, match=r"^query: a dataset wrapped by .*with_indices"):
            headwater.influence(model, (x, y), data, progress=False)
    found = headwater.influence(
        model, wrapped.dataset, (x[:4], y[:4]), curvature="identity", progress=False
    )
    want = headwater.influence(model, (x, y), (x[:4], y[:4]), curvature="identity", progress=False)
    torch.testing.assert_close(found.values, want.values, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("where", ["train", "query"])
def test_a_loader_that_does_not_yield_every_example_in_batches_is_refused_up_front(where):
    model, x, y = _shape_case()
    data = TensorDataset(x, y)
    loaders = {
        "drop_last": (
            DataLoader(data, batch_size=8, drop_last=True),
            rf"^{where}: the DataLoader has drop_last=True and never yields the last 6 of the "
            r"dataset's 30 examples",
        ),
        "batch_size=None": (
            DataLoader(data, batch_size=None),
            rf"^{where}: the DataLoader has batch_size=None, so it yields single examples",
        ),
    }
    for loader, message in loaders.values():
        train, query = (loader, (x[:4], y[:4])) if where == "train" else ((x, y), loader)
        stages = []
        with pytest.raises(InputError, match=message):
            headwater.influence(model, train, query, progress=lambda *a, s=stages: s.append(a))
        assert stages == []  # before the curvature choice and any fit
    whole = DataLoader(data, batch_size=10, drop_last=True)  # drops nothing: read in full
    train, query = (whole, (x[:4], y[:4])) if where == "train" else ((x, y), whole)
    found = headwater.influence(model, train, query, curvature="identity", progress=False)
    want = headwater.influence(
        model,
        (x, y) if where == "train" else train,
        (x, y) if where == "query" else query,
        curvature="identity",
        progress=False,
    )
    torch.testing.assert_close(found.values, want.values, rtol=1e-6, atol=1e-7)


def test_the_metagradient_dtype_option_takes_a_dtype_or_its_name_and_refuses_anything_else():
    case = mlp(n_train=12, n_query=3)
    run, task = _recorded(case), headwater.ClassificationTask()  # the run's: no weight decay

    def scores(**options):
        return headwater.influence(
            case.model,
            case.train,
            case.query,
            task=task,
            method="metagradient",
            run=run,
            method_options=options,
            progress=False,
        )

    want = scores(dtype=torch.float32)
    assert want.values.dtype == torch.float32 and want.settings["dtype"] == "float32"
    for name in ("float32", "torch.float32"):
        got = scores(dtype=name)
        assert got.settings["dtype"] == "float32"
        torch.testing.assert_close(got.values, want.values, rtol=0, atol=0)
    assert scores(dtype="float64").settings["dtype"] == "float64"
    for bad in ("int64", "float128", "fp64", "Tensor", torch.int64, 64):
        with pytest.raises(
            (TypeError, ValueError),
            match=r"^method_options: dtype: expected a torch\.dtype or one of 'float32', "
            rf"'float64', got {re.escape(repr(bad))}$",
        ):
            AttributionSettings(method="metagradient", method_options={"dtype": bad})
    with pytest.raises(TypeError, match=r"^method_options: hessian_free: expected a bool"):
        scores(hessian_free="no")
    with pytest.raises(ValueError, match=r"^dtype: expected a torch\.dtype"):
        Metagradient(case.model, task, run, dtype="int64")
    direct = Metagradient(case.model, task, run, dtype="float32")
    torch.testing.assert_close(
        direct.attribute(case.query, case.train).values, want.values, rtol=0, atol=0
    )


def test_a_tasks_own_error_on_any_batch_names_the_set():
    """check_batch (every batch a method reads, not only the first ones api.check_data reads)
    puts the set's name before the task's own ValueError / TypeError."""
    from headwater.gradients.per_example import check_batch

    class Picky(ClassificationTask):
        def __init__(self, error: type[Exception]):
            super().__init__()
            self.error = error

        def train_loss(self, model, batch):
            raise self.error("the targets of this batch are not what this task takes")

    model = nn.Linear(5, 3)
    batch = (torch.randn(4, 5), torch.randint(0, 3, (4,)))
    with pytest.raises(InputError, match=r"^train: the targets of this batch"):
        check_batch(model, Picky(ValueError), batch, "train")
    with pytest.raises(TypeError, match=r"^query: the targets of this batch"):
        check_batch(model, Picky(TypeError), batch, "query")
