"""Shared fixtures for the op tests: devices, per-test seeding, random inputs, error metric.

Every test that takes the ``device`` fixture runs once per device: on ``cpu`` always, and on
``cuda`` (marked ``cuda``) when a GPU is present and the extension was built with its CUDA
kernels; otherwise the ``cuda`` case is skipped with the reason. A family file names its ops in
a module-level ``OPS`` tuple, and a device whose dispatcher has no kernel for one of them skips.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import kfac_ext

# float32 GEMMs at full precision: the tolerances derive from float32's eps, which TF32 (10-bit
# mantissa) or bf16 GEMMs would exceed. kfac_ext's GEMMs follow these torch settings.
torch.set_float32_matmul_precision("highest")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

CUDA_AVAILABLE = torch.cuda.is_available()
BUILT_WITH_CUDA = bool(kfac_ext.build_info()["built_with_cuda"])
HAS_CUDA = CUDA_AVAILABLE and BUILT_WITH_CUDA

if not CUDA_AVAILABLE:
    _NO_CUDA_REASON = "no CUDA device"
elif not BUILT_WITH_CUDA:
    _NO_CUDA_REASON = "kfac_ext was built without CUDA kernels"
else:
    _NO_CUDA_REASON = ""

#: Parametrization values for the ``device`` fixture (usable directly with ``parametrize``).
devices = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=_NO_CUDA_REASON)],
    ),
]

#: For tests that need two devices (mixed-device argument checks).
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=_NO_CUDA_REASON or "needs CUDA")

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


@pytest.fixture(params=devices)
def device(request) -> str:
    """Runs the test once per device; skips where this device has no kernel for the file's OPS."""
    name = request.param
    for op in getattr(request.module, "OPS", ()):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"kfac_ext::{op}", _DISPATCH_KEY[name]
        ):
            pytest.skip(f"kfac_ext::{op} has no {_DISPATCH_KEY[name]} kernel in this build")
    return name


def pytest_make_parametrize_id(config, val, argname):
    """Readable test ids for dtypes: ``float32`` rather than ``dtype0``."""
    if isinstance(val, torch.dtype):
        return str(val).removeprefix("torch.")
    return None


@pytest.fixture(autouse=True)
def _seed(request) -> None:
    """A fixed seed per test (from its id): reproducible, yet different inputs in every test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


#: Relative (Frobenius) error allowed for results computed in a given dtype.
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` (Frobenius), computed in float64 on the CPU."""
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    return (torch.linalg.norm(out - ref) / torch.linalg.norm(ref)).item()


def symmetric(m: torch.Tensor) -> torch.Tensor:
    """``m`` with its strict lower triangle replaced by the upper one: exactly symmetric."""
    return torch.triu(m) + torch.triu(m, 1).mT


def random_spd(n: int, dtype=torch.float32, device="cpu", shift: float = 0.1) -> torch.Tensor:
    """A random exactly-symmetric positive definite ``n x n`` factor: a Wishart-like Gram matrix
    of ``2n + 1`` Gaussian rows (eigenvalues in about [0.1, 3]) plus ``shift * I``.
    """
    x = torch.randn(2 * n + 1, n, dtype=torch.float64)
    f = x.T @ x / x.shape[0] + shift * torch.eye(n, dtype=torch.float64)
    return symmetric(f).to(device=device, dtype=dtype).contiguous()


def random_orthogonal(n: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q.to(device=device, dtype=dtype).contiguous()


def replace(args: dict, field: str, index: int | None, make) -> dict:
    """A copy of the keyword arguments ``args`` with ``args[field][index]`` (or ``args[field]``
    when ``index`` is None) replaced by ``make(old)``: one bad argument per bad-input test case.
    """
    args = {k: list(v) if isinstance(v, list) else v for k, v in args.items()}
    if index is None:
        args[field] = make(args[field])
    else:
        args[field][index] = make(args[field][index])
    return args
