"""Two processes under torch.distributed (gloo, CPU) give the numbers of one process.

The parent computes every result in one process; two spawned ranks compute the same
with the training data sharded (23 examples: 11 + 12) and write what each rank
returned. Both ranks must return the whole result in global order, equal to the
single-process one at rtol 1e-10 (with atol 1e-10 × the largest entry: the sums are
added in another order, and CG's iterations amplify that rounding to ~1e-12 of the
scale, ~1e-10 of the entries nearest zero), and each rank must have run fewer forward
passes than one process (the work was split, not repeated).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import mlp
from oracles import assert_close
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import headwater
from headwater.cli.run import _remove_stale
from headwater.curvature import CG, EKFAC, KFAC, MFAC, Curvature, Diagonal, Exact, curvature_matvec
from headwater.distributed import (
    all_reduce_sum_,
    gather_columns,
    shard,
    shard_range,
    single_process,
    world,
)
from headwater.gradients.projection import KroneckerProjection, RandomProjection
from headwater.methods import InfluenceFunction
from headwater.methods.projected import ProjectedInfluence
from headwater.store import StoreMismatchError

pytestmark = (
    pytest.mark.slow
)  # subprocesses and multi-process runs: `make test-fast` leaves them out

WORLD = 2
N_TRAIN = 23  # uneven shards: 11 + 12
CHUNK = 5  # several chunks per rank
TIMEOUT_S = 60  # a hung collective fails the test instead of blocking it
RTOL = 1e-10

CURVATURES: dict[str, Callable[[], Curvature]] = {
    "exact": lambda: Exact(chunk_size=CHUNK),
    "cg": lambda: CG(chunk_size=CHUNK, tol=1e-12, max_iter=200),
    "kfac": lambda: KFAC(chunk_size=CHUNK),
    "ekfac": lambda: EKFAC(chunk_size=CHUNK),
    "diagonal": lambda: Diagonal(chunk_size=CHUNK),
    "diagonal_ef": lambda: Diagonal(kind="ef", chunk_size=CHUNK),
    "mfac_ef": lambda: MFAC(kind="ef", chunk_size=CHUNK),
    # targets sampled from the model: drawn per example, so as one process draws them
    "ekfac_sampled": lambda: EKFAC(chunk_size=CHUNK, ggn_estimator="sampled", mc_samples=2, seed=3),
    "mfac_ggn": lambda: MFAC(kind="ggn", chunk_size=CHUNK, seed=3),
}
KINDS = ("ggn", "hessian")
PROJECTIONS: dict[str, Callable[[], RandomProjection | KroneckerProjection]] = {
    "projected": lambda: RandomProjection(20, seed=0),
    "projected_kronecker": lambda: KroneckerProjection(4, 4, seed=0),
    "projected_kronecker_sampled": lambda: KroneckerProjection(4, 4, seed=0),
}


def _compute(store_dir: Path) -> dict[str, Tensor | int]:
    """Every compared result, in whatever process group is current (stores in ``store_dir``)."""
    case = mlp(n_train=N_TRAIN)
    model, task, train, query = case.model, case.task, case.train, case.query
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    out: dict[str, Tensor | int] = {}
    p = sum(t.numel() for t in model.parameters())
    v = torch.randn(3, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for kind in KINDS:
        calls[0] = 0
        out[f"matvec/{kind}"] = curvature_matvec(model, task, train, kind, chunk_size=CHUNK)(v)
        out[f"matvec/{kind}/calls"] = calls[0]
    for name, make in CURVATURES.items():
        calls[0] = 0
        estimator = InfluenceFunction(model, task, make(), chunk_size=CHUNK).fit(train)
        out[f"{name}/calls/fit"], calls[0] = calls[0], 0
        out[f"{name}/scores"] = estimator.scores(query, train)
        out[f"{name}/calls/scores"] = calls[0]
        if name in ("exact", "cg"):  # a sharded and a collective (CG) self-influence
            out[f"{name}/self"] = estimator.self_influence(train)
            out[f"{name}/top_values"], out[f"{name}/top_indices"] = estimator.top_k(query, train, 4)
    for name, projection in PROJECTIONS.items():
        calls[0] = 0
        estimator = "sampled" if name.endswith("sampled") else "exact"
        projected = ProjectedInfluence(
            model, task, projection(), damping=1e-3, ggn_estimator=estimator, chunk_size=CHUNK
        ).fit(train)
        out[f"{name}/calls/fit"] = calls[0]
        out[f"{name}/scores"] = projected.scores(query, train)
        out[f"{name}/self"] = projected.self_influence(train)
        out[f"{name}/top_values"], out[f"{name}/top_indices"] = projected.top_k(query, train, 4)
    for name, options in (
        ("stored_ekfac", {"curvature": "ekfac"}),
        ("stored_projected", {"projection": 12}),
    ):
        for attempt in ("fit", "loaded"):  # the second call loads what the first stored
            stages: list[str] = []
            out[f"{name}/{attempt}"] = headwater.influence(
                model,
                train,
                query,
                task=task,
                damping=1e-3,
                chunk_size=CHUNK,
                store=store_dir / name,
                progress=lambda stage, done, total, stages=stages: stages.append(stage),
                **options,
            ).values
            out[f"{name}/{attempt}/loaded"] = int(any("(loaded)" in s for s in stages))
    # rank 1 loses its projected curvature: the ranks must agree to recompute, not hang
    if world() == (1, 2):
        for stale in store_dir.glob("stored_projected-curvature-rank1of2*"):
            stale.unlink()
    out["stored_projected/partial"] = headwater.influence(
        model,
        train,
        query,
        task=task,
        damping=1e-3,
        chunk_size=CHUNK,
        store=store_dir / "stored_projected",
        projection=12,
    ).values
    # the last rank's stored rows were written with other settings: every rank must refuse
    # the store (not only that one, leaving the others in a collective), then refit together
    rank, size = world()
    if rank == size - 1:
        sidecar = next(store_dir.glob("stored_projected-train*.json"))
        record = json.loads(sidecar.read_text())
        record["meta"]["projection"]["seed"] = 99
        sidecar.write_text(json.dumps(record))
    options = {
        "task": task,
        "damping": 1e-3,
        "chunk_size": CHUNK,
        "projection": 12,
        "store": store_dir / "stored_projected",
    }
    with pytest.raises(StoreMismatchError):
        headwater.influence(model, train, query, **options)
    _remove_stale(store_dir / "stored_projected")
    out["stored_projected/refit"] = headwater.influence(model, train, query, **options).values
    # a damaged store on one rank (an unreadable sidecar) is recomputed by that rank alone,
    # the others reusing theirs, to the same numbers; read-only, every rank refuses it
    if rank == size - 1:
        next(store_dir.glob("stored_projected-train*.json")).write_text("{not json")
    with pytest.raises(ValueError if rank == size - 1 else RuntimeError, match="store"):
        headwater.influence(model, train, query, read_only_store=True, **options)
    out["stored_projected/repaired"] = headwater.influence(model, train, query, **options).values
    result = headwater.influence(
        model,
        train,
        query,
        task=task,
        curvature="ekfac",
        top_k=3,
        self_influence=True,
        chunk_size=CHUNK,
    )
    out["api/values"], out["api/indices"] = result.values, result.indices
    out["api/self"] = result.self_influence
    return out


def _helpers() -> dict[str, object]:
    """The helpers on a 7-example toy set, as seen by this rank."""
    x = torch.arange(7.0).unsqueeze(1)
    y = torch.arange(7)
    rank, _ = world()
    block = torch.full((2, 3 + rank), float(rank))  # uneven widths 3 and 4
    block[1] = torch.arange(3 + rank) + 10 * rank
    total = [torch.full((2,), float(rank + 1)), torch.ones(3, 2).T]  # a non-contiguous one
    all_reduce_sum_(total)
    with single_process():
        alone = world()
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    return {
        "world": world(),
        "alone": alone,
        "range": shard_range(7),
        "pair": shard((x, y))[1],
        "dataset": torch.stack([item[1] for item in shard(TensorDataset(x, y))]),
        "loader": torch.cat([b[1] for b in shard(loader)]),
        "gathered": gather_columns(block),
        "reduced": total,
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    # This rank's output goes to its own file, which the parent shows if the run fails.
    log = open(Path(out_dir) / f"rank{rank}.log", "w")  # noqa: SIM115 (open for the process)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    try:
        torch.save(
            {**_compute(Path(out_dir) / "stores"), "helpers": _helpers()},
            Path(out_dir) / f"rank{rank}.pt",
        )
        dist.barrier()  # leave together: gloo aborts a rank whose peer tears the group down early
    finally:
        dist.destroy_process_group()


def _rank_logs(folder: Path, lines: int = 40) -> str:
    """The last ``lines`` lines each rank wrote to stdout/stderr."""
    shown = []
    for rank in range(WORLD):
        path = folder / f"rank{rank}.log"
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
        shown.append(f"--- rank {rank} output ({path}):\n" + "\n".join(text))
    return "\n".join(shown)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict]]:
    """``(single-process results, [results of rank 0, rank 1])``."""
    tmp = tmp_path_factory.mktemp("distributed")
    ctx = mp.start_processes(
        _worker,
        args=(str(tmp / "rendezvous"), str(tmp)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    try:
        torch.set_num_threads(1)
        single = _compute(tmp / "single")
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not ctx.join(timeout=1):  # re-raises a rank's exception
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {WORLD} ranks did not finish within {TIMEOUT_S} s")
        except Exception as error:
            pytest.fail(f"{error}\n{_rank_logs(tmp)}")
    finally:
        for process in ctx.processes:  # a rank left waiting for a failed one
            if process.is_alive():
                process.kill()
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return single, ranks


def test_shard_covers_the_data_in_order(runs):
    _, ranks = runs
    helpers = [r["helpers"] for r in ranks]
    assert [h["world"] for h in helpers] == [(0, 2), (1, 2)]
    assert [h["alone"] for h in helpers] == [(0, 1), (0, 1)]
    assert [h["range"] for h in helpers] == [(0, 3), (3, 7)]
    for form in ("pair", "dataset", "loader"):
        assert torch.equal(torch.cat([h[form] for h in helpers]), torch.arange(7)), form


def test_gather_and_all_reduce_with_uneven_shards(runs):
    _, ranks = runs
    expected = torch.tensor([[0.0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 10, 11, 12, 13]])
    for r in ranks:
        assert torch.equal(r["helpers"]["gathered"], expected)
        first, second = r["helpers"]["reduced"]
        assert torch.equal(first, torch.full((2,), 3.0))
        assert torch.equal(second, torch.full((2, 3), 2.0))


def _check(single: dict, ranks: list[dict], key: str) -> None:
    """Assert every rank's ``key`` equals one process's."""
    for rank, result in enumerate(ranks):
        got, want = result[key], single[key]
        assert got.shape == want.shape, f"{key} on rank {rank}: shape {tuple(got.shape)}"
        if got.dtype == torch.long:
            assert torch.equal(got, want), f"{key} on rank {rank}"
            continue
        scale = float(want.abs().max())
        assert_close(got, want, rtol=RTOL, atol=RTOL * scale, what=f"{key} on rank {rank}")


def _split(single: dict, ranks: list[dict], key: str) -> None:
    assert all(r[key] < single[key] for r in ranks), (
        f"{key}: forward passes per rank {[r[key] for r in ranks]}, one process {single[key]}"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_curvature_matvec_matches_one_process(runs, kind):
    single, ranks = runs
    _check(single, ranks, f"matvec/{kind}")
    _split(single, ranks, f"matvec/{kind}/calls")


@pytest.mark.parametrize("name", list(CURVATURES))
def test_influence_scores_match_one_process(runs, name):
    single, ranks = runs
    assert single[f"{name}/scores"].shape == (5, N_TRAIN)
    _check(single, ranks, f"{name}/scores")
    _split(single, ranks, f"{name}/calls/fit")
    _split(single, ranks, f"{name}/calls/scores")


@pytest.mark.parametrize("name", ["exact", "cg", "api"])
def test_top_k_and_self_influence_match_one_process(runs, name):
    single, ranks = runs
    prefix = "top_" if name != "api" else ""
    for key in (f"{name}/{prefix}values", f"{name}/{prefix}indices", f"{name}/self"):
        _check(single, ranks, key)


@pytest.mark.parametrize("name", list(PROJECTIONS))
def test_projected_influence_matches_one_process(runs, name):
    """Each rank projects its shard; K is all-reduced; scores, top-k and self-influence gathered."""
    single, ranks = runs
    for key in ("scores", "self", "top_values", "top_indices"):
        _check(single, ranks, f"{name}/{key}")
    _split(single, ranks, f"{name}/calls/fit")


@pytest.mark.parametrize("name", ["stored_ekfac", "stored_projected"])
def test_stores_are_written_and_loaded_by_all_ranks_together(runs, name):
    """Rank 0 writes the fit (per-rank rows for projections); every rank then loads it."""
    single, ranks = runs
    for attempt in (
        "fit",
        "loaded",
        *(("partial", "refit", "repaired") if name == "stored_projected" else ()),
    ):
        _check(single, ranks, f"{name}/{attempt}")
    assert [r[f"{name}/fit/loaded"] for r in ranks] == [0, 0]
    assert [r[f"{name}/loaded/loaded"] for r in ranks] == [1, 1]


def test_one_process_helpers_are_identities_and_check_input():
    x, y = torch.randn(5, 2), torch.arange(5)
    t = torch.randn(3, 4)
    assert world() == (0, 1) and shard_range(5) == (0, 5)
    assert shard((x, y)) == (x, y) and gather_columns(t) is t
    all_reduce_sum_(t)
    with pytest.raises(ValueError, match="n:"):
        shard_range(-1)
    with pytest.raises(ValueError, match="t:"):
        gather_columns(torch.zeros(3))
    with pytest.raises(TypeError, match="t:"):
        gather_columns([1.0])
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        all_reduce_sum_([t, 1.0])
    with pytest.raises(ValueError, match="train: is empty"):
        shard((x[:0], y[:0]), "train")
    with pytest.raises(TypeError, match="data:"):
        shard([x], "data")
