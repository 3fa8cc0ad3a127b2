"""The metagradient's products written out layer by layer, for feed-forward stacks.

A reverse step of :class:`~headwater.methods.metagradient.Metagradient` needs, for a chunk
of query adjoints ``V [c, P]``, ``H_t V`` (the Hessian of the weighted batch loss) and
``∂(g_t·V)/∂w`` (the weight derivatives). The generic path pulls every row back through
the batch gradient's autograd graph (reverse over reverse, vmapped). For a model that is
an ``nn.Sequential`` of the layers below, this module computes the same numbers with
Pearlmutter's R-operator by hand: one shared forward and backward pass per step, then per
chunk an R-forward and an R-backward pass whose every operation is batched over the chunk
(convolutions and matrix products with the queries folded into the batch, or into the
channels where the queries' tangents are weights), without vmap or autograd graphs. A
convolution's products with the queries' tangents of its own parameters are matrix
products with its input's patches (unfolded once per step). The head (the first layer
with parameters when it is a convolution, its activation, an average pool after it) has
a fixed input, so its R-operators are linear in the queries' tangents of its own
parameters through tensors the chunks share (:meth:`Stack._head_shared`): no per-query
maps of the first layer's size. On the digits CNN it is 2.1-2.8x faster per query than
the pullback in chunks of 11-34 (0.39-0.50 ms on a quiet core;
``bench/metagradient_floor.py``), and holds under half a forward pass's tensors per query.

Supported layers: ``Linear`` (2-D inputs), ``Conv2d`` (``groups=1``, zero padding given as
numbers), ``Tanh``, ``Sigmoid``, ``ReLU``, ``Identity``, ``Dropout`` (in eval mode: the
run drew no random numbers), ``AvgPool2d`` (kernel = stride, no padding), ``Flatten`` and
``Unflatten`` of the feature dimensions; inputs ``[B, features]`` (``[B, C, H, W]`` at a
convolution), outputs ``[B, K]`` (else :class:`Unsupported` at the first step, and the
generic path); every parameter trained; the task's loss a
function of the model's output (:meth:`~headwater.task.Task.loss` of
:meth:`~headwater.task.Task.output`), differentiated by autograd on the ``[B, K]``
output. Anything else (BatchNorm in train mode, attention, other modules) takes the
generic path. Equal to it to rounding (tests: float64, 1e-12).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp, vmap
from torch.nn.grad import conv2d_input, conv2d_weight

from headwater.task import Task

__all__ = ["Stack", "Unsupported", "covers", "stack"]


class Unsupported(Exception):
    """The layer pass does not apply to this model's tensors (a ``Linear`` on ``[B, T, d]``,
    an output other than ``[B, K]``): the caller takes the generic path."""


_ACTIVATIONS: dict[type, Callable[[Tensor, Tensor], tuple[Tensor | None, Tensor | None]]] = {
    # (σ'(z), σ''(z)) from (z, σ(z)); None: 1 / 0
    nn.Tanh: lambda z, a: (1 - a * a, -2 * a * (1 - a * a)),
    nn.Sigmoid: lambda z, a: (a * (1 - a), a * (1 - a) * (1 - 2 * a)),
    nn.ReLU: lambda z, a: ((z > 0).to(z.dtype), None),
    nn.Identity: lambda z, a: (None, None),
    nn.Dropout: lambda z, a: (None, None),
}


def _flat_modules(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """``(name, module)`` of a (nested) ``nn.Sequential`` in order, or None."""
    if not isinstance(model, nn.Sequential):
        return None
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential):
            inner = _flat_modules(child)
            if inner is None:
                return None
            out += [(f"{name}.{n}", m) for n, m in inner]
        else:
            out.append((name, child))
    return out


def _supported(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, nn.Conv2d):
        return (
            m.groups == 1
            and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)
            and type(m).forward is nn.Conv2d.forward
        )
    if type(m) in _ACTIVATIONS:
        return not (isinstance(m, nn.ReLU) and m.inplace)
    if type(m) is nn.AvgPool2d:
        k = _pair(m.kernel_size)
        return (
            _pair(m.stride or m.kernel_size) == k
            and _pair(m.padding) == (0, 0)
            and not m.ceil_mode
            and m.divisor_override is None
        )
    if type(m) is nn.Flatten:
        return m.start_dim == 1 and m.end_dim == -1
    return type(m) is nn.Unflatten and m.dim == 1


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def stack(model: nn.Module, names: Sequence[str], task: Task) -> list[tuple[str, nn.Module]] | None:
    """The layers of ``model`` if this module's products apply to it (module docstring):
    a Sequential of supported layers whose parameters are exactly ``names``, and a task
    that neither overrides how the output is taken nor how the loss is formed from it."""
    layers = _flat_modules(model)
    if layers is None or not all(_supported(m) for _, m in layers):
        return None
    owned = [f"{n}.{k}" for n, m in layers for k, p in m.named_parameters(recurse=False)]
    if sorted(owned) != sorted(names):
        return None
    if type(task).train_loss is not Task.train_loss or type(task).output is not Task.output:
        return None
    return layers


def covers(
    layers: list[tuple[str, nn.Module]], params: dict[str, Tensor], x: Tensor, y: Tensor,
    w: Tensor, task: Task,
) -> bool:  # fmt: skip
    """Whether the layer pass covers these tensors (a :class:`Stack` builds on them)."""
    try:
        Stack(layers, params, x, y, w, task, "n")
    except Unsupported:
        return False
    return True


class Stack:
    """One step's products for a supported Sequential (:func:`stack`): the shared forward
    and backward pass at ``params``, then :meth:`products` per chunk of queries."""

    def __init__(
        self,
        layers: list[tuple[str, nn.Module]],
        params: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        w: Tensor,
        task: Task,
        normalization: str,
    ):
        self.layers, self.params = layers, params
        acts = [x]  # the input of each layer, then the output
        for name, m in layers:
            dims = 2 if isinstance(m, nn.Linear) else 4 if isinstance(m, nn.Conv2d) else None
            if dims is not None and acts[-1].dim() != dims:
                raise Unsupported(f"{name}: input of {acts[-1].dim()} dimensions")
            acts.append(self._forward(name, m, acts[-1]))
        self.acts, out = acts, acts[-1]
        if out.dim() != 2:
            raise Unsupported(f"output of {out.dim()} dimensions")

        # the loss at the output [B, K], per example (a task's loss is): r_j = ∂ℓ_j/∂f_j and
        # ∂²ℓ_j/∂f_j² [B, K, K]; the objective is Σ_j w_j ℓ_j / N (N: Σw, or B with "n" or
        # when Σw = 0, as batch_objective), so ∂O/∂f_j = w_j r_j / N
        # ℓ_j depends on f_j alone: K products of the summed loss's Hessian with a basis
        # vector at every example give every example's block (one vmap level, not two)
        def total(f: Tensor) -> Tensor:
            return task.loss(f, y).sum()

        basis = torch.eye(out.shape[1], dtype=out.dtype).unsqueeze(1).expand(-1, *out.shape)
        r, columns = vmap(lambda e: jvp(grad(total), (out,), (e,)))(basis)  # [K, B, K] each
        self.r, self.out_hessian = r[0], columns.permute(1, 2, 0)
        mass = w.sum()
        self.by_mass = normalization != "n" and bool(mass > 0)
        self.norm = mass if self.by_mass else torch.full_like(mass, float(out.shape[0]))
        self.scale = (w / self.norm).reshape(-1, 1, 1)  # [B, 1, 1]
        self.w, self.out = w, out
        deltas = [self.r * self.scale[:, 0]]  # the adjoint of each layer's output, last first
        self.grads: dict[str, Tensor] = {}
        # whether each layer's input depends on θ (after the first layer with parameters):
        # before that, no adjoint of an input is needed
        self.fixed = [True]
        for _, m in layers:
            self.fixed.append(self.fixed[-1] and not isinstance(m, nn.Linear | nn.Conv2d))
        # activations: σ' [B, 1, ...] and σ''·δ, for the chunks' passes (set by _backward)
        self.slopes: dict[int, Tensor | None] = {}
        self.bends: dict[int, Tensor | None] = {}
        self.patches: dict[int, Tensor] = {}
        self.patch_rows: dict[int, Tensor] = {}
        for i in range(len(layers) - 1, -1, -1):
            deltas.append(self._backward(i, deltas[-1]))
        self.deltas = deltas[::-1]  # deltas[i]: adjoint of acts[i]
        self.head = self._find_head()
        self._head_tensors: tuple[Tensor, Tensor | None] | None = None

    # ------------------------------------------------------------------ shared pass
    def _weight(self, name: str, key: str) -> Tensor | None:
        return self.params.get(f"{name}.{key}")

    def _forward(self, name: str, m: nn.Module, a: Tensor) -> Tensor:
        if isinstance(m, nn.Linear):
            return F.linear(a, self._weight(name, "weight"), self._weight(name, "bias"))
        if isinstance(m, nn.Conv2d):
            return F.conv2d(
                a, self._weight(name, "weight"), self._weight(name, "bias"),
                m.stride, m.padding, m.dilation,
            )  # fmt: skip
        if type(m) in _ACTIVATIONS:
            return a if isinstance(m, nn.Identity | nn.Dropout) else m(a)
        if isinstance(m, nn.AvgPool2d):
            return _pool(a, _pair(m.kernel_size))
        return m(a)  # Flatten, Unflatten

    def _backward(self, i: int, dz: Tensor | None) -> Tensor | None:
        """The adjoint of layer ``i``'s input from that of its output (None where the input
        does not depend on θ); parameter gradients into ``grads``, an activation's
        derivatives into ``slopes`` and ``bends``."""
        name, m = self.layers[i]
        if dz is None:
            return None
        a, z = self.acts[i], self.acts[i + 1]
        first = self.fixed[i]
        if isinstance(m, nn.Linear):
            W = self._weight(name, "weight")
            self.grads[f"{name}.weight"] = dz.T @ a
            if m.bias is not None:
                self.grads[f"{name}.bias"] = dz.sum(0)
            return None if first else dz @ W
        if isinstance(m, nn.Conv2d):
            W = self._weight(name, "weight")
            self.grads[f"{name}.weight"] = conv2d_weight(
                a, W.shape, dz, m.stride, m.padding, m.dilation
            )
            if m.bias is not None:
                self.grads[f"{name}.bias"] = dz.sum((0, 2, 3))
            return None if first else conv2d_input(a.shape, W, dz, m.stride, m.padding, m.dilation)
        if type(m) in _ACTIVATIONS:
            d1, d2 = _ACTIVATIONS[type(m)](a, z)
            self.slopes[i] = None if d1 is None else d1.unsqueeze(1)
            self.bends[i] = None if d2 is None else (d2 * dz).unsqueeze(1)
            return dz if d1 is None else dz * d1
        if isinstance(m, nn.AvgPool2d):
            return _unpool(dz, _pair(m.kernel_size), a.shape)
        return dz.reshape(a.shape)

    def _patches(self, i: int) -> Tensor:
        """Convolution ``i``'s input as patches ``[B, K', L]``, made at the first chunk:
        ``K'`` a patch's numbers and a 1 for the bias, ``L`` the output positions. Its
        products with the queries' tangents of its parameters are then matrix products (on
        the digits CNN's maps 1.3-7x faster than mkldnn's convolutions and weight
        gradients)."""
        if i not in self.patches:
            m = self.layers[i][1]
            cols = F.unfold(self.acts[i], m.kernel_size, m.dilation, m.padding, m.stride)
            if m.bias is not None:
                cols = torch.cat([cols, cols.new_ones(cols.shape[0], 1, cols.shape[2])], 1)
            self.patches[i] = cols
        return self.patches[i]

    def _patch_rows(self, i: int) -> Tensor:
        """:meth:`_patches` as ``[K', B L]``, made once per step."""
        if i not in self.patch_rows:
            cols = self._patches(i)
            self.patch_rows[i] = cols.transpose(0, 1).reshape(cols.shape[1], -1)
        return self.patch_rows[i]

    def _tangents(self, vectors: dict[str, Tensor], i: int, c: int) -> Tensor:
        """The queries' tangents of layer ``i``'s parameters as ``[c, o, K']`` (as
        :meth:`_patches`: the bias last)."""
        name, m = self.layers[i]
        V = vectors[f"{name}.weight"]
        flat = V.reshape(c, V.shape[1], -1)
        if m.bias is None:
            return flat
        return torch.cat([flat, vectors[f"{name}.bias"].unsqueeze(-1)], -1)

    def _rows_of(self, i: int, h: Tensor, hv: dict[str, Tensor]) -> None:
        """Layer ``i``'s rows of ``H V`` from ``h [c, o, K']`` into ``hv``."""
        name, m = self.layers[i]
        weight = self.params[f"{name}.weight"]
        n = weight[0].numel()
        hv[f"{name}.weight"] = h[..., :n].reshape(h.shape[0], *weight.shape)
        if m.bias is not None:
            hv[f"{name}.bias"] = h[..., n].contiguous()

    # ------------------------------------------------------------------ the head
    def _find_head(self) -> tuple[int, int] | None:
        """``(i, j)``: layers ``i..j`` are the first layer with parameters, a convolution,
        the activation after it and, if one follows, an average pool. The head's input is
        fixed, so its R-operators are linear in the queries' tangents of its parameters
        alone, through tensors the step's chunks share (:meth:`_head_shared`): no per-query
        maps of the first layer's size. (A Linear first layer has no positions: its
        per-query tensors are as small as those shared tensors' rows, and the products
        by layer are faster on the digits MLP.) Not taken where ``S`` would exceed 4
        forward passes' tensors (a wide patch on a large map without a pool: it holds a
        patch per position and output channel)."""
        kinds = [m for _, m in self.layers]
        i = next((k for k, m in enumerate(kinds) if isinstance(m, nn.Linear | nn.Conv2d)), None)
        if (
            i is None
            or not isinstance(kinds[i], nn.Conv2d)
            or i + 1 == len(kinds)
            or type(kinds[i + 1]) not in _ACTIVATIONS
        ):
            return None
        pooled = i + 2 < len(kinds) and isinstance(kinds[i + 2], nn.AvgPool2d)
        j = i + 2 if pooled else i + 1
        conv = kinds[i]
        patch = conv.weight[0].numel() + (conv.bias is not None)
        if self.acts[j + 1].numel() * patch > 4 * sum(a.numel() for a in self.acts):
            return None
        return i, j

    def _head_shared(self) -> tuple[Tensor, Tensor | None]:
        """``(S [o, K', B L'], M [o, K', K'] or None)``, made at the first chunk. ``K'``: a
        patch of the head's input, with a 1 for the bias; ``o``
        its output channels, ``L'`` the positions after the pool. ``S``: the patches times
        the activation's slope at output channel ``o``, pooled, so that the head's R is
        ``V_o S_o`` and its weight rows of ``H V`` are ``Rδ_o S_oᵀ``; ``M``: the patches'
        second moments weighted by the activation's ``σ''·δ``, its part ``V_o M_o``."""
        if self._head_tensors is None:
            i, j = self.head  # type: ignore[misc]
            cols, z = self._patches(i), self.acts[i + 1]
            (B, k, _), o = cols.shape, z.shape[1]
            slope, bend = self.slopes[i + 1], self.bends[i + 1]
            rows = self._patch_rows(i)  # [K', B L]
            S, M = [], None if bend is None else []
            for ch in range(o):  # one output channel at a time: [B, K', L] temporaries
                per = cols if slope is None else cols * slope[:, 0, ch].reshape(B, 1, -1)
                if j > i + 1:
                    size = _pair(self.layers[j][1].kernel_size)
                    per = _pool(per.reshape(B, k, *z.shape[2:]), size).view(B, k, -1)
                S.append(per.transpose(0, 1).reshape(k, -1))
                if M is not None:
                    M.append((rows * bend[:, 0, ch].reshape(1, -1)) @ rows.T)
            self._head_tensors = (torch.stack(S), None if M is None else torch.stack(M))
        return self._head_tensors

    def _head_backward(self, r_dz: Tensor, Vh: Tensor, hv: dict[str, Tensor], c: int) -> None:
        """The head's rows of ``H V`` from the R of the adjoint of its output."""
        S, M = self._head_shared()
        o, B = S.shape[0], r_dz.shape[0]
        G = r_dz.reshape(B, c, o, -1).permute(2, 1, 0, 3).reshape(o, c, -1)  # [o, c, B L']
        h = torch.bmm(G, S.transpose(1, 2))  # [o, c, K']
        if M is not None:
            h.baddbmm_(Vh, M)  # M is symmetric
        self._rows_of(self.head[0], h.transpose(0, 1), hv)  # type: ignore[index]

    # ------------------------------------------------------------------ products
    def products(
        self, vectors: dict[str, Tensor], hessian: bool = True
    ) -> tuple[dict[str, Tensor] | None, Tensor]:
        """``(H V {name: [c, *shape]}, ∂(g·V)/∂w [c, B])`` for ``V {name: [c, *shape]}``;
        without ``hessian``, ``(None, ∂(g·V)/∂w)`` from the R-forward pass alone (the
        Hessian-free variant's products)."""
        c = next(iter(vectors.values())).shape[0]
        B = self.out.shape[0]
        rs: list[Tensor | None] = [None]  # R of each layer's input / output, [B, c, ...]
        start = 0
        if self.head is not None:
            start = self.head[1] + 1
            S, _ = self._head_shared()
            Vh = self._tangents(vectors, self.head[0], c).transpose(0, 1).contiguous()
            out = torch.bmm(Vh, S).view(S.shape[0], c, B, -1).permute(2, 1, 0, 3)
            rs = [None] * start + [out.reshape(B, c, *self.acts[start].shape[1:])]
        for i in range(start, len(self.layers)):
            name, m = self.layers[i]
            rs.append(self._r_forward(i, name, m, rs[-1], vectors, c))
            if not (
                hessian and (isinstance(m, nn.Linear | nn.Conv2d) or self.bends.get(i) is not None)
            ):
                rs[i] = None  # its R-backward does not read it: freed now
        rf = rs.pop()
        if rf is None:
            raise ValueError("model: its output does not depend on the trained parameters")
        along = (self.r.unsqueeze(1) * rf).sum(-1)  # r_j·Rf_j [B, c]
        jw = along.T / self.norm  # ∂(∂O/∂f · Rf)/∂w_j [c, B]
        if self.by_mass:
            jw = jw - (self.w @ along / self.norm**2).unsqueeze(1)
        if not hessian:
            return None, jw
        r_delta = torch.einsum("bkl,bcl->bck", self.out_hessian, rf) * self.scale  # [B, c, K]
        del rf, along
        hv: dict[str, Tensor] = {}
        for i in range(len(self.layers) - 1, start - 1, -1):  # each R freed once read
            r_delta = self._r_backward(i, rs.pop(), r_delta, vectors, hv, c, B)
        if self.head is not None:
            self._head_backward(r_delta, Vh, hv, c)
        return hv, jw

    def _r_forward(self, i, name, m, ra, vectors, c) -> Tensor | None:
        a, z = self.acts[i], self.acts[i + 1]
        B = a.shape[0]
        if isinstance(m, nn.Linear):
            V, Vb = vectors[f"{name}.weight"], vectors.get(f"{name}.bias")
            bias = None if Vb is None else Vb.reshape(-1)
            out = F.linear(a, V.reshape(-1, V.shape[-1]), bias).view(B, c, -1)
            if ra is not None:
                out.add_(ra @ self._weight(name, "weight").T)
            return out
        if isinstance(m, nn.Conv2d):
            tangents = self._tangents(vectors, i, c).reshape(-1, self._patches(i).shape[1])
            out = torch.matmul(tangents, self._patches(i)).view(B, c, *z.shape[1:])
            if ra is not None:
                W = self._weight(name, "weight")
                inner = F.conv2d(
                    ra.reshape(B * c, *a.shape[1:]), W, None, m.stride, m.padding, m.dilation
                )
                out.add_(inner.view(B, c, *z.shape[1:]))
            return out
        if ra is None:
            return None
        if type(m) in _ACTIVATIONS:
            slope = self.slopes[i]
            return ra if slope is None else ra * slope
        if isinstance(m, nn.AvgPool2d):
            pooled = _pool(ra.reshape(B * c, *a.shape[1:]), _pair(m.kernel_size))
            return pooled.view(B, c, *z.shape[1:])
        return ra.reshape(B, c, *z.shape[1:])

    def _r_backward(self, i, ra, r_dz, vectors, hv, c, B) -> Tensor | None:
        """R of the adjoint of layer ``i``'s input from that of its output (``r_dz``), and
        the layer's rows of ``H V`` into ``hv``."""
        name, m = self.layers[i]
        a, z = self.acts[i], self.acts[i + 1]
        dz = self.deltas[i + 1]
        first = self.fixed[i]
        if isinstance(m, nn.Linear):
            V = vectors[f"{name}.weight"]
            o, n_in = V.shape[1:]
            h = (r_dz.reshape(B, c * o).T @ a).view(c, o, n_in)
            if ra is not None:
                h.add_((dz.T @ ra.reshape(B, c * n_in)).view(o, c, n_in).transpose(0, 1))
            hv[f"{name}.weight"] = h
            if m.bias is not None:
                hv[f"{name}.bias"] = r_dz.sum(0)
            if first:
                return None
            W = self._weight(name, "weight")
            out = r_dz @ W
            return out.add_((dz @ V.transpose(0, 1).reshape(o, c * n_in)).view(B, c, n_in))
        if isinstance(m, nn.Conv2d):
            V = vectors[f"{name}.weight"]
            co, ci = V.shape[1:3]
            k = V.shape[3:]
            geometry = (m.stride, m.padding, m.dilation)
            cols = self._patches(i)  # [B, K', L]
            flat = r_dz.reshape(B, c * co, -1)
            if cols.shape[1] <= cols.shape[2]:  # per example [K', c co]: no larger than r_dz
                h = torch.bmm(cols, flat.transpose(1, 2)).sum(0)
            else:  # r_dz as [c co, B L]: a copy
                h = torch.mm(self._patch_rows(i), flat.transpose(0, 1).reshape(c * co, -1).T)
            h = h.T.reshape(c, co, -1)
            if ra is not None:
                inner = conv2d_weight(
                    ra.reshape(B, c * ci, *a.shape[2:]), (co, c * ci, *k), dz, *geometry
                )
                h[..., : ci * k[0] * k[1]].add_(inner.view(co, c, -1).transpose(0, 1))
            self._rows_of(i, h, hv)
            if first:
                return None
            W = self._weight(name, "weight")
            through = conv2d_input(
                (B * c, *a.shape[1:]), W, r_dz.reshape(B * c, *z.shape[1:]), *geometry
            ).view(B, c, *a.shape[1:])
            swapped = V.transpose(0, 1).reshape(co, c * ci, *k)
            tangent = conv2d_input((B, c * ci, *a.shape[2:]), swapped, dz, *geometry)
            return through.add_(tangent.view(B, c, *a.shape[1:]))
        if r_dz is None:
            return None
        if type(m) in _ACTIVATIONS:
            # in place: r_dz is the later layer's fresh output, read by nothing else
            slope, bend = self.slopes[i], self.bends[i]
            out = r_dz if slope is None else r_dz.mul_(slope)
            return out if bend is None or ra is None else out.addcmul_(bend, ra)
        if isinstance(m, nn.AvgPool2d):
            up = _unpool(
                r_dz.reshape(B * c, *z.shape[1:]), _pair(m.kernel_size), (B * c, *a.shape[1:])
            )
            return up.view(B, c, *a.shape[1:])
        return r_dz.reshape(B, c, *a.shape[1:])


def _pool(x: Tensor, k: tuple[int, int]) -> Tensor:
    """AvgPool2d with kernel = stride ``k``, no padding (2x2 as sums of neighbours: several
    times faster than torch's CPU kernel on small maps)."""
    n, ch, h, w = x.shape
    if k != (2, 2) or h % 2 or w % 2:
        return F.avg_pool2d(x, k, k)
    pairs = x.view(n, ch, h, w // 2, 2)
    rows = (pairs[..., 0] + pairs[..., 1]).view(n, ch, h // 2, 2, w // 2)
    return (rows[:, :, :, 0] + rows[:, :, :, 1]) * 0.25


def _unpool(g: Tensor, k: tuple[int, int], shape: Sequence[int]) -> Tensor:
    """The adjoint of :func:`_pool` onto an input of ``shape``."""
    n, ch, h, w = shape
    if k != (2, 2) or h % 2 or w % 2:
        empty = g.new_empty(shape)
        return torch.ops.aten.avg_pool2d_backward(g, empty, k, k, (0, 0), False, True, None)
    # each output position reads its 2x2 block's value: one gather (faster than stacking)
    index = torch.arange((h // 2) * (w // 2), device=g.device).view(h // 2, 1, w // 2, 1)
    index = index.expand(h // 2, 2, w // 2, 2).reshape(-1)
    return (g.reshape(n * ch, -1) * 0.25).index_select(1, index).view(n, ch, h, w)
