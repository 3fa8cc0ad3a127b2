"""Tiny Hugging Face models (GPT-2, Llama, BERT, T5, ViT) built from configs: per-example
gradients and exact influence against dense autograd oracles, and ``headwater.influence``
end to end on each with no ``modules=`` and no wrapper module."""

import pytest
import torch
from hf_models import CASES, bert, classification_batch, gpt2, lm_batch, seq2seq_batch, t5
from oracles import assert_close, dense_ggn, influence_scores, loop_gradients

import headwater
from headwater.gradients import stack_gradients
from headwater.task import ClassificationTask, LanguageModelingTask, Seq2SeqTask, tied_note

ORACLE_CASES = [
    (gpt2, lm_batch, LanguageModelingTask()),
    (bert, classification_batch, ClassificationTask()),
    (t5, seq2seq_batch, Seq2SeqTask()),
]


@pytest.mark.parametrize(("build", "batch", "task"), ORACLE_CASES, ids=["gpt2", "bert", "t5"])
def test_per_example_gradients_match_a_loop_of_backward_passes(build, batch, task):
    model = build()
    data = batch(7, 1)
    got = stack_gradients(model, task, data, chunk_size=3)
    assert_close(
        got, loop_gradients(model, task, data), rtol=1e-9, atol=1e-12, what="per-example gradients"
    )
    assert_close(
        stack_gradients(model, task, data, objective="measurement", chunk_size=5),
        loop_gradients(model, task, data, measurement=True),
        rtol=1e-9,
        atol=1e-12,
        what="measurement",
    )


@pytest.mark.parametrize(("build", "batch", "task"), ORACLE_CASES[:2], ids=["gpt2", "bert"])
def test_exact_influence_matches_the_dense_ggn_solve(build, batch, task):
    model = build()
    train, query = batch(6, 1), batch(3, 2)
    damping = 1e-2
    got = headwater.influence(model, train, query, curvature="exact", damping=damping).values
    want = influence_scores(model, task, train, query, dense_ggn(model, task, train), damping)
    assert_close(got, want, rtol=1e-6, atol=1e-9 * float(want.abs().max()), what="exact influence")


@pytest.mark.parametrize("name", sorted(CASES))
def test_influence_runs_on_every_architecture(name):
    """The default task is chosen from the batch (dict labels, config.is_encoder_decoder); CG at a
    fixed damping agrees with the exact solve and identity with plain gradient products."""
    build, batch = CASES[name]
    model = build()
    train, query = batch(8, 1), batch(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = headwater.influence(model, train, query, curvature="exact", damping=0.1).values
    cg = headwater.influence(
        model, train, query, curvature="cg", damping=0.1, curvature_options={"tol": 1e-8}
    ).values
    identity = headwater.influence(model, train, query, curvature="identity")
    assert exact.shape == (3, 8) and torch.isfinite(exact).all()
    assert_close(cg, exact, rtol=1e-5, atol=1e-7 * float(exact.abs().max()), what="CG vs exact")
    task = DEFAULT_TASKS[name]()
    assert identity.settings["task"]["task"] == type(task).__name__
    g_train = stack_gradients(model, task, train)
    g_query = stack_gradients(model, task, query, objective="measurement")
    assert_close(
        identity.values,
        g_query @ g_train.T,
        rtol=1e-8,
        atol=1e-10 * float(identity.values.abs().max()),
        what="identity",
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


DEFAULT_TASKS = {
    "gpt2": LanguageModelingTask,
    "llama": LanguageModelingTask,
    "bert": ClassificationTask,
    "t5": Seq2SeqTask,
    "vit": ClassificationTask,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_ekfac_runs_on_every_architecture(name):
    build, batch = CASES[name]
    scores = headwater.influence(build(), batch(8, 1), batch(3, 2), curvature="ekfac").values
    assert torch.isfinite(scores).all()


def test_tied_lm_head_is_analysed_once_under_its_embedding_name():
    model = gpt2()
    task = LanguageModelingTask(modules=["lm_head"])
    assert list(task.parameters(model)) == ["transformer.wte.weight"]
    assert list(LanguageModelingTask().parameters(model)).count("transformer.wte.weight") == 1
    assert "lm_head" not in " ".join(LanguageModelingTask().parameters(model))
    assert tied_note(model, ["transformer.wte.weight"]) == (
        "; lm_head.weight is tied to transformer.wte.weight (analysed once, as transformer.wte.weight)"
    )
