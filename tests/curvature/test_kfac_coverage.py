"""K-FAC/EK-FAC on whole models: embeddings, the diagonal block, attention masks."""

import pytest
import torch
from oracles import assert_close, dense_ef, dense_ggn, loop_gradients
from torch import Tensor, nn

import headwater
from headwater.curvature import EKFAC, KFAC
from headwater.gradients.layers import DIAGONAL
from headwater.methods import InfluenceFunction
from headwater.task import ClassificationTask

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _init(model: nn.Module, seed: int) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=_gen(seed), dtype=p.dtype))
            seed += 1
    return model


class TextClassifier(nn.Module):
    """Token embedding (padding row 0) + LayerNorm + linear per token, masked mean pool, head."""

    def __init__(self, vocab: int = 6, d: int = 3, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)
        self.scale = nn.Parameter(torch.ones(()))  # a free parameter

    def forward(self, ids: Tensor) -> Tensor:
        keep = (ids != 0).unsqueeze(2).to(self.mix.weight.dtype)
        h = torch.tanh(self.mix(self.norm(self.embed(ids))))
        pooled = (h * keep).sum(1) / keep.sum(1).clamp_min(1)
        return self.scale * self.head(pooled)


class PaddedTask(ClassificationTask):
    def attention_mask(self, inputs: Tensor) -> Tensor:
        return (inputs != 0).to(torch.float64)


def _block_of(curv, names: list[str]) -> Tensor:
    """Indices of ``names`` in the flat layout."""
    slices = curv.layout.slices()
    return torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_embedding_block_equals_the_ggn_for_one_example(cls):
    """One example, one token, exact output Hessian: every block ``S ⊗ A`` is the GGN's own
    block, the embedding's included (its input factor is the one-hot token)."""
    model = _init(
        nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Tanh(), nn.Linear(3, 4)).double(), 0
    )
    data = (torch.tensor([[4]]), torch.tensor([2]))
    task = ClassificationTask(weight_decay=1e-2)
    curv = cls(damping=0.1).fit(model, task, data)
    assert curv.blocks[0].layer == "embedding" and curv.state.eigvecs_a["0"].numel() == 0
    dense = curv.matvec(torch.eye(curv.layout.num_params, dtype=F64))
    want = dense_ggn(model, task, data) + 0.1 * torch.eye(curv.layout.num_params, dtype=F64)
    for names in (["0.weight"], ["3.weight", "3.bias"]):
        idx = _block_of(curv, names)
        assert_close(dense[idx[:, None], idx], want[idx[:, None], idx], rtol=1e-10, what=str(names))
    rows = _block_of(curv, ["0.weight"]).reshape(6, 3)
    assert float(want[rows[4, 0], rows[4, 0]]) > 0.1 + 1e-2  # the used token's row has curvature
    assert_close(
        dense[rows[1][:, None], rows[1]], (0.1 + 1e-2) * torch.eye(3, dtype=F64)
    )  # unused: damping + wd


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_diagonal_block_equals_the_dense_diagonal(kind):
    """LayerNorm weight/bias and a free parameter: the diagonal of the dense matrix."""
    model = _init(TextClassifier().double(), 1)
    ids = torch.randint(1, 6, (9, 4), generator=_gen(2))
    data = (ids, torch.randint(0, 3, (9,), generator=_gen(3)))
    task = ClassificationTask(weight_decay=1e-2)
    curv = EKFAC(kind=kind, damping=0.05).fit(model, task, data)
    block = curv.blocks[-1]
    assert block.module == DIAGONAL and set(block.params) == {"norm.weight", "norm.bias", "scale"}
    idx = _block_of(curv, list(block.params))
    dense = curv.matvec(torch.eye(curv.layout.num_params, dtype=F64))[idx[:, None], idx]
    full = dense_ggn(model, task, data) if kind == "ggn" else dense_ef(model, task, data)
    want = torch.diag(full.diagonal()[idx] + 0.05)
    assert_close(dense, want, rtol=1e-9, what="diagonal block")


def test_whole_model_scores_match_the_flat_solve_and_survive_a_store(tmp_path):
    """Per-module scoring (hooked layers + vmap diagonal block) equals ``g_q (M̂ + λ)⁻¹ g_trᵀ``
    with the fitted curvature; the state saves and loads (empty eigenvector tensors too)."""
    model = _init(TextClassifier().double(), 4)
    ids = torch.randint(0, 6, (12, 5), generator=_gen(5))
    ids[:, 0] = torch.randint(1, 6, (12,), generator=_gen(6))  # at least one real token
    y = torch.randint(0, 3, (12,), generator=_gen(7))
    train, query = (ids[:9], y[:9]), (ids[9:], y[9:])
    task = ClassificationTask(weight_decay=1e-2)
    est = InfluenceFunction(model, task, EKFAC(), chunk_size=4).fit(train)
    g_tr = loop_gradients(model, task, train)
    g_q = loop_gradients(model, task, query, measurement=True)
    want = g_q @ est.curvature.solve(g_tr).T
    assert_close(est.scores(query, train), want, rtol=1e-9)
    est.curvature.save(tmp_path / "c")
    loaded = EKFAC().load(tmp_path / "c")
    v = torch.randn(3, curv_p := est.curvature.layout.num_params, generator=_gen(8), dtype=F64)
    assert_close(loaded.solve(v), est.curvature.solve(v), rtol=1e-12)
    assert curv_p == sum(p.numel() for p in model.parameters())


def test_attention_mask_leaves_padding_out_of_the_input_factors():
    """With ``task.attention_mask``, ``A`` of the per-token linear layer and the
    embedding's token frequencies average over real tokens only."""
    model = _init(TextClassifier().double(), 9)
    ids = torch.tensor([[3, 2, 0, 0], [5, 5, 1, 0], [2, 0, 0, 0]])
    data = (ids, torch.tensor([0, 1, 2]))
    curv = KFAC().fit(model, PaddedTask(), data)
    real = ids != 0
    with torch.no_grad():
        h = model.norm(model.embed(ids))[real]  # [real tokens, d]
    a = torch.cat([h, torch.ones(h.shape[0], 1, dtype=F64)], 1)
    vals, vecs = curv.state.eigvals_a["mix"], curv.state.eigvecs_a["mix"]
    assert_close(vecs @ torch.diag(vals) @ vecs.T, a.T @ a / a.shape[0], rtol=1e-10, atol=1e-12)
    counts = torch.bincount(ids[real], minlength=6).to(F64)
    counts[0] = 0  # padding_idx gets no gradient
    assert_close(curv.state.eigvals_a["embed"], counts / real.sum(), rtol=1e-12)
    unmasked = KFAC().fit(model, ClassificationTask(), data)
    assert not torch.allclose(unmasked.state.eigvals_a["embed"], curv.state.eigvals_a["embed"])


class BatchNormCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.fc(nn.functional.max_pool2d(h, 2).flatten(1))


@pytest.mark.parametrize("build", ["text", "cnn"])
def test_standard_architectures_run_with_the_default_curvature(build):
    """Embedding + LayerNorm + Linear, and a CNN with BatchNorm and Dropout: the default
    call (no ``modules=``) runs, and equals the flat solve of the EK-FAC it fitted."""
    if build == "text":
        model = _init(TextClassifier().double(), 11)
        x = torch.randint(1, 6, (14, 4), generator=_gen(12))
    else:
        model = _init(BatchNormCNN().double(), 13)
        with torch.no_grad():
            model.bn.running_var.uniform_(0.5, 2.0, generator=_gen(14))
        x = torch.randn(14, 1, 8, 8, generator=_gen(15), dtype=F64)
    y = torch.randint(0, 3, (14,), generator=_gen(16))
    train, query = (x[:10], y[:10]), (x[10:], y[10:])
    task = ClassificationTask(weight_decay=1e-3)
    scores = headwater.influence(model, train, query, task=task, curvature="ekfac")
    est = InfluenceFunction(model, task, EKFAC()).fit(train)
    want = (
        loop_gradients(model, task, query, measurement=True)
        @ est.curvature.solve(loop_gradients(model, task, train)).T
    )
    assert_close(scores.values, want, rtol=1e-9)
    diagonal = est.curvature.blocks[-1]
    assert diagonal.module == DIAGONAL and len(diagonal.params) >= 2


@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_without_module_selection(tied):
    """Token embedding as a block; the position embedding (called on ``arange(T)``) and a
    head tied to the token embedding in the diagonal block, whose vmap gradients see
    every use: per-module scores equal the flat solve."""
    from cases import causal_lm

    case = causal_lm(tied=tied)
    est = InfluenceFunction(case.model, case.task, EKFAC(), chunk_size=6).fit(case.train)
    layers = {b.module: b for b in est.curvature.blocks}
    assert "pos" not in layers and "pos.weight" in layers[DIAGONAL].params
    assert ("embed" in layers) != tied and ("embed.weight" in layers[DIAGONAL].params) == tied
    g_tr = loop_gradients(case.model, case.task, case.train)
    g_q = loop_gradients(case.model, case.task, case.query, measurement=True)
    assert_close(est.scores(case.query, case.train), g_q @ est.curvature.solve(g_tr).T, rtol=1e-9)


def test_kronecker_projection_covers_norms_and_refuses_a_shared_position_embedding():
    """Per-layer projection with a diagonal block: with projections that keep every side
    whole it is the exact influence; a module called on ``arange(T)`` is named."""
    from cases import causal_lm

    from headwater.gradients.projection import KroneckerProjection

    model = _init(TextClassifier().double(), 21)
    ids = torch.randint(1, 6, (10, 4), generator=_gen(22))
    y = torch.randint(0, 3, (10,), generator=_gen(23))
    task = ClassificationTask(weight_decay=1e-2)
    train, query = (ids[:7], y[:7]), (ids[7:], y[7:])
    got = headwater.influence(
        model, train, query, task=task, projection=KroneckerProjection(64, 64), damping=0.1
    )
    want = headwater.influence(model, train, query, task=task, curvature="exact", damping=0.1)
    assert_close(got.values, want.values, rtol=1e-7)
    case = causal_lm()
    with pytest.raises(ValueError, match="'pos'"):
        headwater.influence(
            case.model, case.train, case.query, task=case.task, projection=KroneckerProjection(8, 8)
        )


def test_default_attention_mask_reads_a_hugging_face_batch():
    ids, mask = torch.tensor([[3, 4, 0]]), torch.tensor([[1, 1, 0]])
    assert ClassificationTask().attention_mask({"input_ids": ids, "attention_mask": mask}) is mask
    assert ClassificationTask().attention_mask(ids) is None
