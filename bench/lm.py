"""``make bench-lm``: influence on a small causal transformer language model, headwater vs Kronfluence.

Problem (generated in code, no download): character-level two-digit addition,
``"^12+07=019;"`` (``^`` starts a sequence, ``;`` ends it; 14 tokens, length 11).
Operand pairs are drawn without replacement from a seeded generator: 1,000 training
sequences (every label scored: a language model learns the whole string, so the
operands' digits, unpredictable, are most of its loss) and 100 query sequences whose
prompt ``"^12+07="`` is labelled -100, so the measurement is
``-log p("019;" | "^12+07=")`` (Grosse et al. 2023's query function).

Model: a 2-block pre-LayerNorm causal transformer (token + position embeddings,
4-head attention with separate q/k/v/o ``nn.Linear`` layers, GELU MLP 48-96-48, final
LayerNorm, linear LM head; 40k parameters), trained with
``headwater.train.ensemble.train_ensemble`` (one member, all weights 1, the plain
``torch.optim.Adam`` loop) so that it is *one member of the LDS recipe* on the full data:
objective ``(1/n) Σ_i ℓ_i + (wd/2)‖θ‖²`` with ``ℓ_i`` the summed token cross-entropy of
sequence ``i`` (``LanguageModelingTask``) and the L2 term on every parameter.

Analysed parameters: the 13 ``nn.Linear`` layers (``modules=``; 38k parameters),
for every method. Weight decay enters every curvature as ``+wd·I`` and the damping
``λ = DAMPING`` on top; Kronfluence gets ``damping_factor = λ + wd`` (bench/peers.py).

Methods (same model, same process): headwater EK-FAC / K-FAC (``ggn_estimator="auto"``,
which for ``T·V = 154`` outputs per sequence resolves to ``"sampled"``: one target
sequence drawn from the model per training sequence, i.e. the true Fisher; checked equal
to ``"sampled"``), EK-FAC with another sampling seed, with the exact GGN expectation (154
cotangents per sequence), with the empirical Fisher and with the heuristic damping (with
and without the L2 term), CG on the GGN itself (EK-FAC preconditioned, a budget of 30
iterations: at this damping 100 iterations left query gradients at relative residuals
0.07-0.42, and random vectors needed ~280 to reach 0.1), LiSSA
(EK-FAC preconditioned, depth 8), the Kronecker projection (LoGra) and the identity
(gradient similarity); Kronfluence EK-FAC (true Fisher with sampled labels; matched
damping and its heuristic damping) and with the empirical Fisher, the one setting in which
both libraries are deterministic and must agree to float32 round-off.

Columns: wall time and peak RSS increase (``bench.measure``), Pearson/Spearman of the
flattened ``[100, 1000]`` score matrix with headwater's EK-FAC and Kronfluence's EK-FAC
(matched damping), LDS (``headwater.evaluate.lds``: random halves retrained with the
same recipe, vmapped, cached in bench/.cache; mean +- s.e. over queries).

    python -m bench.lm [--only NAME ...] [--no-peers] [--subsets 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor, nn

import headwater
from bench.measure import measure
from bench.problems import CACHE_DIR
from headwater.curvature import CURVATURES
from headwater.curvature.kfac import GGNEstimator
from headwater.evaluate.lds import LDSGroundTruth, lds, lds_ground_truth, spearman_rows
from headwater.gradients.projection import KroneckerProjection
from headwater.methods import InfluenceFunction
from headwater.task import LanguageModelingTask
from headwater.train.ensemble import TrainConfig, train_ensemble

__all__ = ["ArithmeticLM", "LMProblem", "corpus", "get_lm_problem", "main"]

RESULTS = Path(__file__).resolve().parent / "lm_results.md"
VOCAB = "0123456789+=^;"
LENGTH = 11  # "^12+07=019;"
PROMPT = 7  # "^12+07=": labels -100 on queries
N_TRAIN, N_QUERY = 1000, 100
WEIGHT_DECAY = 1e-3
DAMPING = 1e-3  # absolute λ on the mean objective, on top of the weight decay
LDS_SUBSETS, LDS_SEEDS = 100, 2
IGNORE = -100
_CACHE_FORMAT = 1
LOAD_AT_START = [float("nan")]  # os.getloadavg()[0] when main() starts

SETTINGS = {
    "problem": "lm-addition",
    "vocab": VOCAB,
    "length": LENGTH,
    "n_train": N_TRAIN,
    "n_query": N_QUERY,
    "corpus_seed": 0,
    "d_model": 48,
    "heads": 4,
    "blocks": 2,
    "d_mlp": 96,
    "weight_decay": WEIGHT_DECAY,
    "optimizer": "adam",
    "lr": 3e-3,
    "epochs": 40,
    "batch_size": 32,
    "init_seed": 0,
    "train_dtype": "float32",
    "_format": _CACHE_FORMAT,
}


# ----------------------------------------------------------------------------- data


def corpus(n: int = N_TRAIN + N_QUERY, seed: int = 0) -> list[str]:
    """``n`` distinct addition strings ``"^ab+cd=efg;"`` (operands 0-99, zero-padded), seeded."""
    pairs = np.random.default_rng(seed).choice(100 * 100, size=n, replace=False)
    return [f"^{a:02d}+{b:02d}={a + b:03d};" for a, b in zip(pairs // 100, pairs % 100)]


def encode(strings: list[str]) -> Tensor:
    """Token ids ``[B, T]`` (int64), one character per token."""
    return torch.tensor([[VOCAB.index(c) for c in s] for s in strings], dtype=torch.long)


# ----------------------------------------------------------------------------- model


class Block(nn.Module):
    """Pre-LN causal self-attention (separate q/k/v/o linear layers) and a GELU MLP."""

    def __init__(self, d: int, heads: int, d_mlp: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, d_mlp), nn.Linear(d_mlp, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def split(z: Tensor) -> Tensor:  # [B, T, d] -> [B, heads, T, d/heads]
            return z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ArithmeticLM(nn.Module):
    """Token + position embeddings, ``blocks`` pre-LN transformer blocks, LayerNorm, LM head."""

    def __init__(
        self,
        vocab: int = len(VOCAB),
        d: int = 48,
        heads: int = 4,
        blocks: int = 2,
        d_mlp: int = 96,
        max_len: int = LENGTH,
    ):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads, d_mlp) for _ in range(blocks))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # [B, T, V]


def linear_modules(model: nn.Module) -> list[str]:
    """Names of the analysed modules: every ``nn.Linear`` (attention, MLP, head)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


# ----------------------------------------------------------------------------- problem


@dataclass(frozen=True)
class LMProblem:
    """The trained model and its data; ``train``/``query`` are ``(ids, labels)`` pairs."""

    model: nn.Module
    train: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return int(self.train[0].shape[0])

    @property
    def modules(self) -> list[str]:
        return linear_modules(self.model)

    def task(self, weight_decay: float = WEIGHT_DECAY) -> LanguageModelingTask:
        """The analysed task: Linear layers only (the L2 term's curvature there is ``wd·I``)."""
        return LanguageModelingTask(weight_decay=weight_decay, modules=self.modules)

    def fit_task(self) -> LanguageModelingTask:
        """The training objective: L2 on *every* parameter (retraining must use this one:
        ``train_ensemble`` regularises only the task's selected parameters)."""
        return LanguageModelingTask(weight_decay=WEIGHT_DECAY)

    def train_config(self) -> TrainConfig:
        s = self.settings
        return TrainConfig(
            optimizer=s["optimizer"], lr=s["lr"], epochs=s["epochs"], batch_size=s["batch_size"]
        )

    def completion_accuracy(self, data: tuple[Tensor, Tensor] | None = None) -> tuple[float, float]:
        """(exact-match accuracy of the completion, mean -log p(completion | prompt)).
        Teacher-forced argmax at every completion position; all correct <=> greedy decoding
        reproduces the completion exactly."""
        ids, _ = self.query if data is None else data
        labels = ids.clone()
        labels[:, :PROMPT] = IGNORE
        with torch.no_grad():
            logits = self.model(ids)
            pred = logits[:, PROMPT - 1 : -1].argmax(-1)
            nll = self.task().measurement(self.model, (ids, labels))
        return float((pred == ids[:, PROMPT:]).all(dim=1).double().mean()), float(nll.mean())


def _key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def get_lm_problem(use_cache: bool = True) -> LMProblem:
    """The corpus and the trained model (cached in bench/.cache by a hash of SETTINGS)."""
    s = SETTINGS
    ids = encode(corpus(N_TRAIN + N_QUERY, s["corpus_seed"]))
    train = (ids[:N_TRAIN], ids[:N_TRAIN].clone())
    q_ids = ids[N_TRAIN:]
    q_labels = q_ids.clone()
    q_labels[:, :PROMPT] = IGNORE
    model = ArithmeticLM(d=s["d_model"], heads=s["heads"], blocks=s["blocks"], d_mlp=s["d_mlp"])
    path = CACHE_DIR / f"lm-{_key(s)}.pt"
    problem = LMProblem(model, train, (q_ids, q_labels), dict(s))
    if use_cache and path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        config = dataclasses.replace(problem.train_config(), vectorize="loop")
        ensemble = train_ensemble(
            model,
            problem.fit_task(),
            train,
            torch.ones(1, N_TRAIN),
            config=config,
            seeds=[s["init_seed"]],
        )
        model.load_state_dict({k: v[0] for k, v in {**ensemble.params, **ensemble.buffers}.items()})
        if use_cache:
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(model.state_dict(), tmp)
            tmp.replace(path)
    model.eval()
    return problem


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Entry:
    """One method: ``run(problem) -> (scores [n_query, n_train], note)`` in headwater's convention."""

    name: str
    library: str
    run: Callable[[LMProblem], tuple[Tensor, str]]
    settings: dict[str, Any] = field(default_factory=dict)


def _headwater(
    curvature: str | None = None,
    *,
    damping: float | None = DAMPING,
    kind: str = "ggn",
    projection: tuple[int, int] | None = None,
    weight_decay: float = WEIGHT_DECAY,
    **options: Any,
) -> Callable[[LMProblem], tuple[Tensor, str]]:
    """``headwater.influence`` on the Linear layers; CG and LiSSA go through
    ``InfluenceFunction`` so that their solver diagnostics reach the note."""

    def run(problem: LMProblem) -> tuple[Tensor, str]:
        task = problem.task(weight_decay)
        if curvature in ("cg", "lissa"):
            curv = CURVATURES[curvature](kind=kind, damping=damping, **options)
            values = (
                InfluenceFunction(problem.model, task, curv)
                .fit(problem.train)
                .scores(problem.query, problem.train)
            )
            return values, _solver_note(curv)
        return headwater.influence(
            problem.model,
            problem.train,
            problem.query,
            task=task,
            curvature=curvature,
            damping=damping,
            kind=kind,
            projection=None if projection is None else KroneckerProjection(*projection),
            curvature_options=options,
        ).values, ""

    return run


def _solver_note(curv: Any) -> str:
    info = curv.last_info
    if info is None:
        return ""
    if hasattr(info, "residuals"):  # CG
        res = info.residuals.double()
        return (
            f"CG {'converged' if info.converged else 'NOT converged'} after {info.iterations} iterations: "
            f"relative residual median {float(res.median()):.2f}, max {float(res.max()):.2f}"
        )
    return (
        f"LiSSA scale {curv.fitted_scale:.3g}, {info.steps} steps, worst relative residual "
        f"{info.residual:.2g}"
    )


HEADWATER_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("ekfac", {"curvature": "ekfac", "ggn_estimator": "auto"}),
    (
        "ekfac-sampled",
        {"curvature": "ekfac", "ggn_estimator": "sampled"},
    ),  # what "auto" resolves to
    (
        "ekfac-seed1",
        {"curvature": "ekfac", "ggn_estimator": "sampled", "seed": 1},
    ),  # other sampled targets
    (
        "ekfac-exact-ggn",
        {"curvature": "ekfac", "ggn_estimator": "exact"},
    ),  # T*V = 154 cotangents per sequence
    ("ekfac-ef", {"curvature": "ekfac", "kind": "ef"}),
    ("ekfac-heuristic", {"curvature": "ekfac", "damping": None}),
    (
        "ekfac-heuristic-no-wd",
        {"curvature": "ekfac", "damping": None, "weight_decay": 0.0},
    ),  # = Kronfluence's
    ("kfac", {"curvature": "kfac", "ggn_estimator": "auto"}),
    # the GGN itself, matrix-free, on a fixed budget (~280 iterations reach tol 0.1 on random vectors)
    (
        "cg-ekfac-30it",
        {"curvature": "cg", "preconditioner": "ekfac", "tol": 0.1, "max_iter": 30, "warn": False},
    ),
    ("lissa-ekfac", {"curvature": "lissa", "preconditioner": "ekfac", "depth": 8, "tol": 0.0}),
    ("kron-ggn-8x8", {"projection": (8, 8), "ggn_estimator": "auto"}),
    ("kron-ggn-16x16", {"projection": (16, 16), "ggn_estimator": "auto"}),
    ("identity", {"curvature": "identity"}),
]


def headwater_entries() -> list[Entry]:
    auto = GGNEstimator.AUTO.resolve(
        LENGTH * len(VOCAB)
    ).value  # what "auto" does for [T, V] logits
    entries = []
    for name, spec in HEADWATER_METHODS:
        settings = {"damping": spec.get("damping", DAMPING), **spec}
        if spec.get("ggn_estimator") == "auto":
            settings["ggn_estimator"] = f"auto (= {auto})"
        entries.append(Entry(name, "headwater", _headwater(**spec), settings))
    return entries


def _kronfluence_scores(
    problem: LMProblem,
    *,
    damping_factor: float | None,
    empirical_fisher: bool,
    batch_size: int = 100,
    seed: int = 0,
) -> Tensor:
    """Kronfluence EK-FAC pairwise scores ``[n_query, n_train]`` with its own LM task.

    ``compute_train_loss``: next-token cross-entropy *summed* over the batch's scored tokens
    (logits at ``t`` predict labels at ``t + 1``, ``ignore_index=-100``), Kronfluence's
    convention; with ``sample=True`` each scored position's label is drawn from the model
    (true Fisher; unscored positions stay -100), as in Kronfluence's own LM examples.
    ``compute_measurement``: the same summed loss with the query labels (prompt -100), i.e.
    ``Σ_q -log p(completion_q | prompt_q)``; no sign flip: positive = helpful, like headwater.
    Kronfluence tracks every ``nn.Linear`` (its default): the same modules as ``problem.task()``.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    def summed_nll(logits: Tensor, labels: Tensor) -> Tensor:
        shifted = labels[:, 1:]
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            shifted.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )

    class _LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            ids, labels = batch
            logits = model(ids)
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits[:, :-1].detach(), dim=-1).reshape(
                        -1, logits.shape[-1]
                    )
                    drawn = torch.multinomial(probs, 1).reshape(labels.shape[0], -1)
                    drawn[labels[:, 1:] == IGNORE] = IGNORE
                labels = torch.cat([labels[:, :1], drawn], dim=1)
            return summed_nll(logits, labels)

        def compute_measurement(self, batch, model):
            ids, labels = batch
            return summed_nll(model(ids), labels)

    task = _LMTask()
    model = prepare_model(copy.deepcopy(problem.model), task)
    dt = torch.float32
    fa = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=empirical_fisher,
        activation_covariance_dtype=dt,
        gradient_covariance_dtype=dt,
        per_sample_gradient_dtype=dt,
        lambda_dtype=dt,
        eigendecomposition_dtype=torch.float64,
    )
    sa = ScoreArguments(
        damping_factor=damping_factor,
        per_sample_gradient_dtype=dt,
        precondition_dtype=dt,
        score_dtype=dt,
    )
    train, query = TensorDataset(*problem.train), TensorDataset(*problem.query)
    with tempfile.TemporaryDirectory(prefix="bench-lm-kronfluence-") as out:
        analyzer = Analyzer(
            analysis_name="lm",
            model=model,
            task=task,
            cpu=True,
            disable_tqdm=True,
            output_dir=out,
            log_level=40,
        )
        torch.manual_seed(seed)  # Kronfluence samples labels from the global RNG
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train,
            per_device_batch_size=batch_size,
            factor_args=fa,
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name="ekfac",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=len(query),
            per_device_train_batch_size=batch_size,
            score_args=sa,
            overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores("pairwise")["all_modules"].clone()


def kronfluence_entries() -> list[Entry]:
    try:
        import kronfluence  # noqa: F401
    except ImportError as err:
        print(f"[bench-lm] kronfluence unavailable ({err}); run `make bench-lm`", file=sys.stderr)
        return []
    matched = DAMPING + WEIGHT_DECAY
    return [
        Entry(
            "kronfluence-ekfac",
            "kronfluence",
            lambda p: (_kronfluence_scores(p, damping_factor=matched, empirical_fisher=False), ""),
            {"damping_factor": matched, "fisher": "true (sampled labels)"},
        ),
        Entry(
            "kronfluence-ekfac-heuristic",
            "kronfluence",
            lambda p: (
                _kronfluence_scores(p, damping_factor=None, empirical_fisher=False),
                "heuristic damping: neither λ nor the L2 term enters",
            ),
            {
                "damping_factor": "None (0.1 x mean eigenvalue per module)",
                "fisher": "true (sampled labels)",
            },
        ),
        Entry(
            "kronfluence-ekfac-ef",
            "kronfluence",
            lambda p: (_kronfluence_scores(p, damping_factor=matched, empirical_fisher=True), ""),
            {"damping_factor": matched, "fisher": "empirical"},
        ),
    ]


# ----------------------------------------------------------------------------- quality


def lds_truth(problem: LMProblem, n_subsets: int = LDS_SUBSETS) -> LDSGroundTruth:
    """Measurements of every query after retraining on ``n_subsets`` random halves with the
    model's own recipe (all parameters trained and regularised); stored in bench/.cache."""
    config = dataclasses.replace(problem.train_config(), members_per_pass=25)
    return lds_ground_truth(
        problem.model,
        problem.fit_task(),
        problem.train,
        problem.query,
        n_subsets=n_subsets,
        alpha=0.5,
        seeds_per_subset=LDS_SEEDS,
        config=config,
        store_dir=CACHE_DIR,
        progress=_progress,
    )


def _progress(stage: str, done: int, total: int) -> None:
    print(
        f"\r[bench-lm] {stage}: {done}/{total}",
        end="\n" if done == total else "",
        file=sys.stderr,
        flush=True,
    )


def correlations(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Pearson and Spearman of two flattened score matrices."""
    x, y = a.double().flatten().numpy(), b.double().flatten().numpy()
    return float(np.corrcoef(x, y)[0, 1]), float(spearmanr(x, y).statistic)


# ----------------------------------------------------------------------------- running

REFERENCES = ("ekfac", "kronfluence-ekfac")

#: Pairs whose agreement is reported: (a, b, what differs).
PAIRS = [
    (
        "ekfac-ef",
        "kronfluence-ekfac-ef",
        "empirical Fisher, matched damping: deterministic on both sides",
    ),
    (
        "ekfac",
        "kronfluence-ekfac",
        "true Fisher (one sampled label per scored token), matched damping",
    ),
    ("ekfac", "ekfac-seed1", "headwater alone, two sampling seeds: the Monte Carlo noise"),
    (
        "ekfac-heuristic-no-wd",
        "kronfluence-ekfac-heuristic",
        "heuristic damping, no L2 term, sampled labels",
    ),
    ("ekfac", "ekfac-sampled", "ggn_estimator 'auto' vs 'sampled'"),
    ("ekfac", "ekfac-exact-ggn", "sampled true Fisher vs the exact GGN expectation"),
    ("ekfac", "cg-ekfac-30it", "EK-FAC vs the GGN itself (CG, 30 iterations)"),
]


def run(
    entries: list[Entry], problem: LMProblem, truth: LDSGroundTruth | None
) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    rows, scores = [], {}
    for entry in entries:
        print(f"[bench-lm] {entry.name} ...", file=sys.stderr, flush=True)
        row: dict[str, Any] = {
            "method": entry.name,
            "library": entry.library,
            "settings": entry.settings,
        }
        try:
            (values, note), seconds, peak = measure(entry.run, problem)
            values = values.detach().cpu()
            row.update(seconds=seconds, peak_mb=peak, note=note)
            if not torch.isfinite(values).all():
                raise ValueError(f"{int((~torch.isfinite(values)).sum())} non-finite scores")
            scores[entry.name] = values
            if truth is not None:
                result = lds(values, truth)
                row.update(lds=result.mean, lds_se=result.stderr)
        except Exception as err:  # a failing method is a result, not a crash
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        print(f"[bench-lm]   {row}", file=sys.stderr, flush=True)
        rows.append(row)
    for row in rows:
        for ref in REFERENCES:
            if row["method"] in scores and ref in scores:
                row[f"vs {ref}"] = correlations(scores[row["method"]], scores[ref])
    return rows, scores


def pair_notes(scores: dict[str, Tensor]) -> list[str]:
    """Agreement of the matched pairs: Pearson, Spearman, least-squares scale of a on b and the
    largest difference relative to the largest score."""
    lines = [
        "## Matched pairs",
        "",
        "| a | b | what differs | Pearson | Spearman | scale a/b | max abs diff / max abs b |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for a, b, what in PAIRS:
        if a in scores and b in scores:
            x, y = scores[a].double(), scores[b].double()
            pearson, spear = correlations(x, y)
            scale = float((x * y).sum() / (y * y).sum())
            diff = float((x - y).abs().max() / y.abs().max())
            lines.append(
                f"| {a} | {b} | {what} | {pearson:.6f} | {spear:.4f} | {scale:.4f} | {diff:.2e} |"
            )
    return lines


def noise_ceiling(truth: LDSGroundTruth) -> str:
    """How well the retrained measurements can be predicted at all: the Spearman correlation of
    two retraining seeds of the same subsets, per query, and (Spearman-Brown) the reliability of
    their mean; its square root bounds the expected LDS of any attribution."""
    seeds = truth.per_seed.shape[1]
    if seeds < 2:
        return ""
    r = spearman_rows(truth.per_seed[:, 0].T, truth.per_seed[:, 1].T)
    r = r[~torch.isnan(r)]
    mean_r = float(r.mean())
    reliability = seeds * mean_r / (1 + (seeds - 1) * mean_r)
    return (
        f"Retraining noise: two seeds on the same half agree with Spearman {mean_r:.3f} (mean over queries); "
        f"the {seeds}-seed mean then has reliability {reliability:.2f}, so no attribution can be expected to "
        f"reach an LDS above about {max(reliability, 0.0) ** 0.5:.2f} here."
    )


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def write_markdown(
    rows: list[dict[str, Any]],
    problem: LMProblem,
    truth: LDSGroundTruth | None,
    notes: list[str],
    path: Path = RESULTS,
) -> None:
    acc, nll = problem.completion_accuracy()
    train_acc, _ = problem.completion_accuracy(problem.train)
    n_params = sum(p.numel() for p in problem.model.parameters())
    n_linear = sum(p.numel() for p in problem.task().parameters(problem.model).values())
    s = problem.settings
    lines = [
        "# headwater vs Kronfluence on a small causal language model",
        "",
        f"Written by `make bench-lm` (python -m bench.lm) on {time.strftime('%Y-%m-%d')}; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, 1-minute load average {LOAD_AT_START[0]:.2f} at the start "
        f"(2 cores). Same process, same trained model for every library.",
        "",
        f"Problem: character-level addition `^12+07=019;` ({len(VOCAB)} tokens, length {LENGTH}), "
        f"{N_TRAIN} training sequences (every label scored), {N_QUERY} queries with the prompt `^12+07=` "
        "labelled -100 (measurement `-log p(completion | prompt)`). Model: 2-block pre-LN causal "
        f"transformer, d={s['d_model']}, {s['heads']} heads, GELU MLP {s['d_model']}-{s['d_mlp']}-{s['d_model']}, "
        f"{n_params} parameters; analysed: the {len(problem.modules)} Linear layers ({n_linear} parameters). "
        f"Trained with Adam (lr {s['lr']}, {s['epochs']} epochs, batch {s['batch_size']}), objective "
        f"mean over sequences of the summed token NLL + (wd/2)‖θ‖², wd = {WEIGHT_DECAY}.",
        f"Completion exact-match accuracy: queries {acc:.2f} (mean -log p(completion | prompt) {nll:.3f}); "
        f"training sequences {train_acc:.2f}.",
        f"Damping λ = {DAMPING} on top of the weight decay for every method (Kronfluence: damping_factor = "
        f"λ + wd) unless the row says otherwise.",
        "LDS: "
        + (
            "none (run without ground truth)"
            if truth is None
            else f"{truth.masks.shape[0]} random halves x {truth.per_seed.shape[1]} retraining(s), "
            "the model's own recipe, vmapped (`train_ensemble`); mean +- s.e. over queries."
        ),
        "Pearson / Spearman: of the flattened [100, 1000] score matrix with headwater `ekfac` and with "
        "`kronfluence-ekfac` (matched damping). Peak = largest RSS increase during the call (MiB).",
        "",
        "| method | library | time (s) | peak (MiB) | LDS | vs hw ekfac (P / S) | vs kf ekfac (P / S) | settings / note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lds_text = f"{r['lds']:.3f} +- {r['lds_se']:.3f}" if "lds" in r else ""
        corr = [
            f"{r[k][0]:.4f} / {r[k][1]:.4f}" if k in r else ""
            for k in ("vs ekfac", "vs kronfluence-ekfac")
        ]
        settings = json.dumps(r["settings"], default=str)
        lines.append(
            f"| {r['method']} | {r['library']} | {_fmt(r.get('seconds'), '.1f')} | "
            f"{_fmt(r.get('peak_mb'), '.0f')} | {lds_text} | {corr[0]} | {corr[1]} | "
            f"`{settings}` {r.get('error') or r.get('note', '')} |"
        )
    if notes:
        lines += ["", *notes]
    lines += [
        "",
        "Exact metagradients (REPLAY) of recorded runs of this model, single-model LDS next to "
        "EK-FAC's: [lm_metagradient_results.md](lm_metagradient_results.md) "
        "(`make bench-lm-metagradient`).",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", help="method names to run")
    parser.add_argument("--no-peers", action="store_true", help="headwater only")
    parser.add_argument("--no-lds", action="store_true", help="skip the retraining ground truth")
    parser.add_argument(
        "--subsets", type=int, default=LDS_SUBSETS, help="random halves for the LDS"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--warmup", action="store_true", help="run both EK-FACs once untimed first")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    LOAD_AT_START[0] = os.getloadavg()[0]
    problem = get_lm_problem()
    acc, nll = problem.completion_accuracy()
    print(f"[bench-lm] query completion accuracy {acc:.3f}, mean NLL {nll:.3f}", file=sys.stderr)
    truth = None if args.no_lds else lds_truth(problem, args.subsets)
    entries = headwater_entries() + ([] if args.no_peers else kronfluence_entries())
    if args.only:
        entries = [e for e in entries if e.name in args.only]
    if args.warmup:  # first calls pay imports and lazy initialisation: not timed
        for entry in entries:
            if entry.name in REFERENCES:
                entry.run(problem)
    rows, scores = run(entries, problem, truth)
    notes = pair_notes(scores)
    if truth is not None:
        notes = [noise_ceiling(truth), "", *notes]
    write_markdown(rows, problem, truth, notes, args.output)
    print(f"[bench-lm] wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
