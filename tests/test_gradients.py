"""Per-example gradients equal a loop of single-example backward passes."""

import pytest
import torch
from cases import CASES
from oracles import assert_close, loop_gradients
from torch.utils.data import DataLoader, TensorDataset

from headwater.gradients import ParamLayout, stack_gradients
from headwater.task import ClassificationTask


@pytest.mark.parametrize("name", ["mlp", "cnn", "linreg"])
@pytest.mark.parametrize("objective", ["train", "measurement"])
def test_matches_loop(name, objective):
    case = CASES[name]()
    got = stack_gradients(case.model, case.task, case.train, objective=objective, chunk_size=7)
    want = loop_gradients(case.model, case.task, case.train, measurement=objective == "measurement")
    assert_close(got, want, rtol=1e-6, what=f"{name} gradients")


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunk_and_data_form_invariance(chunk):
    case = CASES["cnn"]()
    ref = stack_gradients(case.model, case.task, case.train, chunk_size=3)
    ds = TensorDataset(*case.train)
    for data in (case.train, ds, DataLoader(ds, batch_size=4)):
        got = stack_gradients(case.model, case.task, data, chunk_size=chunk)
        assert_close(got, ref, rtol=1e-12, what="chunked gradients")


def test_module_selection_only_selected():
    case = CASES["mlp"]()
    task = ClassificationTask(modules=["2"])
    got = stack_gradients(case.model, task, case.train)
    assert got.shape == (24, 6 * 3 + 3)
    full = loop_gradients(case.model, case.task, case.train)
    assert_close(got, full[:, -21:], what="last-layer gradients")
    assert not got.requires_grad  # no autograd graph back to the frozen first layer


def test_layout_round_trip():
    params = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    layout = ParamLayout.of(params)
    flat = layout.flatten(params)
    assert flat.shape == (10,)
    back = layout.unflatten(flat)
    assert all(torch.equal(back[k], params[k]) for k in params)


@pytest.mark.parametrize("modules", [["q", "k", "v", "o", "mlp"], ["embed"], None])
def test_tied_weights(modules):
    """The head shares the embedding's weight (GPT-2): with or without the tied tensor among
    the analysed parameters, its every use counts, as in a loop of backward passes."""
    from cases import causal_lm

    from headwater.task import LanguageModelingTask

    case = causal_lm(tied=True)
    task = LanguageModelingTask(modules=modules)
    got = stack_gradients(case.model, task, case.train, chunk_size=5)
    assert_close(
        got, loop_gradients(case.model, task, case.train), rtol=1e-10, what=f"tied, {modules}"
    )
