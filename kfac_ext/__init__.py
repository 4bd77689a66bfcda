"""kfac_ext: K-FAC natural-gradient optimizer for PyTorch with fused native curvature kernels.

* :class:`KFACPreconditioner` rewrites ``.grad`` with the K-FAC direction before any optimizer,
  a façade over :mod:`~kfac_ext.capture` (hooks → statistics), :mod:`~kfac_ext.curvature` (the
  factors), :mod:`~kfac_ext.inverse` (inverses, preconditioning, KL clip) and
  :mod:`~kfac_ext.topology` (one process, DDP or FSDP2, chosen once);
* :class:`KFAC` is a ``torch.optim`` optimizer (K-FAC + SGD momentum; adaptive damping in
  :mod:`~kfac_ext.damping`);
* :mod:`kfac_ext.layers` are the layer kinds K-FAC preconditions (a registry);
* :mod:`kfac_ext.ops` are the batched native ops, :mod:`kfac_ext.reference` their pure-PyTorch
  twins, :mod:`kfac_ext.natural` the exact natural-gradient math for small models.
"""

# The native module has no RUNPATH to torch's libraries: torch must be loaded first.
import torch  # noqa: F401

from . import _C, layers, natural, ops  # noqa: F401  (importing _C registers torch.ops.kfac_ext.*)
from .optimizer import KFAC
from .ops import Status
from .preconditioner import KFACPreconditioner

build_info = _C.build_info

__all__ = ["KFAC", "KFACPreconditioner", "Status", "build_info", "layers", "natural", "ops"]
