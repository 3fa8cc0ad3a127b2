"""Inverse-curvature approximations behind one interface (see ``base.Curvature``)."""

from headwater.curvature.base import Curvature
from headwater.curvature.exact import Exact
from headwater.curvature.arnoldi import Arnoldi
from headwater.curvature.cg import CG
from headwater.curvature.diagonal import Diagonal
from headwater.curvature.identity import Identity
from headwater.curvature.lanczos import Lanczos
from headwater.curvature.lissa import LiSSA
from headwater.curvature.nystrom import Nystrom
from headwater.curvature.kfac import EKFAC, KFAC
from headwater.curvature.mfac import MFAC
from headwater.curvature.operators import MatrixKind, curvature_matvec, dense_curvature

__all__ = ["CURVATURES", "Curvature", "Exact", "MatrixKind", "curvature_matvec", "dense_curvature"]

CURVATURES: dict[str, type[Curvature]] = {"exact": Exact}
"""Name -> class, for ``headwater.influence(curvature=...)``; approximations register here."""
CURVATURES.update({"kfac": KFAC, "ekfac": EKFAC, "mfac": MFAC})
__all__ += ["EKFAC", "KFAC", "MFAC"]
CURVATURES.update({"cg": CG, "lissa": LiSSA, "arnoldi": Arnoldi, "lanczos": Lanczos, "nystrom": Nystrom,
                   "diagonal": Diagonal, "identity": Identity})
__all__ += ["Arnoldi", "CG", "Diagonal", "Identity", "LiSSA", "Lanczos", "Nystrom"]
