"""Causal language models: LanguageModelingTask on a tiny attention model, against dense oracles."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from cases import causal_lm
from oracles import assert_close, dense_ggn, influence_scores, loop_gradients
from torch import nn

import headwater
from headwater.curvature import EKFAC, KFAC, Exact
from headwater.gradients.per_example import per_example_gradients
from headwater.methods import InfluenceFunction
from headwater.methods.factored import module_scores
from headwater.task import LanguageModelingTask, sample_per_example

LINEAR = ["q", "k", "v", "o", "mlp", "head"]  # the K-FAC blocks (embeddings are not)


def test_loss_is_the_summed_next_token_cross_entropy_of_scored_labels():
    task = LanguageModelingTask()
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, 4], [0, -100, -100, 2]])
    want = torch.stack(
        [
            sum(F.cross_entropy(logits[0, t], labels[0, t + 1]) for t in range(3)),
            F.cross_entropy(
                logits[1, 2], labels[1, 3]
            ),  # position 0 -> label 1 and 1 -> 2 are unscored
        ]
    )
    assert_close(task.loss(logits, labels), want, rtol=1e-12)
    with pytest.raises(ValueError, match=r"logits \[B, T, V\]"):
        task.loss(logits[:, 0], labels)
    with pytest.raises(ValueError, match=r"targets must be token ids \[B, T\]"):
        task.loss(logits, labels[:, :3])
    with pytest.raises(TypeError, match="ignore_index"):
        LanguageModelingTask(ignore_index=1.5)


def test_exact_influence_matches_the_dense_ggn_oracle():
    """Per-example gradients through attention (vmap) and the GGN over every position's
    V x V output block agree with one-example-at-a-time autograd."""
    case = causal_lm()
    grads = torch.cat(list(per_example_gradients(case.model, case.task, case.train, chunk_size=5)))
    assert_close(
        grads,
        loop_gradients(case.model, case.task, case.train),
        rtol=1e-10,
        what="per-example gradients",
    )
    est = InfluenceFunction(case.model, case.task, Exact(damping=1e-3), chunk_size=5).fit(
        case.train
    )
    want = influence_scores(
        case.model,
        case.task,
        case.train,
        case.query,
        dense_ggn(case.model, case.task, case.train),
        damping=1e-3,
    )
    assert_close(est.scores(case.query, case.train), want, rtol=1e-8, what="exact influence")
    # the query's prompt labels are unscored: changing them changes nothing
    ids, labels = case.query
    other = labels.clone()
    other[:, 0] = -100
    other[:, 1] = -100
    assert_close(est.scores((ids, other), case.train), want, rtol=1e-8)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_factored_curvature_over_token_positions(cls):
    """K-FAC/EK-FAC on the attention and MLP linear layers ([B, T, d] inputs): every linear
    layer is a block, and the block scores (from hooked per-position inputs and output
    gradients) sum to the flat influence with the same curvature (vmap gradients)."""
    case = causal_lm()
    task = LanguageModelingTask(weight_decay=1e-2, modules=LINEAR)
    curv = cls(damping=1e-3, ggn_estimator="exact", chunk_size=5).fit(case.model, task, case.train)
    flat = InfluenceFunction(case.model, task, curv).scores(case.query, case.train)
    parts = module_scores(case.model, task, curv, case.query, case.train, chunk_size=3)
    assert set(parts) == {"q", "k", "v", "o", "mlp.0", "mlp.2", "head"}
    assert_close(sum(parts.values()), flat, rtol=1e-9, what="sum of module scores")


@pytest.mark.filterwarnings(
    "ignore:.*damped eigenvalue"
)  # undamped on purpose: compared as matrices
def test_ekfac_is_closer_to_the_block_ggn_than_kfac():
    case = causal_lm()
    task = LanguageModelingTask(weight_decay=0.0, modules=LINEAR)
    exact = dense_ggn(case.model, task, case.train)
    mask = torch.zeros_like(exact, dtype=torch.bool)  # the exact GGN's diagonal blocks
    start = 0
    for _, module in ((n, m) for n, m in case.model.named_modules() if isinstance(m, nn.Linear)):
        size = sum(p.numel() for p in module.parameters())
        mask[start : start + size, start : start + size] = True
        start += size
    block = torch.where(mask, exact, torch.zeros_like(exact))
    p = exact.shape[0]
    errors = {}
    for cls in (KFAC, EKFAC):
        curv = cls(damping=0.0, ggn_estimator="exact").fit(case.model, task, case.train)
        dense = curv.matvec(torch.eye(p, dtype=torch.float64))
        errors[cls.name] = float((dense - block).norm() / block.norm())
    assert errors["ekfac"] <= errors["kfac"] + 1e-12, errors
    assert errors["ekfac"] < 0.5, errors  # measured 0.39 (K-FAC 0.64)


@pytest.mark.filterwarnings("ignore:.*damped eigenvalue")
def test_sampled_targets_keep_unscored_positions_and_estimate_the_ggn():
    case = causal_lm()
    task = LanguageModelingTask(modules=LINEAR)
    ids, labels = case.query
    out = task.output(case.model, ids)
    drawn = sample_per_example(task, out, labels, seed=0, first=0, draws=2)
    for d in drawn:
        assert d.shape == labels.shape
        assert (d[:, :2] == -100).all()  # the two prompt labels (the first is never predicted)
        assert ((d[:, 2:] >= 0) & (d[:, 2:] < 7)).all()
    many = tuple(t.repeat(300, 1) for t in case.train)  # 300 draws per sequence
    exact = KFAC(damping=0.0, ggn_estimator="exact").fit(case.model, task, case.train)
    sampled = KFAC(damping=0.0, ggn_estimator="sampled", seed=1, chunk_size=1200).fit(
        case.model, task, many
    )
    p = exact.layout.num_params
    a = exact.matvec(torch.eye(p, dtype=torch.float64))
    b = sampled.matvec(torch.eye(p, dtype=torch.float64))
    error = float((a - b).norm() / a.norm())
    assert error < 0.05, error  # measured 0.015


def test_hugging_face_style_output_objects():
    """A model returning an object with ``.logits`` (as Hugging Face models do) scores the same."""
    case = causal_lm()

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return types.SimpleNamespace(logits=self.inner(ids))

    task = LanguageModelingTask(weight_decay=1e-2)
    plain = headwater.influence(
        case.model, case.train, case.query, task=task, curvature="exact", damping=1e-3
    )
    wrapped = headwater.influence(
        Wrapped(case.model), case.train, case.query, task=task, curvature="exact", damping=1e-3
    )
    assert_close(wrapped.values, plain.values, rtol=1e-12)


@pytest.mark.parametrize("curvature", ["identity", "cg", "ekfac"])
def test_parameters_outside_the_analysed_modules_record_no_graph(curvature):
    """The embeddings are not analysed: they enter as constants, so per-example gradients and
    scores carry no autograd graph (which would keep every chunk's gradients alive)."""
    case = causal_lm()
    task = LanguageModelingTask(weight_decay=1e-2, modules=LINEAR)
    grads = next(per_example_gradients(case.model, task, case.train, chunk_size=5))
    assert grads.grad_fn is None and not grads.requires_grad
    scores = headwater.influence(
        case.model, case.train, case.query, task=task, curvature=curvature, damping=1e-2
    )
    assert scores.values.grad_fn is None and not scores.values.requires_grad
    assert all(p.grad is None and p.requires_grad for p in case.model.parameters())
