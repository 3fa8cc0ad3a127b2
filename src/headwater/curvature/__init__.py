"""Inverse-curvature approximations behind one interface (see ``base.Curvature``)."""

from headwater.curvature.arnoldi import Arnoldi
from headwater.curvature.base import Curvature
from headwater.curvature.cg import CG
from headwater.curvature.diagonal import Diagonal
from headwater.curvature.exact import Exact
from headwater.curvature.identity import Identity
from headwater.curvature.kfac import EKFAC, KFAC
from headwater.curvature.lanczos import Lanczos
from headwater.curvature.lissa import LiSSA
from headwater.curvature.mfac import MFAC
from headwater.curvature.nystrom import Nystrom
from headwater.curvature.operators import MatrixKind, curvature_matvec, dense_curvature

__all__ = [
    "CG",
    "CURVATURES",
    "EKFAC",
    "KFAC",
    "MFAC",
    "Arnoldi",
    "Curvature",
    "Diagonal",
    "Exact",
    "Identity",
    "Lanczos",
    "LiSSA",
    "MatrixKind",
    "Nystrom",
    "curvature_matvec",
    "dense_curvature",
]

CURVATURES: dict[str, type[Curvature]] = {
    "exact": Exact,
    "cg": CG,
    "lissa": LiSSA,
    "arnoldi": Arnoldi,
    "lanczos": Lanczos,
    "nystrom": Nystrom,
    "kfac": KFAC,
    "ekfac": EKFAC,
    "mfac": MFAC,
    "diagonal": Diagonal,
    "identity": Identity,
}
"""Name -> class, for ``headwater.influence(curvature=...)``."""
