"""Shared fixtures for the op tests: devices, per-test seeding, random inputs, error metric.

Every test that takes the ``device`` fixture runs once per device: on ``cpu`` always, and on
``cuda`` (marked ``cuda``) when a GPU is present and the extension was built with its CUDA
kernels; otherwise the ``cuda`` case is skipped with the reason. A family file names its ops in
a module-level ``OPS`` tuple, and a device whose dispatcher has no kernel for one of them skips.
"""

from __future__ import annotations

import contextlib
import math
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


@contextlib.contextmanager
def cpu_generators():
    """While constructing a preconditioner for a model on the meta device: torch has no meta
    generator, so ``torch.Generator(device=...)`` makes a CPU one (it only draws Monte Carlo
    targets, which no step on meta does)."""
    real = torch.Generator
    torch.Generator = lambda device=None: real()
    try:
        yield
    finally:
        torch.Generator = real


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


# ---- K-FAC in float64, computed without kfac_ext ------------------------------------------------


def _dense(factor: torch.Tensor) -> torch.Tensor:
    """A factor as a dense float64 CPU matrix (an embedding's diagonal A is kept as a vector)."""
    factor = factor.detach().to("cpu", torch.float64)
    return torch.diag(factor) if factor.dim() == 1 else factor


def pi_correction(a: torch.Tensor, g: torch.Tensor) -> float:
    """π of factored damping (Martens & Grosse 2015 §6.3): ``π² = (tr A / dim A) / (tr G / dim G)``
    (1 where a trace is not positive)."""
    a, g = _dense(a), _dense(g)
    ta, tg = float(a.trace()) / len(a), float(g.trace()) / len(g)
    return math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0


def factor_damping(a: torch.Tensor, g: torch.Tensor, damping_mode: str, gamma: float) -> tuple[float, float]:
    """``(d_A, d_G)`` added to A and G: ``√γ`` each ("tikhonov"), ``π√γ`` and ``√γ/π`` ("pi")."""
    pi = pi_correction(a, g) if damping_mode == "pi" else 1.0
    return pi * math.sqrt(gamma), math.sqrt(gamma) / pi


def damped_condition(a: torch.Tensor, g: torch.Tensor, damping_mode: str, gamma: float) -> float:
    """Condition number of one block's damped curvature as K-FAC inverts it, from the float64
    eigenvalues of its factors: ``(A + d_A I) ⊗ (G + d_G I)`` (see factor_damping), or
    ``λ_G λ_Aᵀ + γ`` for exact eigen damping."""
    la = torch.linalg.eigvalsh(_dense(a)).clamp_min(0)
    lg = torch.linalg.eigvalsh(_dense(g)).clamp_min(0)
    if damping_mode == "eigen":
        return float((la[-1] * lg[-1] + gamma) / (la[0] * lg[0] + gamma))
    da, dg = factor_damping(a, g, damping_mode, gamma)
    return float((la[-1] + da) / (la[0] + da) * (lg[-1] + dg) / (lg[0] + dg))


def side_conditions(a: torch.Tensor, g: torch.Tensor, damping_mode: str, gamma: float) -> tuple[float, float]:
    """``(κ(A + d_A I), κ(G + d_G I))`` for factored damping; for exact eigen damping both are the
    condition number of ``λ_G λ_Aᵀ + γ``."""
    if damping_mode == "eigen":
        kappa = damped_condition(a, g, damping_mode, gamma)
        return kappa, kappa
    da, dg = factor_damping(a, g, damping_mode, gamma)
    la = torch.linalg.eigvalsh(_dense(a)).clamp_min(0)
    lg = torch.linalg.eigvalsh(_dense(g)).clamp_min(0)
    return float((la[-1] + da) / (la[0] + da)), float((lg[-1] + dg) / (lg[0] + dg))


def kfac_direction(a: torch.Tensor, g: torch.Tensor, grad: torch.Tensor, damping_mode: str, gamma: float) -> torch.Tensor:
    """``(G ⊗ A + damping)⁻¹ vec(∇W̄)`` (row-major ``vec``) in float64 on the CPU, from the factors
    alone: factored damping ("tikhonov", "pi") as two dense solves
    ``(G + d_G I)⁻¹ ∇W̄ (A + d_A I)⁻¹``; exact eigen damping by the dense Kronecker matrix
    ``G ⊗ A + γ I`` (small blocks only). A diagonal A (a vector) counts as ``diag(a)``."""
    a, g = _dense(a), _dense(g)
    grad = grad.detach().to("cpu", torch.float64)
    if damping_mode == "eigen":
        k = torch.kron(g, a) + gamma * torch.eye(len(a) * len(g), dtype=torch.float64)
        return torch.linalg.solve(k, grad.reshape(-1)).reshape(grad.shape)
    da, dg = factor_damping(a, g, damping_mode, gamma)
    left = torch.linalg.solve(g + dg * torch.eye(len(g), dtype=torch.float64), grad)
    return torch.linalg.solve(a + da * torch.eye(len(a), dtype=torch.float64), left.T).T


def kl_clip_scale(directions: list[torch.Tensor], grads: list[torch.Tensor], kl_clip: float | None, lr: float) -> float:
    """``ν = min(1, sqrt(kl_clip / (lr² Σ ⟨v, ∇⟩)))`` over all blocks (1 without clipping)."""
    if kl_clip is None:
        return 1.0
    vg = sum(float((v.double().cpu() * g.double().cpu()).sum()) for v, g in zip(directions, grads))
    return min(1.0, math.sqrt(kl_clip / (lr**2 * abs(vg)))) if vg != 0 else 1.0


def assert_kfac_step(precond, factors: dict, *, damping_mode: str = "tikhonov", gamma: float = 1e-3,
                     lr: float | None = None, kl_clip: float | None = None, eps: float | None = None) -> None:
    """Every block's ``.grad`` after ``precond.step()`` is the K-FAC step: ``ν (G ⊗ A + damping)⁻¹
    ∇W̄``, recomputed in float64 (kfac_direction, kl_clip_scale) from ``factors`` (``{block name:
    (A, G)}`` as they were at the last inversion) and ``precond.last_raw_gradients``.

    Tolerance per block: ``√n·eps·(κ_A + κ_G)``, ``eps`` of the inverses' dtype (default: that of
    the factors), ``n`` the block's largest factor size, ``κ`` the condition numbers of the damped
    sides (side_conditions): the forward error ``c·eps·κ`` of applying a backward-stable inverse
    (or eigendecomposition) of each side, with ``c = √n`` between the typical 1 and the
    worst-case ``n`` (``n`` would let a float32 ResNet block pass with its raw gradient); the clip
    scale ν inherits the largest of these errors, so that is added to every block's. Measured:
    at most 0.4 of it (float32 factors of the real models, float32 and float64 runs of
    test_native_matches_reference); the raw gradient is 0.3 to 50 away."""
    blocks = [b for b in precond.blocks if b.weight.grad is not None]
    raw = [precond.last_raw_gradients[precond.blocks.index(b)] for b in blocks]
    expected = [kfac_direction(*factors[b.name], r, damping_mode, gamma) for b, r in zip(blocks, raw)]
    nu = kl_clip_scale(expected, raw, kl_clip, lr) if kl_clip is not None else 1.0
    bounds = []
    for b in blocks:
        a, g = factors[b.name]
        e = eps if eps is not None else torch.finfo(a.dtype).eps
        n = max(len(a), len(g))
        bounds.append(math.sqrt(n) * e * sum(side_conditions(a, g, damping_mode, gamma)))
    for b, want, bound in zip(blocks, expected, bounds):
        err = rel_err(b.grad_matrix(), nu * want)
        tol = bound + max(bounds)
        assert err <= tol, f"block {b.name}: .grad is {err:.2e} from the K-FAC step (tolerance {tol:.2e}, ν = {nu:.3g})"
