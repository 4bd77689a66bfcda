"""damped_inverse and eigen_decompose: accuracy, per-factor status, failure isolation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_orthogonal, random_spd, rel_err, replace, requires_cuda, symmetric

import kfac_ext.reference as reference
from kfac_ext import Status, ops

OPS = ("damped_inverse", "eigen_decompose")

SIZES = [1, 3, 17, 64, 65, 200, 3, 17, 3]  # repeats: same-size factors are batched together
DTYPES = [torch.float32, torch.float64]
# Inverse results lose about cond(F) * eps: looser than a plain GEMM (eigen: check_eigen).
SOLVE_TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def eye_like(f: torch.Tensor) -> torch.Tensor:
    return torch.eye(f.shape[0], dtype=torch.float64, device=f.device)


def damped(f: torch.Tensor, gamma: float) -> torch.Tensor:
    return f.double() + gamma * eye_like(f)


def status_list(status: torch.Tensor, device) -> list[Status]:
    assert status.dtype == torch.int32 and status.device.type == torch.device(device).type
    return [Status(s) for s in status.tolist()]


# ---- damped_inverse ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_inverse_is_inverse(device, dtype):
    factors = [random_spd(n, dtype, device) for n in SIZES]
    damping = [10 ** -(1 + i % 4) for i in range(len(SIZES))]  # per factor, 1e-1 .. 1e-4
    inverses, status = ops.damped_inverse(factors, damping)
    assert status_list(status, device) == [Status.OK] * len(factors)
    for f, inv, gamma in zip(factors, inverses, damping):
        assert inv.dtype == dtype and inv.shape == f.shape and inv.device == f.device
        assert torch.equal(inv, inv.T)
        assert rel_err(inv.double() @ damped(f, gamma), eye_like(f)) < SOLVE_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_inverse_matches_reference(device, dtype):
    factors = [random_spd(n, dtype, device) for n in SIZES]
    damping = [0.01 * (i + 1) for i in range(len(SIZES))]
    inverses, status = ops.damped_inverse(factors, damping)
    ref_inverses, ref_status = reference.damped_inverse(factors, damping)
    assert torch.equal(status, ref_status)
    for inv, ref in zip(inverses, ref_inverses):
        assert rel_err(inv, ref) < SOLVE_TOL[dtype]


def test_inverse_of_asymmetric_factor_uses_symmetrized_factor(device):
    f = random_spd(17, torch.float64, device)
    skew = torch.randn_like(f) * 0.01
    (inv,), _ = ops.damped_inverse([f + skew - skew.T], 0.1)
    assert rel_err(inv.double() @ damped(f, 0.1), eye_like(f)) < SOLVE_TOL[torch.float64]


def non_pd(kind: str, n: int, dtype, device) -> tuple[torch.Tensor, float]:
    """A factor (and damping) whose Cholesky fails even in float64."""
    if kind == "negative identity":
        f, gamma = -torch.eye(n, dtype=torch.float64), 0.0
    elif kind == "indefinite":
        q = random_orthogonal(n)
        lam = torch.rand(n, dtype=torch.float64) + 0.5
        lam[n // 2] = -1.0
        f, gamma = (q * lam) @ q.T, 0.1
    elif kind == "zero, undamped":
        f, gamma = torch.zeros(n, n, dtype=torch.float64), 0.0
    elif kind == "rank-deficient PSD, undamped":
        lam = torch.rand(n, dtype=torch.float64) + 0.5
        lam[n // 2] = 0.0
        f, gamma = torch.diag(lam), 0.0
    f = symmetric(f.to(device=device, dtype=dtype))
    _, info = torch.linalg.cholesky_ex(damped(f, gamma))
    assert info.item() > 0, "precondition: the float64 Cholesky of this factor fails"
    return f.contiguous(), gamma


NON_PD = ["negative identity", "indefinite", "zero, undamped", "rank-deficient PSD, undamped"]


@pytest.mark.parametrize("kind", NON_PD)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inverse_failure_is_isolated(device, kind, dtype):
    bad, bad_gamma = non_pd(kind, 5, dtype, device)
    good = [random_spd(5, dtype, device), random_spd(5, dtype, device), random_spd(9, dtype, device)]
    factors, damping = [good[0], bad, good[1], good[2]], [0.1, bad_gamma, 0.1, 0.1]
    inverses, status = ops.damped_inverse(factors, damping)
    assert status_list(status, device) == [Status.OK, Status.FAILED, Status.OK, Status.OK]
    assert inverses[1].dtype == dtype and torch.equal(inverses[1], torch.zeros_like(bad))
    for i in (0, 2, 3):
        assert rel_err(inverses[i].double() @ damped(factors[i], 0.1), eye_like(factors[i])) < SOLVE_TOL[dtype]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_inverse_non_finite_input(device, value, dtype):
    factors = [random_spd(n, dtype, device) for n in (4, 4, 7)]
    factors[1][2, 0] = value
    inverses, status = ops.damped_inverse(factors, 0.1)
    assert status_list(status, device) == [Status.OK, Status.NON_FINITE_INPUT, Status.OK]
    assert torch.equal(inverses[1], torch.zeros_like(factors[1]))
    for i in (0, 2):
        assert rel_err(inverses[i].double() @ damped(factors[i], 0.1), eye_like(factors[i])) < SOLVE_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_inverse_more_small_factors_than_one_launch_table(device, dtype):
    """170 factors of sides 1..64 (CUDA: the one-block-per-matrix Cholesky kernel, whose launch
    table holds 80, so three launches), with a non-finite and a non-PD factor in later chunks:
    every status and inverse must land at its own index."""
    sides = [1 + (7 * i) % 64 for i in range(170)]
    factors = [random_spd(n, dtype, device) for n in sides]
    factors[95][0, 0] = math.nan
    factors[161] = -torch.eye(sides[161], dtype=dtype, device=device)
    inverses, status = ops.damped_inverse(factors, 1e-2)
    want = [Status.OK] * 170
    want[95], want[161] = Status.NON_FINITE_INPUT, Status.FAILED
    assert status_list(status, device) == want
    for i, (f, inv) in enumerate(zip(factors, inverses)):
        if want[i] == Status.OK:
            assert rel_err(inv.double() @ damped(f, 1e-2), eye_like(f)) < SOLVE_TOL[dtype]
        else:
            assert torch.equal(inv, torch.zeros_like(f))


def rounding_failure(pivot: str, n: int, device) -> torch.Tensor:
    """An ``n x n`` float32 SPD factor, ``[[a, b], [b, c]]`` then the identity (exactly,
    ``a c - b^2 > 0``), whose float32 Cholesky fails on rounding alone (its second pivot computes
    as negative, or as exactly zero) while the float64 one succeeds.

    Such a failure is always at the level of float32 rounding, so it depends on the exact
    arithmetic of the solver: the candidates are checked with ``torch.linalg.cholesky_ex`` on this
    device and at this size, i.e. the ATen path the op takes for a lone factor of that size.
    """
    for a in range(2, 40):
        for b in range(1, 4):
            c = torch.tensor(b * b / a, dtype=torch.float32)
            for _ in range(8):
                c = torch.nextafter(c, torch.tensor(math.inf))
                if a * c.double().item() - b * b <= 0:
                    continue
                f = torch.eye(n, dtype=torch.float32, device=device)
                f[:2, :2] = torch.tensor([[a, b], [b, c.item()]])
                chol32, info32 = torch.linalg.cholesky_ex(f[None])
                _, info64 = torch.linalg.cholesky_ex(f.double()[None])
                second = chol32[0, 1, 1].item()
                if info32.item() > 0 and info64.item() == 0 and (second < 0 if pivot == "negative" else second == 0):
                    return f
    pytest.skip(f"no {n}x{n} float32 factor with a {pivot} rounded pivot found on {device}")


def overflow_failure(n: int, device) -> tuple[torch.Tensor, float]:
    """A float32 diagonal factor whose damped diagonal overflows float32 (but not float64)."""
    f = torch.diag(torch.rand(n, dtype=torch.float64) + 1.0)
    f[0, 0] = 1.7e38
    return f.to(device=device, dtype=torch.float32), 2e38


RETRY = {
    "negative rounded pivot": lambda device: (rounding_failure("negative", 65, device), 0.0),
    "zero rounded pivot": lambda device: (rounding_failure("zero", 65, device), 0.0),
    "damped 1x1 overflows": lambda device: overflow_failure(1, device),
    "damped 3x3 overflows": lambda device: overflow_failure(3, device),
}


@pytest.mark.parametrize("make", RETRY.values(), ids=RETRY.keys())
def test_inverse_float64_retry(device, make):
    hard, gamma = make(device)
    factors = [random_spd(5, device=device), hard, random_spd(5, device=device)]
    inverses, status = ops.damped_inverse(factors, [0.1, gamma, 0.1])
    assert status_list(status, device) == [Status.OK, Status.OK_AFTER_FP64_RETRY, Status.OK]
    assert inverses[1].dtype == torch.float32 and torch.equal(inverses[1], inverses[1].T)
    # Ill-conditioned (or subnormal) results: compare to the float64 inverse, not F @ F^-1 = I.
    assert rel_err(inverses[1], torch.linalg.inv(damped(hard, gamma))) < 1e-5


# ---- eigen_decompose -----------------------------------------------------------------------------


def check_eigen(f, values, vectors):
    """Q diag(λ) Qᵀ == F₊ (the symmetrized F with negative eigenvalues clamped), Q orthogonal,
    λ ascending, >= 0 and equal to the float64 eigenvalues clamped at 0.

    A backward-stable symmetric eigensolver (LAPACK, cuSOLVER's syevd and batched Jacobi) errs
    by O(n eps) relative to ‖F‖ in all three, whatever the conditioning: 8 n eps, and never
    less than SOLVE_TOL (seen on an H200, cuSOLVER's float32 syevd: 1.1 n eps at n = 200 here,
    4.7 n eps at n = 130 in bench/cuda_smoke.py)."""
    n = f.shape[0]
    tol = max(SOLVE_TOL[f.dtype], 8 * n * torch.finfo(f.dtype).eps)
    assert values.shape == (n,) and vectors.shape == (n, n)
    assert values.dtype == vectors.dtype == f.dtype
    sym = (f.double() + f.double().T) / 2
    exact = torch.linalg.eigvalsh(sym).clamp_min(0)
    assert (values >= 0).all() and (values[1:] >= values[:-1]).all()
    assert rel_err(values, exact) < tol
    q, lam = vectors.double(), values.double()
    assert rel_err(q.T @ q, eye_like(f)) < tol
    exact_q = torch.linalg.eigh(sym).eigenvectors
    assert rel_err((q * lam) @ q.T, (exact_q * exact) @ exact_q.T) < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigen_decomposition(device, dtype):
    factors = [random_spd(n, dtype, device) for n in SIZES]
    values, vectors, status = ops.eigen_decompose(factors)
    assert status_list(status, device) == [Status.OK] * len(factors)
    for f, lam, q in zip(factors, values, vectors):
        assert lam.device == f.device and q.device == f.device
        check_eigen(f, lam, q)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigen_clamps_negative_eigenvalues(device, dtype):
    n = 9
    q = random_orthogonal(n)
    signs = torch.tensor([-1.0] * 3 + [1.0] * (n - 3), dtype=torch.float64)
    lam = signs * (torch.rand(n, dtype=torch.float64) + 0.5)  # indefinite, |λ| >= 0.5
    f = ((q * lam) @ q.T).to(device=device, dtype=dtype)
    f = f + torch.randn_like(f) * 1e-3  # not symmetric: the op symmetrizes
    values, vectors, status = ops.eigen_decompose([f.contiguous()])
    assert status_list(status, device) == [Status.OK]
    assert (values[0][:3] == 0).all() and (values[0][3:] > 0).all()
    check_eigen(f, values[0], vectors[0])


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_eigen_non_finite_input(device, value, dtype):
    factors = [random_spd(n, dtype, device) for n in (6, 6, 3)]
    factors[1][0, 5] = value
    values, vectors, status = ops.eigen_decompose(factors)
    assert status_list(status, device) == [Status.OK, Status.NON_FINITE_INPUT, Status.OK]
    assert torch.equal(values[1], torch.zeros(6, dtype=dtype, device=device))
    assert torch.equal(vectors[1], torch.zeros_like(factors[1]))
    for i in (0, 2):
        check_eigen(factors[i], values[i], vectors[i])


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigen_matches_reference(device, dtype):
    factors = [random_spd(n, dtype, device) for n in SIZES]
    values, vectors, status = ops.eigen_decompose(factors)
    ref_values, ref_vectors, ref_status = reference.eigen_decompose(factors)
    assert torch.equal(status, ref_status)
    for lam, q, ref_lam, ref_q in zip(values, vectors, ref_values, ref_vectors):
        assert rel_err(lam, ref_lam) < SOLVE_TOL[dtype]
        # eigenvectors are defined up to sign: compare the reconstructions
        assert rel_err((q * lam) @ q.T, (ref_q * ref_lam) @ ref_q.T) < SOLVE_TOL[dtype]


# ---- outputs are plain tensors, as the preconditioners and the fakes expect ---------------------


def all_outputs(device):
    factors = [random_spd(n, device=device) for n in (3, 5, 3)]
    inverses, _ = ops.damped_inverse(factors, 0.1)
    values, vectors, _ = ops.eigen_decompose(factors)
    return {"inverses": inverses, "eigenvalues": values, "eigenvectors": vectors}


@pytest.mark.parametrize("name", ["inverses", "eigenvalues", "eigenvectors"])
def test_outputs_are_contiguous(device, name):
    outs = all_outputs(device)[name]
    assert all(t.is_contiguous() for t in outs), [t.stride() for t in outs]


@pytest.mark.parametrize("name", ["inverses", "eigenvalues", "eigenvectors"])
def test_outputs_do_not_share_storage(device, name):
    """Same-size factors are solved as one batch; each result must still be its own tensor."""
    outs = all_outputs(device)[name]
    assert len({t.untyped_storage().data_ptr() for t in outs}) == len(outs)


@pytest.mark.parametrize("op", OPS)
def test_opcheck(device, op):
    factors = [random_spd(n, device=device) for n in (3, 5, 3)]
    args = (factors, [0.1, 0.2, 0.3]) if op == "damped_inverse" else (factors,)
    torch.library.opcheck(getattr(torch.ops.kfac_ext, op), args)


# ---- bad inputs: each names the op and the argument -------------------------------------------


def call(op: str, args: dict):
    if op == "damped_inverse":
        return ops.damped_inverse(**args)
    return ops.eigen_decompose(args["factors"])


BAD = {
    "1-D": ("factors", 1, lambda f: f[0], RuntimeError, r"{op}: factors\[1\] must be 2-D"),
    "3-D": ("factors", 0, lambda f: f[None], RuntimeError, r"{op}: factors\[0\] must be 2-D"),
    "non-square": ("factors", 1, lambda f: f[:2].contiguous(), RuntimeError,
                   r"{op}: factors\[1\] must be square, got shape \[2, 3\]"),
    "int": ("factors", 1, lambda f: f.to(torch.int32), RuntimeError,
            r"{op}: factors\[1\] must be float32 or float64, got Int"),
    "bf16": ("factors", 0, lambda f: f.to(torch.bfloat16), RuntimeError,
             r"{op}: factors\[0\] must be float32 or float64, got BFloat16"),
    "mixed dtypes": ("factors", 1, lambda f: f.double(), RuntimeError,
                     r"{op}: factors\[1\] has dtype Double but factors\[0\] has Float"),
    "transposed": ("factors", 1, lambda f: torch.randn_like(f).T, RuntimeError,
                   r"{op}: factors\[1\] must be contiguous"),
}
BAD_DAMPING = {
    "negative": ("damping", 1, lambda _: -1.0, RuntimeError,
                 r"damped_inverse: damping\[1\] must be finite and >= 0, got -1"),
    "nan": ("damping", 0, lambda _: math.nan, RuntimeError,
            r"damped_inverse: damping\[0\] must be finite and >= 0, got nan"),
    "inf": ("damping", 1, lambda _: math.inf, RuntimeError,
            r"damped_inverse: damping\[1\] must be finite and >= 0, got inf"),
    "too many": ("damping", None, lambda d: d + [0.1], ValueError,
                 r"damping has 3 entries but there are 2 layers"),
}


def good_args(device):
    return dict(factors=[random_spd(3, device=device), random_spd(3, device=device)], damping=[0.1, 0.2])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_factors(device, op, case):
    field, index, make, error, match = case
    with pytest.raises(error, match=match.format(op=op)):
        call(op, replace(good_args(device), field, index, make))


@pytest.mark.parametrize("case", BAD_DAMPING.values(), ids=BAD_DAMPING.keys())
def test_bad_damping(device, case):
    field, index, make, error, match = case
    with pytest.raises(error, match=match):
        call("damped_inverse", replace(good_args(device), field, index, make))


@pytest.mark.parametrize("op", OPS)
def test_empty_lists(op):
    with pytest.raises(ValueError, match=rf"{op}: factors must hold at least one tensor"):
        call(op, dict(factors=[], damping=[]))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS)
def test_mixed_devices(op):
    args = replace(good_args("cpu"), "factors", 1, lambda f: f.cuda())
    with pytest.raises(RuntimeError, match=rf"{op}: factors\[1\] is on cuda"):
        call(op, args)
