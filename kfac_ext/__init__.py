"""kfac_ext: K-FAC natural-gradient optimizer for PyTorch with fused native curvature kernels."""

# The native module has no RUNPATH to torch's libraries: torch must be loaded first.
import torch  # noqa: F401

from . import _C, ops  # noqa: F401  (importing _C registers torch.ops.kfac_ext.*)
from .ops import Status

build_info = _C.build_info

__all__ = ["Status", "build_info", "ops"]
