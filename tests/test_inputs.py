"""Inputs beyond one tensor (a tuple, a dict, a Hugging Face-style dict batch with its labels,
Datasets and DataLoaders of them) and the guards on data: shuffled loaders, float class
labels, unavailable devices; ``top_k`` proponents and opponents."""

import pytest
import torch
from oracles import assert_close, loop_gradients
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

import headwater
import headwater.curvature
from headwater.cli.main import main
from headwater.gradients import stack_gradients
from headwater.task import ClassificationTask, RegressionTask


class TwoTower(nn.Module):
    """Logits from an image-like input and a side input, called as ``model(x, side)`` or
    ``model(x=..., side=...)``; returns a dict with ``"logits"``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 5), nn.Linear(2, 5), nn.Linear(5, 3)

    def forward(self, x, side):
        return {"logits": self.head(torch.tanh(self.a(x) + self.b(side)))}


def _model():
    torch.manual_seed(0)
    return TwoTower().double().eval()


def _data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    side = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, side, torch.randint(0, 3, (n,), generator=g)


class DictDataset(Dataset):
    def __init__(self, n=10, seed=0):
        self.x, self.side, self.y = _data(n, seed)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "side": self.side[i], "labels": self.y[i]}


def _forms(n=10, seed=0):
    x, side, y = _data(n, seed)
    return {
        "tuple": ((x, side), y),
        "dict": ({"x": x, "side": side}, y),
        "hf-batch": {"x": x, "side": side, "labels": y},
        "dataset": DictDataset(n, seed),
        "loader": DataLoader(DictDataset(n, seed), batch_size=3),
        "tuple-loader": DataLoader(
            TensorDataset(x, side, y),
            batch_size=4,
            collate_fn=lambda rows: (
                (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])),
                torch.stack([r[2] for r in rows]),
            ),
        ),
    }


def test_every_input_form_gives_the_per_example_gradients_of_a_loop():
    model, task = _model(), ClassificationTask()
    want = loop_gradients(model, task, ((_data()[0], _data()[1]), _data()[2]))
    for name, data in _forms().items():
        got = stack_gradients(model, task, data, chunk_size=4)
        assert_close(got, want, rtol=1e-10, atol=1e-12, what=f"gradients of {name}")


def test_influence_is_the_same_for_every_input_form_and_needs_no_task():
    model = _model()
    ref = headwater.influence(
        model, _forms()["tuple"], _forms(4, 1)["tuple"], curvature="exact", damping=0.1
    )
    for name, data in _forms().items():
        got = headwater.influence(
            model, data, _forms(4, 1)[name], curvature="exact", damping=0.1, chunk_size=3
        )
        assert_close(got.values, ref.values, rtol=1e-9, atol=1e-12, what=name)


def test_a_shuffled_loader_is_refused():
    data = DictDataset()
    for loader in (
        DataLoader(data, batch_size=4, shuffle=True),
        DataLoader(data, sampler=RandomSampler(data), batch_size=4),
    ):
        with pytest.raises(
            ValueError, match=r"train: the DataLoader does not read its dataset in order"
        ):
            headwater.influence(_model(), loader, _forms(3, 1)["hf-batch"], curvature="identity")


def test_a_dict_batch_without_labels_is_refused():
    x, side, _ = _data()
    with pytest.raises(TypeError, match="train: a dict batch needs a 'labels' entry"):
        headwater.influence(
            _model(), {"x": x, "side": side}, _forms(3, 1)["hf-batch"], curvature="identity"
        )


def test_float_class_labels_name_the_task():
    x, side, y = _data()
    with pytest.raises(
        ValueError, match="ClassificationTask"
    ):  # default task: regression, says why it fails
        headwater.influence(
            _model(), ((x, side), y.double()), ((x, side), y.double()), curvature="identity"
        )
    with pytest.raises(
        (TypeError, ValueError), match="ClassificationTask: targets must be integer class labels"
    ):
        headwater.influence(
            _model(),
            ((x, side), y.double()),
            ((x, side), y.double()),
            task=ClassificationTask(),
            curvature="identity",
        )
    regression = headwater.influence(
        nn.Linear(4, 1).double(), (x, y.double()), (x[:2], y[:2].double()), curvature="identity"
    )  # float targets of the output's size: regression
    assert regression.settings["task"]["task"] == RegressionTask.__name__


def test_top_k_returns_proponents_and_opponents():
    model = _model()
    train, query = _forms()["hf-batch"], _forms(4, 1)["hf-batch"]
    full = headwater.influence(model, train, query, curvature="exact", damping=0.1).values
    for method in ("exact", "cg"):
        top = headwater.influence(
            model,
            train,
            query,
            curvature=method,
            damping=0.1,
            top_k=3,
            curvature_options={"tol": 1e-10} if method == "cg" else None,
        )
        order = full.argsort(dim=1, descending=True)
        assert torch.equal(top.indices, order[:, :3])
        assert torch.equal(top.opponent_indices, order.flip(1)[:, :3])
        assert_close(
            top.opponent_values, full.gather(1, order.flip(1)[:, :3]), rtol=1e-6, atol=1e-10
        )
        assert (top.values[:, -1:] >= top.opponent_values[:, -1:]).all()


@pytest.mark.parametrize("device", ["cuda", "mps", "cuda:3"])
def test_an_unavailable_device_is_one_line_and_exit_2(device, capsys):
    kind = device.split(":")[0]
    if {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}[kind]():
        pytest.skip(f"{device} is available here")
    assert main(["demo", "--device", device, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" in err[0] and "not available" in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_an_unavailable_device_in_the_api_names_the_argument(tmp_path):
    curvature = headwater.curvature.Exact(damping=0.1)
    with pytest.raises(ValueError, match=r"^device: 'cuda:1' is not available .*use 'cpu'$"):
        curvature.load(tmp_path / "nothing", device="cuda:1")
    with pytest.raises(ValueError, match=r"^device: 'gpu' is not a torch device"):
        curvature.load(tmp_path / "nothing", device="gpu")
