"""Layers that K-FAC understands: finding them, capturing their inputs and output gradients.

A *block* is one supported module whose weight and/or bias are analysed. For one
example its gradient is the matrix

    G = Σ_t s_t ã_tᵀ                                  [out, in (+1)]

summed over positions ``t`` (tokens of a sequence, output pixels of a convolution),
with ``ã_t = [a_t; 1]`` the layer input in homogeneous coordinates when the bias is
analysed (Martens & Grosse 2015, "Optimizing Neural Networks with Kronecker-factored
Approximate Curvature", §A) and ``s_t = ∂ℓ/∂z_t`` the gradient in the layer's output
``z_t = W ã_t``. Supported modules: ``nn.Linear`` over any leading dimensions,
``nn.Conv1d``/``nn.Conv2d`` (patches by ``unfold``; Grosse & Martens 2016, "A
Kronecker-factored approximate Fisher matrix for convolution layers") and Hugging
Face's GPT-2 ``Conv1D`` (weight stored ``[in, out]``). The first input dimension must
be the batch, and a layer's output must not be modified in place.

Inputs and output gradients are captured with forward hooks that are always removed,
while the model runs through ``torch.func.functional_call`` on detached copies of the
analysed parameters: the user's model, its ``.grad`` and its hooks are left unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwater.gradients.flat import ParamLayout

__all__ = ["Block", "Capture", "capture", "find_blocks", "from_blocks", "to_blocks"]

_SUPPORTED = "nn.Linear, nn.Conv1d, nn.Conv2d and GPT-2 style Conv1D"


@dataclass(frozen=True)
class Block:
    """One supported module: the names of its analysed parameters in the flat layout.

    Attributes:
        module: the module's name in ``model.named_modules()``.
        weight, bias: parameter names, or ``None`` when not analysed.
        transposed: the weight is stored ``[in, out]`` (GPT-2 ``Conv1D``).
        out_features: rows of ``G``.
        in_features: input features per position (``C_in·k_h·k_w`` for a convolution).
    """

    module: str
    weight: str | None
    bias: str | None
    transposed: bool
    out_features: int
    in_features: int

    @property
    def width(self) -> int:
        """Columns of ``G``: the analysed inputs plus the homogeneous coordinate."""
        return (self.in_features if self.weight else 0) + (1 if self.bias else 0)

    def to_list(self) -> list:
        return [self.module, self.weight, self.bias, self.transposed, self.out_features,
                self.in_features]


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return "conv"
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int):
        return "gpt2"
    return None


def _conv_padding(module: nn.Module, name: str) -> tuple[int, ...]:
    if module.groups != 1 or module.padding_mode != "zeros":
        raise ValueError(f"modules: K-FAC supports convolutions with groups=1 and zero padding; "
                         f"{name!r} has groups={module.groups}, padding_mode={module.padding_mode!r}")
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise ValueError(f"modules: {name!r} uses asymmetric padding='same'; not supported")
        return tuple(t // 2 for t in total)
    return tuple(module.padding)


def find_blocks(model: nn.Module, params: dict[str, Tensor]) -> tuple[Block, ...]:
    """The blocks covering the analysed ``params``, in registration order.

    Raises:
        ValueError: naming every analysed parameter outside a supported module.
    """
    blocks, covered = [], set()
    for mname, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            continue
        prefix = f"{mname}." if mname else ""
        weight = prefix + "weight" if prefix + "weight" in params else None
        bias = prefix + "bias" if getattr(module, "bias", None) is not None else None
        bias = bias if bias in params else None
        if weight is None and bias is None:
            continue
        if kind == "conv":
            _conv_padding(module, mname)
            out, inp = module.out_channels, module.weight[0].numel()
        elif kind == "gpt2":
            inp, out = module.weight.shape
        else:
            out, inp = module.out_features, module.in_features
        blocks.append(Block(mname, weight, bias, kind == "gpt2", out, inp))
        covered.update(n for n in (weight, bias) if n)
    missing = [n for n in params if n not in covered]
    if missing:
        raise ValueError(
            f"modules: K-FAC/EK-FAC only cover parameters of {_SUPPORTED}; these analysed "
            f"parameters are outside such a module: {missing}. Select supported modules with "
            "Task(modules=[...]) or use another curvature."
        )
    return tuple(blocks)


def _inputs(module: nn.Module, x: Tensor, kind: str) -> Tensor:
    """Layer inputs per position, ``[B, T, in]``."""
    if kind != "conv":
        return x.reshape(x.shape[0], -1, x.shape[-1])
    padding = _conv_padding(module, "")
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
    """Inputs and outputs of the blocks' modules seen during one forward pass."""

    def __init__(self, model: nn.Module, blocks: tuple[Block, ...]):
        modules = dict(model.named_modules())
        self.blocks = blocks
        self.modules = {b.module: modules[b.module] for b in blocks}
        self.inputs: dict[str, list[Tensor]] = {b.module: [] for b in blocks}
        self.outputs: dict[str, list[Tensor]] = {b.module: [] for b in blocks}

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
                a = _inputs(self.modules[b.module], x, kind) if b.weight else x.new_zeros(
                    x.shape[0], positions, 0)
                if b.bias:
                    a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
                parts.append(a)
            out[b.module] = torch.cat(parts, dim=1)
        return out

    def signals(self, total: Tensor, *, retain_graph: bool = False) -> dict[str, Tensor]:
        """``s = ∂ total / ∂z`` per block, ``[B, T, out]``, without touching ``.grad``."""
        return {k: v[0] for k, v in self.pullback(total, None, retain_graph=retain_graph).items()}

    def pullback(self, output: Tensor, cotangents: Tensor | None, *,
                 retain_graph: bool = False) -> dict[str, Tensor]:
        """``s_k = J_zᵀ c_k`` per block for a batch of cotangents ``c [K, *output.shape]``
        of ``output`` (one vectorised backward pass), ``{module: [K, B, T, out]}``; with
        ``cotangents=None``, ``output`` is a scalar and ``K = 1``."""
        flat = [z for b in self.blocks for z in self.outputs[b.module]]
        batched = cotangents is not None and cotangents.shape[0] > 1
        grad_out = None if cotangents is None else (cotangents if batched else cotangents[0])
        grads = torch.autograd.grad(output, flat, grad_outputs=grad_out, retain_graph=retain_graph,
                                    allow_unused=True, is_grads_batched=batched)
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


def to_blocks(flat: Tensor, blocks: tuple[Block, ...], layout: ParamLayout) -> dict[str, Tensor]:
    """Flat vectors ``[K, P]`` -> per-block matrices ``{module: [K, out, width]}``."""
    slices, k = layout.slices(), flat.shape[0]
    out = {}
    for b in blocks:
        parts = []
        if b.weight:
            w = flat[:, slices[b.weight]]
            parts.append(w.reshape(k, b.in_features, b.out_features).transpose(1, 2) if b.transposed
                         else w.reshape(k, b.out_features, b.in_features))
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
        if b.weight:
            w = m[:, :, : b.in_features]
            w = w.transpose(1, 2) if b.transposed else w
            flat[:, slices[b.weight]] = w.reshape(m.shape[0], -1)
        if b.bias:
            flat[:, slices[b.bias]] = m[:, :, -1]
    return flat
