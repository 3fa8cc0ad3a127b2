"""Tiny seeded test cases (float64, <= ~200 parameters) and the digits problem."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import Tensor, nn

from headwater.task import ClassificationTask, LanguageModelingTask, RegressionTask, Task


@dataclass
class Case:
    name: str
    model: nn.Module
    task: Task
    train: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def mlp(seed: int = 0, n_train: int = 24, n_query: int = 5) -> Case:
    """2-layer tanh MLP, 4 -> 6 -> 3 classes (51 parameters)."""
    model = _init(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double(), seed)
    g = _gen(seed + 1)
    x = torch.randn(n_train + n_query, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n_train + n_query,), generator=g)
    task = ClassificationTask(weight_decay=1e-2)
    return Case("mlp", model, task, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]))


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def cnn(seed: int = 0, n_train: int = 20, n_query: int = 4) -> Case:
    """One 3x3 conv (2 channels) on 5x5 images, then a linear layer (77 parameters)."""
    model = _init(TinyCNN().double(), seed)
    g = _gen(seed + 1)
    x = torch.randn(n_train + n_query, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n_train + n_query,), generator=g)
    task = ClassificationTask(weight_decay=1e-2, measurement="margin")
    return Case("cnn", model, task, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]))


def linear_regression(seed: int = 0, n_train: int = 30, n_query: int = 5) -> Case:
    """Linear regression 5 -> 2 outputs with squared error (12 parameters)."""
    model = _init(nn.Linear(5, 2).double(), seed)
    g = _gen(seed + 1)
    x = torch.randn(n_train + n_query, 5, generator=g, dtype=torch.float64)
    y = x @ torch.randn(5, 2, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        n_train + n_query, 2, generator=g, dtype=torch.float64
    )
    task = RegressionTask(weight_decay=1e-3)
    return Case("linreg", model, task, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]))


class TinyCausalLM(nn.Module):
    """Token and position embeddings, one causal self-attention block (q, k, v, o linear
    layers over ``[B, T, d]``), a tanh MLP on every position and a linear LM head."""

    def __init__(self, vocab: int = 7, d: int = 4, max_len: int = 6) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        scores = self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril()
        attn = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        h = h + self.o(attn @ self.v(h))
        h = h + self.mlp(h)
        return self.head(h)


def causal_lm(
    seed: int = 0,
    n_train: int = 16,
    n_query: int = 4,
    length: int = 5,
    prompt: int = 2,
    tied: bool = False,
) -> Case:
    """A tiny causal language model (7 tokens, width 4; 239 parameters) on random token
    sequences; queries score only their completion (the first ``prompt`` labels are -100).
    ``tied``: the head's weight is the token embedding (as in GPT-2)."""
    model = _init(TinyCausalLM(max_len=length).double(), seed)
    if tied:
        model.head.weight = model.embed.weight
    g = _gen(seed + 1)
    ids = torch.randint(0, 7, (n_train + n_query, length), generator=g)
    labels = ids.clone()
    labels[n_train:, :prompt] = -100  # queries: -log p(completion | prompt)
    task = LanguageModelingTask(weight_decay=1e-2)
    return Case(
        "causal_lm",
        model,
        task,
        (ids[:n_train], labels[:n_train]),
        (ids[n_train:], labels[n_train:]),
    )


class OutsideUse(nn.Module):
    """``b``'s weight is also used by a plain ``F.linear`` outside ``b``'s forward, which
    hooks on ``b`` do not see."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h) + 0.5 * nn.functional.linear(h.flip(1), self.b.weight)


CASES = {"mlp": mlp, "cnn": cnn, "linreg": linear_regression}


@cache
def digits(
    n_train: int = 1000, n_test: int = 200, seed: int = 0, dtype: torch.dtype = torch.float64
):
    """Standardised scikit-learn digits, a fixed random split: ``(Xtr, ytr, Xte, yte)``."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(x))
    x = torch.tensor(x[perm], dtype=dtype)
    y = torch.tensor(y[perm], dtype=torch.long)
    xtr, ytr = x[:n_train], y[:n_train]
    xte, yte = x[n_train : n_train + n_test], y[n_train : n_train + n_test]
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-3)
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte
