"""Damaged stores x kinds of damage: each is noticed (one warning line naming the file),
then recomputed to the clean run's exact result — or refused with ``StoreError`` when the
caller asked for read-only use. A failing write leaves the earlier store intact."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch
from cases import mlp

import headwater
from headwater import store
from headwater.errors import StoreError
from headwater.store.rows import RowStore


def _flip(path: Path, at: int, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _sidecar(path: Path, **changes) -> None:
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))


TENSOR_DAMAGE = {  # the curvature store: <base>.safetensors + <base>.json
    "truncated": lambda b: _truncate(b.with_suffix(".safetensors"), 0.5),
    "flipped bytes": lambda b: _flip(
        b.with_suffix(".safetensors"), b.with_suffix(".safetensors").stat().st_size // 2
    ),
    "flipped header": lambda b: _flip(b.with_suffix(".safetensors"), 9, 4),
    "garbage tail": lambda b: b.with_suffix(".safetensors").write_bytes(
        b.with_suffix(".safetensors").read_bytes() + bytes(range(100))
    ),
    "empty file": lambda b: b.with_suffix(".safetensors").write_bytes(b""),
    "unreadable sidecar": lambda b: b.with_suffix(".json").write_text("{not json"),
}

ROW_DAMAGE = {  # the projected store's rows: <base>-train.npy + <base>-train.json
    "truncated": lambda b: _truncate(b.with_name(b.name + "-train.npy"), 0.5),
    "flipped bytes": lambda b: _flip(
        b.with_name(b.name + "-train.npy"), 128 + 12 * 8 * 20
    ),  # row 20
    "flipped header": lambda b: _flip(b.with_name(b.name + "-train.npy"), 0, 8),
    "garbage tail": lambda b: b.with_name(b.name + "-train.npy").write_bytes(
        b.with_name(b.name + "-train.npy").read_bytes() + bytes(range(100))
    ),
    "empty file": lambda b: b.with_name(b.name + "-train.npy").write_bytes(b""),
    "impossible row count": lambda b: _sidecar(
        b.with_name(b.name + "-train.json"), rows_done=10**9
    ),
    "row count off a chunk": lambda b: _sidecar(b.with_name(b.name + "-train.json"), rows_done=13),
    "unreadable sidecar": lambda b: b.with_name(b.name + "-train.json").write_text("{not json"),
}


def _run(case, path: Path, **kwargs):
    return headwater.influence(
        case.model,
        case.train,
        case.query,
        task=case.task,
        damping=1e-2,
        self_influence=True,
        store=path,
        **kwargs,
    )


@pytest.mark.parametrize("damage", list(TENSOR_DAMAGE))
def test_a_damaged_curvature_store_is_refitted_or_refused(damage, tmp_path, caplog):
    case = mlp(n_train=30)
    path = tmp_path / "fit"
    clean = _run(case, path, curvature="ekfac")
    TENSOR_DAMAGE[damage](path)
    with pytest.raises(StoreError, match="damaged"):
        _run(case, path, curvature="ekfac", read_only_store=True)
    with caplog.at_level(logging.WARNING, logger="headwater"):
        again = _run(case, path, curvature="ekfac")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "fit." in warned[0] and "\n" not in warned[0]
    assert torch.equal(again.values, clean.values) and torch.equal(
        again.self_influence, clean.self_influence
    )
    assert again.settings["store"].startswith("curvature recomputed: ")  # refitted, and said why
    reused = _run(case, path, curvature="ekfac")  # the refit was saved again, whole
    assert reused.settings["store"].startswith("curvature loaded")
    assert torch.equal(reused.values, clean.values)


@pytest.mark.parametrize("damage", list(ROW_DAMAGE))
def test_a_damaged_projected_store_is_recomputed_or_refused(damage, tmp_path, caplog):
    case = mlp(n_train=30)
    path = tmp_path / "proj"
    options = {"projection": 12, "chunk_size": 8}
    clean = _run(case, path, **options)
    ROW_DAMAGE[damage](path)
    with pytest.raises(StoreError, match="damaged"):
        _run(case, path, read_only_store=True, **options)
    with caplog.at_level(logging.WARNING, logger="headwater"):
        again = _run(case, path, **options)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "proj-train" in warned[0] and "\n" not in warned[0]
    assert torch.equal(again.values, clean.values) and torch.equal(
        again.self_influence, clean.self_influence
    )
    status = again.settings["store"]["train"]
    assert "damaged" in status
    if damage == "flipped bytes":  # chunks of 8 rows: rows 0-15 verified, 16-23 recomputed
        assert "resumed after 16 of 30" in status


def test_a_store_with_rows_flipped_after_completion_resumes_at_the_damaged_chunk(tmp_path):
    meta = {"what": "test"}
    rows = torch.arange(60, dtype=torch.float32).reshape(20, 3)
    s = RowStore(tmp_path / "r", (20, 3), torch.float32, meta)
    for chunk in rows.split(5):
        s.append(chunk)
    _flip(tmp_path / "r.npy", 128 + 12 * 11, 4)  # row 11: chunk 10-15
    again = RowStore(tmp_path / "r", (20, 3), torch.float32, meta)
    assert again.rows_done == 10 and "resumed after 10 of 20" in again.status
    for chunk in rows[10:].split(5):
        again.append(chunk)
    assert torch.equal(RowStore(tmp_path / "r", (20, 3), torch.float32, meta).read(), rows)


@pytest.mark.parametrize("failing", ["save_file", "_write_temp"])
def test_a_failing_write_keeps_the_earlier_store_and_says_so_in_one_line(
    failing, tmp_path, monkeypatch
):
    case = mlp(n_train=30)
    path = tmp_path / "fit"
    clean = _run(case, path, curvature="ekfac")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, failing, disk_full)
    with pytest.raises(StoreError, match="No space left on device") as err:
        store.save(path, {"other": torch.zeros(3)}, {"other": True})  # an overwrite that fails
    assert "\n" not in str(err.value) and "unchanged" in str(err.value)
    assert {
        p.name: p.read_bytes() for p in tmp_path.iterdir()
    } == before  # no temporary file left either
    monkeypatch.undo()
    reused = _run(case, path, curvature="ekfac")
    assert torch.equal(reused.values, clean.values) and reused.settings["store"].startswith(
        "curvature loaded"
    )


def test_a_failing_row_write_keeps_the_counted_rows(tmp_path, monkeypatch):
    meta = {"what": "test"}
    s = RowStore(tmp_path / "r", (10, 2), torch.float64, meta)
    s.append(torch.ones(4, 2, dtype=torch.float64))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("headwater.store.rows.atomic_write_bytes", disk_full)
    with pytest.raises(StoreError, match="could not write"):
        s.append(torch.full((4, 2), 2.0, dtype=torch.float64))
    monkeypatch.undo()
    again = RowStore(tmp_path / "r", (10, 2), torch.float64, meta)
    assert again.rows_done == 4


def test_the_cli_refuses_a_damaged_results_store_in_one_line(tmp_path):
    from headwater.cli.main import main

    store.save(tmp_path / "results", {"scores": torch.ones(2, 3)}, {"kind": "results"})
    _flip(
        tmp_path / "results.safetensors", (tmp_path / "results.safetensors").stat().st_size - 8, 4
    )
    with pytest.raises(store.StoreDamagedError, match="checksum"):
        store.load(tmp_path / "results")
    assert main(["report", str(tmp_path)]) == 2


def test_the_cli_recomputes_a_damaged_curvature_in_one_warning_line_or_refuses_it_read_only(
    tmp_path, monkeypatch, capsys
):
    from headwater.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.py").write_text(
        "import torch\n"
        "g = torch.Generator().manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))\n"
        "train = (torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g))\n"
        "query = (torch.randn(3, 4, generator=g), torch.tensor([0, 1, 2]))\n"
    )
    args = ["score", "spec.py", "--curvature", "kfac", "--no-report", "--threads", "1", "-o", "out"]
    assert main(args) == 0
    clean = (tmp_path / "out" / "results.safetensors").read_bytes()
    capsys.readouterr()
    _truncate(tmp_path / "out" / "curvature.safetensors", 0.5)
    assert main([*args, "--read-only-store", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "curvature.safetensors is damaged" in err[0], err
    assert main(args) == 0
    err = capsys.readouterr().err
    assert sum("is damaged" in line for line in err.splitlines()) == 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["settings"][
        "store"
    ].startswith("curvature recomputed")
    from safetensors.torch import load

    assert torch.equal(
        load(clean)["scores"],
        load((tmp_path / "out" / "results.safetensors").read_bytes())["scores"],
    )


def test_tensors_sharing_memory_are_saved_each_with_its_own_values(tmp_path):
    labels = torch.arange(10)
    tensors = {"train_labels": labels, "query_labels": labels[:3], "odd": labels[1::2]}
    store.save(tmp_path / "shared", tensors, {})
    loaded, _ = store.load(tmp_path / "shared")
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value)


def test_a_setting_an_older_store_does_not_record_is_named_as_not_recorded(tmp_path):
    store.save(tmp_path / "s", {"x": torch.ones(2)}, {"curvature": "lissa", "tol": 0.01})
    with pytest.raises(store.StoreMismatchError) as err:
        store.load(tmp_path / "s", expect={"curvature": "lissa", "tol": 0.01, "oversample": 10})
    message = str(err.value)
    assert "oversample: stored nothing (not recorded: a store of an older headwater)" in message
    assert "requested 10" in message and "\n" not in message and err.value.keys == ("oversample",)
    # a recorded None is still shown as None, and matching settings load
    store.save(tmp_path / "t", {"x": torch.ones(2)}, {"rank": None})
    with pytest.raises(store.StoreMismatchError, match="rank: stored None, requested 5"):
        store.load(tmp_path / "t", expect={"rank": 5})
    tensors, _ = store.load(tmp_path / "t", expect={"rank": None})
    assert torch.equal(tensors["x"], torch.ones(2))


@pytest.mark.parametrize("as_given", ["folder", "folder/"])
def test_a_folder_as_store_is_refused_not_written_beside_it(tmp_path, as_given):
    """``store=`` is a file prefix; a folder (existing, or written with a trailing slash) is
    refused before any fit, instead of ``<folder>.json`` written next to it."""
    case = mlp(n_train=20, n_query=2)
    (tmp_path / "folder").mkdir()
    path = str(tmp_path / "folder") + ("/" if as_given.endswith("/") else "")
    for options in ({"curvature": "ekfac"}, {"curvature": "exact", "projection": 8}):
        with pytest.raises(StoreError, match="is a folder; give a file prefix inside it"):
            headwater.influence(
                case.model,
                case.train,
                case.query,
                task=case.task,
                store=path,
                progress=False,
                **options,
            )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
    assert not any((tmp_path / "folder").iterdir())
    store.save(tmp_path / "folder" / "scores", {"x": torch.zeros(2)}, {"kind": "test"})
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == [
        "scores.json",
        "scores.safetensors",
    ]
