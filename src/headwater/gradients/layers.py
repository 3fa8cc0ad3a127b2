"""Layers that K-FAC understands: finding them, capturing their inputs and output gradients.

A *block* is one supported module whose weight and/or bias are analysed. For one
example its gradient is the matrix

    G = Σ_t s_t ã_tᵀ                                  [out, in (+1)]

summed over positions ``t`` (tokens of a sequence, output pixels of a convolution),
with ``ã_t = [a_t; 1]`` the layer input in homogeneous coordinates when the bias is
analysed (Martens & Grosse 2015, "Optimizing Neural Networks with Kronecker-factored
Approximate Curvature", §A) and ``s_t = ∂ℓ/∂z_t`` the gradient in the layer's output
``z_t = W ã_t``. Supported modules: ``nn.Linear`` over any leading dimensions,
``nn.Conv1d``/``nn.Conv2d`` with ``groups=1`` and zero padding (patches by ``unfold``;
Grosse & Martens 2016, "A Kronecker-factored approximate Fisher matrix for convolution
layers"), Hugging Face's ``Conv1D`` (recognised by its class name and ``nf``; weight
stored ``[in, out]``) and ``nn.Embedding``: its weight ``[V, D]`` is the transposed
weight of a linear layer on one-hot inputs, ``a_t = e_{token_t}`` (zero for
``padding_idx``), so its input factor ``E[a aᵀ]`` is diagonal, the tokens' frequencies
(as in Kronfluence and Grosse et al. 2023).

Every other analysed parameter (LayerNorm/BatchNorm weights and biases, biases of
unsupported layers, free ``nn.Parameter``s, weights tied between modules, layers inside
``nn.MultiheadAttention`` whose forward bypasses their hooks) goes to one *diagonal
block* named :data:`DIAGONAL`: its gradient is the flat per-example gradient of those
parameters (from ``vmap`` through the whole model, :class:`DiagonalPart`), written as a
``[P_d, 1]`` matrix with ``ã = 1``, and K-FAC/EK-FAC keep only the diagonal of its
curvature block. A standard architecture is therefore never refused.

Inputs and output gradients are captured with forward hooks that are always removed,
while the model runs through ``torch.func.functional_call`` on detached copies of the
analysed parameters: the user's model, its ``.grad`` and its hooks are left unchanged.
The first input dimension must be the batch, and a layer's output must not be
modified in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad

from headwater.data import DataLike, Inputs, iter_batches, one_example, take
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import (
    bind,
    detached,
    evaluation_mode,
    prepare_batch,
    vmap_examples,
)
from headwater.gradients.per_example import output_pullbacks

__all__ = [
    "DIAGONAL",
    "Block",
    "Capture",
    "DiagonalPart",
    "capture",
    "find_blocks",
    "from_blocks",
    "to_blocks",
]

DIAGONAL = "(diagonal)"
"""Name of the diagonal block (no module name contains parentheses)."""


@dataclass(frozen=True)
class Block:
    """One supported module, or the diagonal block: the names of its analysed parameters.

    Attributes:
        module: the module's name in ``model.named_modules()`` (:data:`DIAGONAL` for the
            diagonal block).
        weight, bias: parameter names, or ``None`` when not analysed.
        transposed: the weight is stored ``[in, out]`` (``Conv1D``, ``nn.Embedding``).
        out_features: rows of ``G`` (``P_d`` for the diagonal block).
        in_features: input features per position (``C_in·k_h·k_w`` for a convolution,
            ``V`` for an embedding).
        layer: ``"dense"``, ``"embedding"`` (diagonal input factor) or ``"diagonal"``.
        params: the diagonal block's parameter names, in layout order.
    """

    module: str
    weight: str | None
    bias: str | None
    transposed: bool
    out_features: int
    in_features: int
    layer: str = "dense"
    params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(self.params))

    @property
    def diagonal(self) -> bool:
        """Whether this is the diagonal block (only its curvature's diagonal is kept)."""
        return self.layer == "diagonal"

    @property
    def width(self) -> int:
        """Columns of ``G``: the analysed inputs plus the homogeneous coordinate."""
        if self.diagonal:
            return 1
        return (self.in_features if self.weight else 0) + (1 if self.bias else 0)

    def to_list(self) -> list:
        return [
            self.module,
            self.weight,
            self.bias,
            self.transposed,
            self.out_features,
            self.in_features,
            self.layer,
            list(self.params),
        ]


def _kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv"``, ``"gpt2"``, ``"embedding"``, or ``None`` (not hooked)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return "conv" if _conv_padding(module) is not None else None
    if isinstance(module, nn.Embedding):
        plain = module.max_norm is None and not module.scale_grad_by_freq
        return "embedding" if plain else None
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int):
        return "gpt2"
    return None


def _conv_padding(module: nn.Module) -> tuple[int, ...] | None:
    """Symmetric zero padding per side, or ``None`` when K-FAC does not support the
    convolution (``groups > 1``, other padding modes, asymmetric ``padding="same"``)."""
    if module.groups != 1 or module.padding_mode != "zeros":
        return None
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return tuple(module.padding)


def _hidden(model: nn.Module) -> set[str]:
    """Names of modules whose forward may not run through their hooks (the layers inside
    ``nn.MultiheadAttention``, whose weights it uses functionally)."""
    return {
        f"{owner}.{child}" if owner else child
        for owner, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_modules()
        if child
    }


def find_blocks(
    model: nn.Module, params: dict[str, Tensor], task: Any = None, data: DataLike | None = None
) -> tuple[Block, ...]:
    """The blocks covering the analysed ``params``: supported modules in registration
    order, then the diagonal block of every other analysed parameter (if any).

    A parameter shared by several names (tied weights) goes to the diagonal block: hooks
    on one module would see one of its uses only. With ``task`` and ``data``, the model
    runs on batches of 3 and 2 of the first examples, and a module that is not called, or
    whose input or output does not have the batch as first dimension (e.g. a position
    embedding called on ``arange(T)``), also goes to the diagonal block.
    """
    names = dict(model.named_parameters(remove_duplicate=False))
    uses: dict[int, int] = {}
    for p in names.values():
        uses[id(p)] = uses.get(id(p), 0) + 1
    single = {n for n in params if n in names and uses[id(names[n])] == 1}
    hidden = _hidden(model)
    candidates = {
        m: module
        for m, module in model.named_modules()
        if _kind(module) is not None and m not in hidden
    }
    if task is not None and data is not None:
        batched = _batched(model, task, params, candidates, data)
        candidates = {m: module for m, module in candidates.items() if m in batched}
    blocks, covered = [], set()
    for mname, module in candidates.items():
        kind = _kind(module)
        prefix = f"{mname}." if mname else ""
        weight = prefix + "weight" if prefix + "weight" in single else None
        bias = prefix + "bias" if getattr(module, "bias", None) is not None else None
        bias = bias if bias in single else None
        if weight is None and bias is None:
            continue
        if kind == "conv":
            out, inp = module.out_channels, module.weight[0].numel()
        elif kind in ("gpt2", "embedding"):
            inp, out = module.weight.shape
        else:
            out, inp = module.out_features, module.in_features
        blocks.append(
            Block(
                mname,
                weight,
                bias,
                kind in ("gpt2", "embedding"),
                out,
                inp,
                "embedding" if kind == "embedding" else "dense",
            )
        )
        covered.update(n for n in (weight, bias) if n)
    rest = tuple(n for n in params if n not in covered)
    if rest:
        size = sum(params[n].numel() for n in rest)
        blocks.append(Block(DIAGONAL, None, None, False, size, 1, "diagonal", rest))
    return tuple(blocks)


def _batched(
    model: nn.Module,
    task: Any,
    params: dict[str, Tensor],
    candidates: dict[str, nn.Module],
    data: DataLike,
) -> set[str]:
    """The candidates called in every probe forward pass with the batch as the first
    dimension of every input and output."""
    ref = next(iter(params.values()))
    x, y = prepare_batch(next(iter_batches(data, 3, "train")), ref)
    sizes = [s for s in (3, 2) if s <= y.shape[0]] or [y.shape[0]]
    ok = set(candidates)
    for size in sizes:
        seen = _probe(model, task, params, candidates, take(x, slice(0, size)))
        ok &= {n for n, shapes in seen.items() if all(s == size for s in shapes)}
    return ok


def _probe(
    model: nn.Module,
    task: Any,
    params: dict[str, Tensor],
    candidates: dict[str, nn.Module],
    x: Tensor,
) -> dict[str, list[int | None]]:
    """Per candidate called in one forward pass on ``x``: the first dimension of each
    call's input and output (``None`` for a non-tensor or a scalar)."""
    seen: dict[str, list[int | None]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            for t in (args[0] if args else None, output):
                seen.setdefault(name, []).append(
                    t.shape[0] if isinstance(t, Tensor) and t.dim() > 0 else None
                )

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in candidates.items()]
    try:
        with torch.no_grad(), evaluation_mode(model):
            task.output(bind(model, detached(params)), x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _inputs(module: nn.Module, x: Tensor, kind: str, dtype: torch.dtype) -> Tensor:
    """Layer inputs per position, ``[B, T, in]`` (one-hot tokens for an embedding)."""
    if kind == "embedding":
        a = F.one_hot(x.reshape(x.shape[0], -1).long(), module.num_embeddings).to(dtype)
        if module.padding_idx is not None:  # its row gets no gradient
            a[..., module.padding_idx] = 0
        return a
    if kind != "conv":
        return x.reshape(x.shape[0], -1, x.shape[-1])
    padding = _conv_padding(module)
    if x.dim() == 3:  # Conv1d as a 1 × L image
        x = x.unsqueeze(2)
        args = [(1, *module.kernel_size), (1, *module.dilation), (0, *padding), (1, *module.stride)]
    else:
        args = [module.kernel_size, module.dilation, padding, module.stride]
    return F.unfold(x, *args).transpose(1, 2)  # [B, L, C_in·k_h·k_w]


def _signal(z_grad: Tensor, kind: str) -> Tensor:
    """Output gradients per position, ``[B, T, out]``."""
    if kind == "conv":
        return z_grad.reshape(z_grad.shape[0], z_grad.shape[1], -1).transpose(1, 2)
    return z_grad.reshape(z_grad.shape[0], -1, z_grad.shape[-1])


class Capture:
    """Inputs and outputs of the blocks' modules seen during one forward pass (the
    diagonal block has no module: see :class:`DiagonalPart`)."""

    def __init__(self, model: nn.Module, blocks: tuple[Block, ...]):
        modules = dict(model.named_modules())
        self.blocks = tuple(b for b in blocks if not b.diagonal)
        self.modules = {b.module: modules[b.module] for b in self.blocks}
        self.inputs: dict[str, list[Tensor]] = {b.module: [] for b in self.blocks}
        self.outputs: dict[str, list[Tensor]] = {b.module: [] for b in self.blocks}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.inputs[name].append(args[0].detach())
            self.outputs[name].append(output)

        return hook

    def activations(self) -> dict[str, Tensor]:
        """``ã`` per block, ``[B, T, width]`` (calls of a shared module are extra positions)."""
        out = {}
        for b in self.blocks:
            parts = []
            for x, z in zip(self.inputs[b.module], self.outputs[b.module], strict=True):
                kind = _kind(self.modules[b.module])
                positions = _signal(z.detach(), kind).shape[1]
                a = (
                    _inputs(self.modules[b.module], x, kind, z.dtype)
                    if b.weight
                    else z.new_zeros(x.shape[0], positions, 0)
                )
                if b.bias:
                    a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
                parts.append(a)
            out[b.module] = torch.cat(parts, dim=1)
        return out

    def signals(self, total: Tensor, *, retain_graph: bool = False) -> dict[str, Tensor]:
        """``s = ∂ total / ∂z`` per block, ``[B, T, out]``, without touching ``.grad``."""
        return {k: v[0] for k, v in self.pullback(total, None, retain_graph=retain_graph).items()}

    def pullback(
        self, output: Tensor, cotangents: Tensor | None, *, retain_graph: bool = False
    ) -> dict[str, Tensor]:
        """``s_k = J_zᵀ c_k`` per block for a batch of cotangents ``c [K, *output.shape]``
        of ``output`` (one vectorised backward pass), ``{module: [K, B, T, out]}``; with
        ``cotangents=None``, ``output`` is a scalar and ``K = 1``."""
        flat = [z for b in self.blocks for z in self.outputs[b.module]]
        if not flat:
            return {}
        batched = cotangents is not None and cotangents.shape[0] > 1
        grad_out = None if cotangents is None else (cotangents if batched else cotangents[0])
        grads = torch.autograd.grad(
            output,
            flat,
            grad_outputs=grad_out,
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=batched,
        )
        k = cotangents.shape[0] if cotangents is not None else 1
        out, i = {}, 0
        for b in self.blocks:
            parts = []
            kind = _kind(self.modules[b.module])
            for z in self.outputs[b.module]:
                g = grads[i] if grads[i] is not None else z.new_zeros(k, *z.shape)
                g = g.detach().reshape(k * z.shape[0], *z.shape[1:])
                s = _signal(g, kind)  # [K·B, T, out]
                parts.append(s.reshape(k, z.shape[0], *s.shape[1:]))
                i += 1
            out[b.module] = torch.cat(parts, dim=2)
        return out


@contextlib.contextmanager
def capture(model: nn.Module, blocks: tuple[Block, ...]) -> Iterator[Capture]:
    """Record the blocks' inputs/outputs while the body runs; hooks are removed after."""
    cap = Capture(model, blocks)
    handles = []
    try:
        for name, module in cap.modules.items():
            handles.append(module.register_forward_hook(cap._hook(name)))
        yield cap
    finally:
        for handle in handles:
            handle.remove()


class DiagonalPart:
    """The diagonal block's per-example gradients, flat, from ``vmap`` through the whole
    model (so every use of its parameters counts), in the blocks' ``[.., B, T=1, out]``
    form with activations ``ã = 1``. Empty dicts when there is no diagonal block.

    Args:
        model, task: the model and task being analysed.
        blocks: from :func:`find_blocks`.
        params: the analysed parameters (detached copies are taken).
    """

    def __init__(
        self, model: nn.Module, task: Any, blocks: tuple[Block, ...], params: dict[str, Tensor]
    ):
        self.block = next((b for b in blocks if b.diagonal), None)
        self.model, self.task = model, task
        self.params = (
            {} if self.block is None else {n: params[n].detach() for n in self.block.params}
        )

    def pullback(self, inputs: Inputs, cotangents: Tensor) -> dict[str, Tensor]:
        """``{DIAGONAL: J_iᵀ c_k [K, B, 1, P_d]}`` for cotangents ``c [K, B, *output]``."""
        if self.block is None:
            return {}
        fn = output_pullbacks(self.model, self.task, self.params)
        return {DIAGONAL: torch.stack([fn(inputs, c) for c in cotangents]).unsqueeze(2)}

    def gradients(self, batch: tuple[Inputs, Tensor], value_fn: Callable) -> dict[str, Tensor]:
        """``{DIAGONAL: ∇ value_fn(z_i) [B, 1, P_d]}`` for a per-example ``value_fn(model, batch)``."""
        if self.block is None:
            return {}
        model, layout = self.model, ParamLayout.of(self.params)

        def single(p: dict[str, Tensor], x: Inputs, y: Tensor) -> Tensor:
            return value_fn(bind(model, p), (one_example(x), y.unsqueeze(0))).sum()

        grads = vmap_examples(grad(single), in_dims=(None, 0, 0))(self.params, *batch)
        return {DIAGONAL: layout.flatten(grads, batch_dims=1).unsqueeze(1)}

    def activations(self, batch_size: int, like: Tensor) -> dict[str, Tensor]:
        """``{DIAGONAL: ones [B, 1, 1]}``."""
        return {} if self.block is None else {DIAGONAL: like.new_ones(batch_size, 1, 1)}


def to_blocks(flat: Tensor, blocks: tuple[Block, ...], layout: ParamLayout) -> dict[str, Tensor]:
    """Flat vectors ``[K, P]`` -> per-block matrices ``{module: [K, out, width]}``."""
    slices, k = layout.slices(), flat.shape[0]
    out = {}
    for b in blocks:
        if b.diagonal:
            out[b.module] = torch.cat([flat[:, slices[n]] for n in b.params], dim=1).unsqueeze(2)
            continue
        parts = []
        if b.weight:
            w = flat[:, slices[b.weight]]
            parts.append(
                w.reshape(k, b.in_features, b.out_features).transpose(1, 2)
                if b.transposed
                else w.reshape(k, b.out_features, b.in_features)
            )
        if b.bias:
            parts.append(flat[:, slices[b.bias]].reshape(k, b.out_features, 1))
        out[b.module] = torch.cat(parts, dim=2)
    return out


def from_blocks(mats: dict[str, Tensor], blocks: tuple[Block, ...], layout: ParamLayout) -> Tensor:
    """Per-block matrices ``{module: [K, out, width]}`` -> flat vectors ``[K, P]``."""
    slices = layout.slices()
    first = next(iter(mats.values()))
    flat = first.new_zeros(first.shape[0], layout.num_params)
    for b in blocks:
        m = mats[b.module]
        if b.diagonal:
            start = 0
            for n in b.params:
                size = slices[n].stop - slices[n].start
                flat[:, slices[n]] = m[:, start : start + size, 0]
                start += size
            continue
        if b.weight:
            w = m[:, :, : b.in_features]
            w = w.transpose(1, 2) if b.transposed else w
            flat[:, slices[b.weight]] = w.reshape(m.shape[0], -1)
        if b.bias:
            flat[:, slices[b.bias]] = m[:, :, -1]
    return flat
