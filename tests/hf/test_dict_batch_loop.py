"""A user's training loop over Hugging Face dict batches: ``task.train_loss(model, batch)``
takes the dict batches ``headwater.influence`` takes (the ``"labels"`` are the targets), so
such a loop can be recorded and scored by the metagradient on the same dict batches."""

from __future__ import annotations

import pytest
import torch
from hf_models import classification_batch, gpt2, lm_batch

import headwater
from headwater.train import Recorder
from headwater.train.recorder import replay

transformers = pytest.importorskip("transformers")


def _pair(batch):
    return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]


def test_every_loss_entry_point_takes_a_dict_batch_as_its_pair():
    model = gpt2()
    batch = lm_batch(5, seed=1)
    task = headwater.LanguageModelingTask()
    want = task.train_loss(model, _pair(batch))
    assert torch.equal(task.train_loss(model, batch), want)
    assert torch.equal(task.measurement(model, batch), want)
    config = transformers.BertConfig(
        vocab_size=12,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=6,
        num_labels=3,
    )
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(config).double().eval()
    margin = headwater.ClassificationTask(measurement="margin")
    cls = classification_batch(4, seed=2)
    assert torch.equal(margin.measurement(bert, cls), margin.measurement(bert, _pair(cls)))


@pytest.mark.parametrize(
    "batch",
    [torch.zeros(2, 3), (torch.zeros(2, 3),), (torch.zeros(2, 3), torch.zeros(2), None)],
    ids=["tensor", "one", "three"],
)
def test_a_batch_of_another_form_is_refused_by_name(batch):
    with pytest.raises(
        TypeError, match=r"^batch: expected \(inputs, targets\) or a dict with 'labels'"
    ):
        headwater.ClassificationTask().train_loss(torch.nn.Linear(3, 2), batch)
    with pytest.raises(TypeError, match=r"^batch: a dict batch needs a 'labels' entry"):
        headwater.ClassificationTask().train_loss(torch.nn.Linear(3, 2), {"x": torch.zeros(2, 3)})


def test_a_recorded_loop_over_dict_batches_is_scored_by_the_metagradient():
    model = gpt2().train()  # GPT-2's default dropout: the run's masks are replayed
    train, query = lm_batch(8, seed=0), lm_batch(3, seed=5)
    task = headwater.LanguageModelingTask()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    rec = Recorder(model, opt, n_train=8, checkpoint_every=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for idx in torch.randperm(8, generator=gen).split(4):
            opt.zero_grad()
            batch = {k: v[idx] for k, v in train.items()}  # as a collated DataLoader gives it
            task.train_loss(model, batch).mean().backward()
            rec.step(idx)
    run = rec.finish()
    final = replay(model, task, train, run)
    assert all(torch.equal(final[k], p.detach()) for k, p in model.named_parameters())
    model.eval()
    scores = headwater.influence(
        model, train, query, task=task, method="metagradient", run=run, progress=False
    )
    assert scores.values.shape == (3, 8)
    assert bool(scores.values.isfinite().all()) and bool((scores.values != 0).any())
    assert scores.settings["method"] == "metagradient"
