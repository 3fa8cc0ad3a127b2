"""Every curvature at its defaults on a tiny Hugging Face GPT-2, as a new user calls it.

Run: ``make bench-gpt2`` (``python -m bench.gpt2_defaults``; one thread). Writes
``bench/gpt2_defaults_results.md``.

The model is ``transformers.GPT2LMHeadModel`` built from a config (no download): 2
blocks, width 48, 4 heads, tied input/output embeddings, trained with Adam on the
character-level addition corpus of ``bench.lm`` (``"^12+07=019;"``). The queries are
held-out sums with the prompt ``"^12+07="`` labelled -100, so the measurement is
``-log p(completion | prompt)``. Each curvature is called exactly as a user would:
``headwater.influence(model, train, query, task=LanguageModelingTask(weight_decay=wd),
curvature=name)``, no ``modules=``, no damping, no options; ``curvature=None`` is the
automatic choice. Each runs in its own process with a time limit (``--limit``, default
9,000 s: LiSSA, the slowest at its defaults, took 3,357 s on a shared machine), so one
stalled method cannot stall the table.

LDS: random halves retrained with the model's own recipe (``--subsets`` x 1 seed, cached
in ``bench/.cache``); mean +- s.e. over the queries. Seed-to-seed retraining noise is
large for language models (``bench/lm_results.md``: two seeds on one half agree with
Spearman 0.13), so LDS values near 0.1 are what the best methods reach here.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import torch

import headwater
from bench.lm import IGNORE, PROMPT, VOCAB, corpus, encode
from bench.problems import CACHE_DIR, _key
from headwater.curvature import CURVATURES
from headwater.evaluate.lds import lds, lds_ground_truth
from headwater.task import LanguageModelingTask
from headwater.train.ensemble import TrainConfig, train_ensemble

RESULTS = Path(__file__).resolve().parent / "gpt2_defaults_results.md"
N_TRAIN, N_QUERY = 1000, 100
WEIGHT_DECAY = 1e-3
CONFIG = TrainConfig(optimizer="adam", lr=5e-3, epochs=60, batch_size=32)
GPT2 = {"n_embd": 48, "n_layer": 2, "n_head": 4, "n_inner": 96}


def build(seed: int = 0):
    import transformers

    config = transformers.GPT2Config(
        vocab_size=len(VOCAB),
        n_positions=len(corpus(1)[0]),
        bos_token_id=0,
        eos_token_id=0,
        **GPT2,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def data():
    ids = encode(corpus(N_TRAIN + N_QUERY, 0))
    train = (ids[:N_TRAIN], ids[:N_TRAIN].clone())
    labels = ids[N_TRAIN:].clone()
    labels[:, :PROMPT] = IGNORE
    return train, (ids[N_TRAIN:], labels)


def task() -> LanguageModelingTask:
    return LanguageModelingTask(weight_decay=WEIGHT_DECAY)


def trained():
    """The trained model (cached in bench/.cache)."""
    model, (train, _) = build(), data()
    # the key holds every setting of the recipe: a cached model of other settings is never reused
    recipe = {"gpt2": GPT2, "config": CONFIG.to_dict(), "n": N_TRAIN, "wd": WEIGHT_DECAY}
    path = CACHE_DIR / f"gpt2-defaults-{_key(recipe)}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    config = dataclasses.replace(CONFIG, vectorize="loop")
    ensemble = train_ensemble(
        model, task(), train, torch.ones(1, N_TRAIN), config=config, seeds=[0]
    )
    state = {k: v[0] for k, v in {**ensemble.params, **ensemble.buffers}.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and missing == ["lm_head.weight"], (missing, unexpected)  # tied
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model.eval()


def completion_accuracy(model) -> float:
    ids = data()[1][0]
    with torch.no_grad():
        pred = model(ids).logits[:, PROMPT - 1 : -1].argmax(-1)
    return float((pred == ids[:, PROMPT:]).all(dim=1).double().mean())


def _one(name: str | None, queue) -> None:
    """In a child process: one curvature at its defaults -> (scores, seconds, settings)."""
    torch.set_num_threads(1)
    model, (train, query) = trained(), data()
    start = time.perf_counter()
    try:
        result = headwater.influence(
            model, train, query, task=task(), curvature=name, progress=False
        )
    except Exception as error:  # reported in the table
        queue.put(f"{type(error).__name__}: {error}".splitlines()[0])
        return
    seconds = time.perf_counter() - start
    settings = result.settings
    # numpy, not a tensor: a tensor would be shared by a file descriptor this process closes
    queue.put(
        (
            result.values.numpy(),
            seconds,
            settings.get("fitted_damping"),
            settings.get("curvature_choice"),
        )
    )


def run_one(name: str | None, limit: float):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_one, args=(name, queue))
    process.start()
    try:
        return queue.get(timeout=limit)
    except Exception:
        return None
    finally:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--limit", type=float, default=9000.0, help="seconds per curvature")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file to update")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, (train, query) = trained(), data()
    print(f"[gpt2] completion accuracy {completion_accuracy(model):.2f}", file=sys.stderr)
    truth = lds_ground_truth(
        model,
        task(),
        train,
        query,
        n_subsets=args.subsets,
        config=dataclasses.replace(CONFIG, members_per_pass=10),
        store_dir=CACHE_DIR,
    )
    names: list[str | None] = [None, *CURVATURES]
    if args.only:
        names = [n for n in names if str(n) in args.only]
    rows = []
    for name in names:
        print(f"[gpt2] {name} ...", file=sys.stderr)
        out = run_one(name, args.limit)
        if not isinstance(out, tuple):
            note = out or f"not finished in {args.limit:.0f} s"
            rows.append(f"| {name} | {note} | | | |")
            continue
        values, seconds, damping, choice = out
        result = lds(torch.from_numpy(values), truth)
        damping = f"{damping:.3g}" if isinstance(damping, float) else "per block"
        rows.append(
            f"| {name} | {result.mean:.3f} +- {result.stderr:.3f} | {seconds:.1f} s | {damping} "
            f"| {choice or ''} |"
        )
        print(rows[-1], file=sys.stderr)
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        "# Every curvature at its defaults on a tiny Hugging Face GPT-2 (bench/gpt2_defaults.py)",
        "",
        f"Written by `make bench-gpt2` on {time.strftime('%Y-%m-%d %H:%M')}; "
        f"{platform.machine()}, torch {torch.__version__}, 1 thread, 1-minute load average "
        f"{os.getloadavg()[0]:.1f} (2 cores; times compare within this table only).",
        "",
        f"Model: GPT2LMHeadModel {GPT2}, {n_params:,} parameters (tied embeddings), "
        f"trained with Adam (lr {CONFIG.lr}, {CONFIG.epochs} epochs, batch {CONFIG.batch_size}, "
        f"weight decay {WEIGHT_DECAY}) on {N_TRAIN} addition strings; completion exact-match "
        f"on the {N_QUERY} held-out queries {completion_accuracy(model):.2f}. Every call: "
        "`headwater.influence(model, train, query, task=LanguageModelingTask(weight_decay=wd), "
        "curvature=name)` — whole model, no options. LDS over "
        f"{args.subsets} random halves x 1 retraining (mean +- s.e. over queries).",
        "",
        "| curvature | LDS | time | damping | choice |",
        "|---|---:|---:|---:|---|",
        *_merged_rows(rows, args.out),
        "",
    ]
    if args.only and args.out.exists():  # the earlier run's header, and what was rerun
        header = args.out.read_text().split("| curvature |")[0].rstrip().splitlines()
        table = lines[lines.index("| curvature | LDS | time | damping | choice |") :]
        lines = [
            *header,
            f"Rows {', '.join(args.only)} rerun on {time.strftime('%Y-%m-%d %H:%M')} "
            f"(`python -m bench.gpt2_defaults --only {' '.join(args.only)} --limit {args.limit:g}`, "
            "1-minute load "
            f"average {os.getloadavg()[0]:.1f}).",
            "",
            *table,
        ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


def _merged_rows(rows: list[str], path: Path) -> list[str]:
    """``rows`` in place of the same curvature's rows of the table in ``path`` (the others
    kept, in their order), so that ``--only`` reruns a few curvatures."""
    if not path.exists():
        return rows
    fresh = {row.split("|")[1].strip(): row for row in rows}
    old = [line for line in path.read_text().splitlines() if line.startswith("| ")][1:]
    out = [fresh.pop(line.split("|")[1].strip(), line) for line in old]
    return out + list(fresh.values())


if __name__ == "__main__":
    main()
