"""How many queries a reverse step of :class:`~headwater.methods.metagradient.Metagradient`
carries at once: the time per query falls with the chunk, the temporaries grow with it."""

from __future__ import annotations

__all__ = [
    "CHUNK",
    "LAYER_FORWARD",
    "LIMIT",
    "PER_FORWARD",
    "PER_PARAM",
    "TEMPORARIES",
    "even",
    "rows",
]

CHUNK = 35
"""Most queries per chunk of a reverse step. A call of the vmapped pullback costs about
1 ms plus 0.1 ms per query (digits MLP, one thread) and holds temporaries in proportion
to its queries (the pullback's ``[c, B, width]`` tensors, the chunk's ``[c, P]``
products, the allocator's slack from them): 200 queries in chunks of 34 / 40 / 50 took
57.6 / 55.9 / 54.3 training runs (SGD) with a peak RSS of 3.6 / 3.8 / 4.3x
``(1 + state + 200)·P`` floats; with Adam's third adjoint 4.7x at 34 and 4.9x at 40."""

PER_FORWARD, PER_PARAM = 3, 4
"""A query's temporaries in the pullback: about ``3 A + 4 P`` floats, ``A`` the floats one
forward pass over the batch creates (fitted to the peak RSS of 200 queries on the digits
MLP, ``A`` = 17k, P = 9k, and the LeNet-style CNN, ``A`` = 100k, P = 3.7k)."""

TEMPORARIES = 4
"""The generic pullback's chunk holds its temporaries to this many times the queries'
adjoints of θ (``Q·P`` floats; the optimizer state's adjoints add 1-2 more), so memory
stays ``O(Q·P)`` whatever the activations: the LeNet-style CNN, whose batch activations
are 27x P, ran chunks of 9 there (35 were 16-20x ``(1 + state + Q)·P`` floats). A call of
the autograd pullback costs about 3.8 ms plus 0.75 ms per query on that CNN (quiet, one
thread): 1.1 ms per query in chunks of 8, 1.0 in chunks of 35, whose 3.6 MB temporaries
are fresh pages at every call (3,550 minor faults; 0.75 without them, glibc's thresholds
raised). Its live temporaries are about one forward pass's tensors per query (0.36 MB,
mallinfo); the peak RSS holds 1.6-1.9x the live peak (glibc's free lists). The layer
pass has its own rule (:data:`LAYER_FORWARD`, :data:`LIMIT`)."""


LAYER_FORWARD = 0.8
"""The layer pass's (:mod:`~headwater.methods.metagradient_layers`) temporaries per query:
about ``0.8 A + 4 P`` floats (:data:`PER_PARAM`). Its own live tensors are 0.45 ``A`` per
query on the LeNet-style CNN (its head takes no per-query maps); the peak RSS of 200
queries there, from chunks of 9 to 20, rose by 0.25 MiB per query with SGD and momentum
and 0.36 MiB with Adam (``A`` = 100k, P = 3.7k: 0.8 ``A`` + 4 P is 0.36 MiB). On the
digits MLP (``A`` = 17k, P = 9k) it rose by 0.08-0.13 MiB per query."""

LIMIT = 4.5
"""The layer pass's chunks keep the adjoints (``(1 + s)·Q·P`` floats) and a chunk's
temporaries within this many times ``Q·P``: the metagradient's peak stays near 4.5x the
model, its optimizer state and the queries' adjoints of θ (its goal: 5x), so Adam, with
a third adjoint, gets smaller chunks than SGD. (The generic pullback keeps
:data:`TEMPORARIES`: fitted to its measured recipes, whose train-mode runs reach about
6x.)"""


def even(n_query: int, most: int = CHUNK) -> int:
    """Rows per chunk: at most ``most``, the chunks of ``n_query`` as even as possible."""
    pieces = max(1, -(-n_query // max(1, most)))
    return max(1, -(-n_query // pieces))


def rows(
    n_query: int, forward_floats: float, num_params: int, layers_with: int | None = None
) -> int:
    """Queries per chunk of a reverse step: at most :data:`CHUNK`. The generic pullback's
    temporaries (about ``3 A + 4 P`` floats each, ``A = forward_floats`` of one forward
    pass over a batch) within :data:`TEMPORARIES` times the queries' adjoints of θ
    (``n_query · P``); with ``layers_with`` (the layer pass, carrying that many adjoints
    per query) theirs (:data:`LAYER_FORWARD`) and the adjoints within :data:`LIMIT` times
    ``n_query · P``."""
    if layers_with is None:
        per_query, room = PER_FORWARD * forward_floats + PER_PARAM * num_params, TEMPORARIES
    else:
        per_query = LAYER_FORWARD * forward_floats + PER_PARAM * num_params
        room = max(LIMIT - layers_with, 0.0)
    return even(n_query, min(CHUNK, int(room * n_query * num_params / per_query)))
