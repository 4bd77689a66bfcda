"""kron_matmul and the preconditioners, vs dense Kronecker matrices and torch.linalg.solve."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOL, random_orthogonal, random_spd, rel_err, replace, requires_cuda

import kfac_ext.reference as reference
from kfac_ext import Status, ops

OPS = ("kron_matmul", "precondition_eigen", "damped_inverse", "eigen_decompose")

DTYPES = [torch.float32, torch.float64]
MAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (m, p, q, n): lefts [m, p] @ mats [p, q] @ rights[n, q].T -> [m, n]
SHAPES = [(1, 1, 1, 1), (3, 5, 4, 2), (17, 1, 65, 3), (20, 33, 17, 9), (64, 65, 200, 17)]
# (out, in + 1): gradient shapes of a layer with its bias column
LAYERS = [(1, 2), (3, 18), (17, 4), (10, 65), (3, 18)]
SOLVE_TOL = {torch.float32: 5e-5, torch.float64: 1e-11}


def dense_kron_solve(g: torch.Tensor, a: torch.Tensor, grad: torch.Tensor, gamma: float = 0.0):
    """``(G ⊗ A + γI)⁻¹ vec(grad)`` in float64 from the dense Kronecker matrix."""
    k = torch.kron(g.double(), a.double())
    k = k + gamma * torch.eye(k.shape[0], dtype=torch.float64, device=k.device)
    return torch.linalg.solve(k, grad.double().flatten()).reshape(grad.shape)


def tol(*dtypes) -> float:
    return max(TOL[d] for d in dtypes)


# ---- kron_matmul ---------------------------------------------------------------------------------


@pytest.mark.parametrize("m,p,q,n", SHAPES[:4])
def test_kron_matmul_is_dense_kronecker_product(device, m, p, q, n):
    """(L ⊗ R) vec(C) == vec(L C Rᵀ) for row-major vec, with the dense Kronecker matrix."""
    l, c, r = (torch.randn(*s, dtype=torch.float64, device=device) for s in [(m, p), (p, q), (n, q)])
    dense = (torch.kron(l, r) @ c.flatten()).reshape(m, n)
    assert rel_err(l @ c @ r.T, dense) < 1e-12  # the convention itself
    (out,) = ops.kron_matmul([l], [c], [r])
    assert out.shape == (m, n)
    assert rel_err(out, dense) < 1e-12


@pytest.mark.parametrize("m,p,q,n", SHAPES)
@pytest.mark.parametrize("mat_dtype", MAT_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kron_matmul_dtypes(device, m, p, q, n, mat_dtype, dtype):
    l, r = torch.randn(m, p, dtype=dtype, device=device), torch.randn(n, q, dtype=dtype, device=device)
    c = torch.randn(p, q, device=device).to(mat_dtype)
    (out,) = ops.kron_matmul([l], [c], [r])
    assert out.dtype == mat_dtype and out.shape == (m, n) and out.device == c.device
    assert rel_err(out, l.double() @ c.double() @ r.double().T) < tol(dtype, mat_dtype)


@pytest.mark.parametrize("mat_dtype", MAT_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kron_matmul_many_layers_and_reference(device, mat_dtype, dtype):
    lefts = [torch.randn(m, p, dtype=dtype, device=device) for m, p, _, _ in SHAPES]
    mats = [torch.randn(p, q, device=device).to(mat_dtype) for _, p, q, _ in SHAPES]
    rights = [torch.randn(n, q, dtype=dtype, device=device) for _, _, q, n in SHAPES]
    outs = ops.kron_matmul(lefts, mats, rights)
    refs = reference.kron_matmul(lefts, mats, rights)
    for l, c, r, out, ref in zip(lefts, mats, rights, outs, refs):
        assert out.dtype == ref.dtype == mat_dtype
        assert rel_err(out, l.double() @ c.double() @ r.double().T) < tol(dtype, mat_dtype)
        assert rel_err(out, ref) < tol(dtype, mat_dtype)


@pytest.mark.parametrize("mat_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kron_matmul_batched_entries(device, mat_dtype, dtype):
    """An entry may be a batch of same-shape layers ([k, m, p] etc., one batched GEMM), next to
    plain 2-D entries in the same call; each batch element is its own layer."""
    shapes = [(3, 5, 4, 2), (1, 1, 1, 1), (17, 9, 65, 3)]
    batch = [4, 1, 3]
    lefts = [torch.randn(k, m, p, dtype=dtype, device=device) for k, (m, p, _, _) in zip(batch, shapes)]
    mats = [torch.randn(k, p, q, device=device).to(mat_dtype) for k, (_, p, q, _) in zip(batch, shapes)]
    rights = [torch.randn(k, n, q, dtype=dtype, device=device) for k, (_, _, q, n) in zip(batch, shapes)]
    lefts.append(torch.randn(6, 7, dtype=dtype, device=device))
    mats.append(torch.randn(7, 8, device=device).to(mat_dtype))
    rights.append(torch.randn(5, 8, dtype=dtype, device=device))
    outs = ops.kron_matmul(lefts, mats, rights)
    refs = reference.kron_matmul(lefts, mats, rights)
    for l, c, r, out, ref in zip(lefts, mats, rights, outs, refs):
        expected = l.double() @ c.double() @ r.double().mT
        assert out.shape == expected.shape and out.dtype == mat_dtype
        assert rel_err(out, expected) < tol(dtype, mat_dtype)
        assert rel_err(out, ref) < tol(dtype, mat_dtype)
        for k in range(c.dim() == 3 and c.shape[0]):  # each batch element equals its own layer
            (alone,) = ops.kron_matmul([l[k]], [c[k]], [r[k]])
            assert rel_err(out[k], alone) < tol(dtype, mat_dtype)


# ---- preconditioners -----------------------------------------------------------------------------


def random_layers(dtype, device):
    gs = [random_spd(out, dtype, device) for out, _ in LAYERS]
    as_ = [random_spd(inp, dtype, device) for _, inp in LAYERS]
    return gs, as_


@pytest.mark.parametrize("dtype", DTYPES)
def test_precondition_inverse(device, dtype):
    gs, as_ = random_layers(dtype, device)
    grads = [torch.randn(out, inp, dtype=dtype, device=device) for out, inp in LAYERS]
    g_damping = [0.1 * (i + 1) for i in range(len(LAYERS))]
    a_damping = [0.05 / (i + 1) for i in range(len(LAYERS))]
    inverses, status = ops.damped_inverse(gs + as_, g_damping + a_damping)
    assert (status == Status.OK).all()
    g_inv, a_inv = inverses[: len(gs)], inverses[len(gs) :]
    outs = ops.precondition_inverse(g_inv, grads, a_inv)
    refs = reference.precondition_inverse(g_inv, grads, a_inv)
    for g, a, grad, gg, ga, out, ref in zip(gs, as_, grads, g_damping, a_damping, outs, refs):
        eye_g = torch.eye(g.shape[0], dtype=dtype, device=device)
        eye_a = torch.eye(a.shape[0], dtype=dtype, device=device)
        expected = dense_kron_solve(g + gg * eye_g, a + ga * eye_a, grad)
        assert out.dtype == dtype and out.shape == grad.shape
        assert rel_err(out, expected) < SOLVE_TOL[dtype]
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("grad_dtype", MAT_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_precondition_eigen(device, grad_dtype, dtype):
    gs, as_ = random_layers(dtype, device)
    grads = [torch.randn(out, inp, device=device).to(grad_dtype) for out, inp in LAYERS]
    damping = [10 ** -(1 + i % 3) for i in range(len(LAYERS))]
    values, vectors, status = ops.eigen_decompose(gs + as_)
    assert (status == Status.OK).all()
    n = len(gs)
    args = (vectors[:n], values[:n], grads, vectors[n:], values[n:], damping)
    outs = ops.precondition_eigen(*args)
    refs = reference.precondition_eigen(*args)
    for g, a, grad, gamma, out, ref in zip(gs, as_, grads, damping, outs, refs):
        assert out.dtype == grad_dtype and out.shape == grad.shape
        assert rel_err(out, dense_kron_solve(g, a, grad, gamma)) < max(SOLVE_TOL[dtype], TOL[grad_dtype])
        assert rel_err(out, ref) < tol(dtype, grad_dtype)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_precondition_eigen_batched_entry(device, grad_dtype, dtype):
    """A batch of k same-shape layers in one entry: eigenvalues [k, n], eigenvectors [k, n, n]."""
    k, out_dim, in_dim = 3, 7, 10
    gs = [random_spd(out_dim, dtype, device) for _ in range(k)]
    as_ = [random_spd(in_dim, dtype, device) for _ in range(k)]
    grads = torch.randn(k, out_dim, in_dim, device=device).to(grad_dtype)
    values, vectors, status = ops.eigen_decompose(gs + as_)
    assert (status == Status.OK).all()
    stack = torch.stack
    args = ([stack(vectors[:k])], [stack(values[:k])], [grads], [stack(vectors[k:])], [stack(values[k:])], 0.05)
    (out,) = ops.precondition_eigen(*args)
    (ref,) = reference.precondition_eigen(*args)
    assert out.shape == grads.shape and out.dtype == grad_dtype
    for j in range(k):
        expected = dense_kron_solve(gs[j], as_[j], grads[j], 0.05)
        assert rel_err(out[j], expected) < max(SOLVE_TOL[dtype], TOL[grad_dtype])
    assert rel_err(out, ref) < tol(dtype, grad_dtype)


def test_precondition_eigen_clamped_psd(device):
    """A rank-deficient G (fewer samples than its size): damping keeps the solve well posed."""
    x = torch.randn(3, 8, dtype=torch.float64, device=device)
    g = (x.T @ x).contiguous()
    a = random_spd(5, torch.float64, device)
    grad = torch.randn(8, 5, dtype=torch.float64, device=device)
    (lg, la), (qg, qa), status = ops.eigen_decompose([g, a])
    assert (status == Status.OK).all() and (lg >= 0).all()
    (out,) = ops.precondition_eigen([qg], [lg], [grad], [qa], [la], 0.5)
    assert rel_err(out, dense_kron_solve(g, a, grad, 0.5)) < SOLVE_TOL[torch.float64]


# ---- eigen_adam -----------------------------------------------------------------------------------

# (out, in + 1) per layer; None in ADAM_NO_A: a diagonal A (an embedding: no a_eigenvectors).
# 70 x 257 spans two chunks of the CPU loop's parallel split.
ADAM_LAYERS = [(1, 2), (3, 18), (17, 4), (10, 65), (70, 257)]
ADAM_NO_A = {2}
BETA1, BETA2, ADAM_EPS = 0.9, 0.99, 1e-8


def adam_args(dtype, grad_dtype, device, steps=(0.0, 1.0, 4.0, 9.0, 30.0)):
    """eigen_adam's arguments for ADAM_LAYERS: orthogonal bases, moments with v well above eps
    (so the normalized step is well conditioned), and step counts from never-stepped to many."""
    g_vectors = [random_orthogonal(out, dtype, device) for out, _ in ADAM_LAYERS]
    a_vectors = [None if i in ADAM_NO_A else random_orthogonal(inp, dtype, device)
                 for i, (_, inp) in enumerate(ADAM_LAYERS)]
    grads = [torch.randn(out, inp, device=device).to(grad_dtype) for out, inp in ADAM_LAYERS]
    exp_avgs = [torch.randn(out, inp, dtype=dtype, device=device) for out, inp in ADAM_LAYERS]
    exp_avg_sqs = [0.5 + torch.rand(out, inp, dtype=dtype, device=device) for out, inp in ADAM_LAYERS]
    counts = [torch.tensor(t, device=device) for t in steps]
    return g_vectors, grads, a_vectors, exp_avgs, exp_avg_sqs, counts


def adam_in_float64(g_vectors, grads, a_vectors, exp_avgs, exp_avg_sqs, counts, keep: bool):
    """What eigen_adam should return and leave behind, in float64 from the same inputs."""
    directions, moments = [], []
    for qg, grad, qa, m, v, count in zip(g_vectors, grads, a_vectors, exp_avgs, exp_avg_sqs, counts):
        qg, m, v = qg.double(), m.double(), v.double()
        qa = torch.eye(grad.shape[1], dtype=torch.float64, device=grad.device) if qa is None else qa.double()
        g = qg.T @ grad.double() @ qa
        t = float(count) + keep
        if keep:
            m, v = BETA1 * m + (1 - BETA1) * g, BETA2 * v + (1 - BETA2) * g * g
        t = max(t, 1.0)
        u = (m / (1 - BETA1**t)) / ((v / (1 - BETA2**t)).sqrt() + ADAM_EPS)
        directions.append(qg @ u @ qa.T)
        moments.append((m, v, t if keep else float(count)))
    return directions, moments


@pytest.mark.parametrize("keep", [True, False], ids=["step", "skipped"])
@pytest.mark.parametrize("grad_dtype", MAT_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_eigen_adam_is_adam_in_the_eigenbasis(device, dtype, grad_dtype, keep):
    """Directions, moments and step counts vs float64 and vs the reference. Skipped
    (keep=False): every moment and count exactly as it was, the direction from them."""
    args = adam_args(dtype, grad_dtype, device)
    before = [[t.clone() for t in field] for field in args[3:]]
    ref_args = [list(field) for field in args[:3]] + [[t.clone() for t in field] for field in args[3:]]
    flag = torch.tensor(keep, device=device)
    want, want_moments = adam_in_float64(*args[:3], *before, keep)
    got = ops.eigen_adam_(*args, flag, BETA1, BETA2, ADAM_EPS)
    ref = reference.eigen_adam_(*ref_args, flag, BETA1, BETA2, ADAM_EPS)
    _, _, _, exp_avgs, exp_avg_sqs, counts = args
    for i, (out, grad) in enumerate(zip(got, args[1])):
        assert out.dtype == grad_dtype and out.shape == grad.shape
        assert rel_err(out, want[i]) < tol(dtype, grad_dtype), i
        assert rel_err(out, ref[i]) < tol(dtype, grad_dtype), i
        m, v, t = want_moments[i]
        if keep:
            assert rel_err(exp_avgs[i], m) < TOL[dtype] and rel_err(exp_avg_sqs[i], v) < TOL[dtype], i
            assert rel_err(exp_avgs[i], ref_args[3][i]) < TOL[dtype], i
        else:
            assert torch.equal(exp_avgs[i], before[0][i]) and torch.equal(exp_avg_sqs[i], before[1][i]), i
        assert counts[i].item() == t == ref_args[5][i].item(), i


def test_eigen_adam_first_step_from_zero_moments(device):
    """Zero moments, step 0: after one step the bias-corrected direction is Q_G sign-like
    ĝ / (|ĝ| + eps) Q_Aᵀ, Adam's first step; never stepped and skipped: zero, never NaN."""
    qg, qa = random_orthogonal(5, torch.float64, device), random_orthogonal(4, torch.float64, device)
    grad = torch.randn(5, 4, dtype=torch.float64, device=device)
    for keep in (True, False):
        m, v = torch.zeros_like(grad), torch.zeros_like(grad)
        step = torch.zeros((), device=device)
        (out,) = ops.eigen_adam_([qg], [grad], [qa], [m], [v], [step], torch.tensor(keep, device=device),
                                 BETA1, BETA2, ADAM_EPS)
        g = qg.T @ grad @ qa
        want = qg @ (g / (g.abs() + ADAM_EPS)) @ qa.T if keep else torch.zeros_like(grad)
        assert rel_err(out, want) < TOL[torch.float64] if keep else torch.equal(out, want)
        assert step.item() == float(keep)


# ---- opcheck -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mat_dtype", [torch.float32, torch.bfloat16])
def test_opcheck_kron_matmul(device, mat_dtype):
    shapes = [(3, 5, 4, 2), (1, 3, 3, 6)]
    lefts = [torch.randn(m, p, device=device) for m, p, _, _ in shapes]
    mats = [torch.randn(p, q, device=device).to(mat_dtype) for _, p, q, _ in shapes]
    rights = [torch.randn(n, q, device=device) for _, _, q, n in shapes]
    # and a batched entry (two same-shape layers), whose fake must keep the batch dim
    lefts.append(torch.randn(2, 4, 3, device=device))
    mats.append(torch.randn(2, 3, 5, device=device).to(mat_dtype))
    rights.append(torch.randn(2, 6, 5, device=device))
    torch.library.opcheck(torch.ops.kfac_ext.kron_matmul, (lefts, mats, rights))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_opcheck_precondition_eigen(device, grad_dtype):
    torch.library.opcheck(torch.ops.kfac_ext.precondition_eigen, eigen_args(device, grad_dtype))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_opcheck_eigen_adam(device, grad_dtype):
    args = adam_args(torch.float32, grad_dtype, device)
    directions = [torch.empty_like(g) for g in args[1]]
    torch.library.opcheck(torch.ops.kfac_ext.eigen_adam,
                          (*args, torch.tensor(True, device=device), BETA1, BETA2, ADAM_EPS, directions))


# ---- bad inputs: each names the op and the argument -------------------------------------------


def kron_args(device):
    return dict(
        lefts=[torch.randn(2, 3, device=device), torch.randn(4, 3, device=device)],
        mats=[torch.randn(3, 5, device=device), torch.randn(3, 4, device=device)],
        rights=[torch.randn(6, 5, device=device), torch.randn(2, 4, device=device)],
    )


def eigen_args(device, grad_dtype=torch.float32):
    """Valid precondition_eigen arguments for two layers: grads [3, 4] and [2, 5]."""
    shapes = [(3, 4), (2, 5)]
    return (
        [random_orthogonal(out, torch.float32, device) for out, _ in shapes],
        [torch.rand(out, device=device) for out, _ in shapes],
        [torch.randn(out, inp, device=device).to(grad_dtype) for out, inp in shapes],
        [random_orthogonal(inp, torch.float32, device) for _, inp in shapes],
        [torch.rand(inp, device=device) for _, inp in shapes],
        [0.1, 0.2],
    )


EIGEN_FIELDS = ["g_eigenvectors", "g_eigenvalues", "grads", "a_eigenvectors", "a_eigenvalues", "damping"]


def eigen_kwargs(device):
    return dict(zip(EIGEN_FIELDS, eigen_args(device)))


BAD_KRON = {
    "1-D left": ("lefts", 1, lambda t: t[0], r"kron_matmul: lefts\[1\] has shape \[3\] but layer 1's gradient has shape \[3, 4\]; it must be 2-D"),
    "4-D mat": ("mats", 0, lambda t: t[None, None], r"kron_matmul: layer 0: the gradient must be 2-D \(a layer\) or 3-D"),
    "batched mat, one left": ("mats", 0, lambda t: t[None], r"kron_matmul: lefts\[0\] has shape .* it must be 3-D with the same leading batch size"),
    "batch sizes differ": ("lefts", 1, lambda t: t.expand(2, *t.shape).contiguous(), r"kron_matmul: lefts\[1\] has shape \[2, 4, 3\] but layer 1's gradient has shape \[3, 4\]"),
    "left/mat mismatch": ("lefts", 1, lambda t: torch.randn(4, 2, device=t.device),
                          r"kron_matmul: layer 1: lefts.size\(-1\) is 2 but must be 3"),
    "right/mat mismatch": ("rights", 0, lambda t: torch.randn(6, 4, device=t.device),
                           r"kron_matmul: layer 0: rights.size\(-1\) is 4 but must be 5"),
    "mats too short": ("mats", None, lambda ts: ts[:1], r"kron_matmul: mats has 1 entries but lefts has 2"),
    "rights too long": ("rights", None, lambda ts: ts + ts[:1], r"kron_matmul: rights has 3 entries but lefts has 2"),
    "int mat": ("mats", 1, lambda t: t.to(torch.int32), r"kron_matmul: mats\[1\] must be float32, float64, bfloat16 or float16, got Int"),
    "bf16 left": ("lefts", 1, lambda t: t.to(torch.bfloat16), r"kron_matmul: lefts\[1\] must be float32 or float64, got BFloat16"),
    "int left": ("lefts", 0, lambda t: t.to(torch.int64), r"kron_matmul: lefts\[0\] must be float32 or float64, got Long"),
    "right dtype": ("rights", 1, lambda t: t.double(), r"kron_matmul: rights\[1\] has dtype Double but lefts\[0\] has Float"),
    "mixed mat dtypes": ("mats", 1, lambda t: t.half(), r"kron_matmul: mats\[1\] has dtype Half but mats\[0\] has Float"),
    "transposed mat": ("mats", 1, lambda t: torch.randn(4, 3, device=t.device).T, r"kron_matmul: mats\[1\] must be contiguous"),
    "transposed right": ("rights", 0, lambda t: torch.randn(5, 6, device=t.device).T, r"kron_matmul: rights\[0\] must be contiguous"),
}


@pytest.mark.parametrize("case", BAD_KRON.values(), ids=BAD_KRON.keys())
def test_kron_matmul_bad_input(device, case):
    field, index, make, match = case
    with pytest.raises(RuntimeError, match=match):
        ops.kron_matmul(**replace(kron_args(device), field, index, make))


BAD_EIGEN = {
    "g eigenvalues too short": ("g_eigenvalues", 1, lambda t: t[:1], RuntimeError,
                                r"precondition_eigen: layer 1: g_eigenvalues.size\(-1\) is 1 but must be 2"),
    "a eigenvalues too long": ("a_eigenvalues", 0, lambda t: torch.rand(5, device=t.device), RuntimeError,
                               r"precondition_eigen: layer 0: a_eigenvalues.size\(-1\) is 5 but must be 4"),
    "a eigenvectors wrong size": ("a_eigenvectors", 1, lambda t: random_orthogonal(4, torch.float32, t.device), RuntimeError,
                                  r"precondition_eigen: layer 1: a_eigenvectors.size\(-2\) is 4 but must be 5"),
    "non-square eigenvectors": ("g_eigenvectors", 1, lambda t: t[:1].contiguous(), RuntimeError,
                                r"precondition_eigen: layer 1: g_eigenvectors.size\(-2\) is 1 but must be 2"),
    "2-D eigenvalues": ("a_eigenvalues", 1, lambda t: t[None], RuntimeError,
                        r"precondition_eigen: a_eigenvalues\[1\] has shape \[1, 5\] but layer 1's gradient has shape \[2, 5\]; it must be 1-D"),
    "1-D grad": ("grads", 0, lambda t: t[0], RuntimeError, r"precondition_eigen: layer 0: the gradient must be 2-D \(a layer\) or 3-D"),
    "list lengths": ("a_eigenvalues", None, lambda ts: ts[:1], RuntimeError,
                     r"precondition_eigen: a_eigenvalues has 1 entries but grads has 2"),
    "damping too long": ("damping", None, lambda d: d + [0.1], ValueError, r"damping has 3 entries but there are 2 layers"),
    "negative damping": ("damping", 1, lambda _: -1.0, RuntimeError,
                         r"precondition_eigen: damping\[1\] must be finite and >= 0, got -1"),
    "nan damping": ("damping", 0, lambda _: math.nan, RuntimeError,
                    r"precondition_eigen: damping\[0\] must be finite and >= 0, got nan"),
    "int grad": ("grads", 1, lambda t: t.to(torch.int32), RuntimeError,
                 r"precondition_eigen: grads\[1\] must be float32, float64, bfloat16 or float16, got Int"),
    "bf16 eigenvectors": ("a_eigenvectors", 1, lambda t: t.to(torch.bfloat16), RuntimeError,
                          r"precondition_eigen: a_eigenvectors\[1\] must be float32 or float64, got BFloat16"),
    "eigenvalue dtype": ("g_eigenvalues", 1, lambda t: t.double(), RuntimeError,
                         r"precondition_eigen: g_eigenvalues\[1\] has dtype Double but g_eigenvectors\[0\] has Float"),
    "transposed eigenvectors": ("g_eigenvectors", 1, lambda t: t.T, RuntimeError,
                                r"precondition_eigen: g_eigenvectors\[1\] must be contiguous"),
    "transposed grad": ("grads", 0, lambda t: torch.randn(4, 3, device=t.device).T, RuntimeError,
                        r"precondition_eigen: grads\[0\] must be contiguous"),
}


@pytest.mark.parametrize("case", BAD_EIGEN.values(), ids=BAD_EIGEN.keys())
def test_precondition_eigen_bad_input(device, case):
    field, index, make, error, match = case
    with pytest.raises(error, match=match):
        ops.precondition_eigen(**replace(eigen_kwargs(device), field, index, make))


ADAM_FIELDS = ["g_eigenvectors", "grads", "a_eigenvectors", "exp_avgs", "exp_avg_sqs", "steps", "keep",
               "beta1", "beta2", "eps"]


def adam_kwargs(device):
    args = adam_args(torch.float32, torch.float32, device)
    return dict(zip(ADAM_FIELDS, (*args, torch.tensor(True, device=device), BETA1, BETA2, ADAM_EPS)))


BAD_ADAM = {
    "1-D grad": ("grads", 1, lambda t: t[0], r"eigen_adam: grads\[1\] must be 2-D, got shape \[18\]"),
    "transposed grad": ("grads", 3, lambda t: t.T.contiguous().T, r"eigen_adam: grads\[3\] must be contiguous"),
    "int grad": ("grads", 0, lambda t: t.int(), r"eigen_adam: grads\[0\] must be float32, float64, bfloat16 or float16, got Int"),
    "mixed grad dtypes": ("grads", 1, lambda t: t.half(), r"eigen_adam: grads\[1\] has dtype Half but grads\[0\] has Float"),
    "G basis wrong size": ("g_eigenvectors", 1, lambda t: random_orthogonal(4, torch.float32, t.device),
                           r"eigen_adam: layer 1: g_eigenvectors.size\(0\) is 4 but must be 3"),
    "A basis wrong size": ("a_eigenvectors", 3, lambda t: random_orthogonal(64, torch.float32, t.device),
                           r"eigen_adam: layer 3: a_eigenvectors.size\(0\) is 64 but must be 65"),
    "non-square basis": ("a_eigenvectors", 1, lambda t: t[:3].contiguous(), r"eigen_adam: a_eigenvectors\[1\] must be square"),
    "bf16 basis": ("g_eigenvectors", 0, lambda t: t.bfloat16(), r"eigen_adam: g_eigenvectors\[0\] must be float32 or float64, got BFloat16"),
    "basis dtype": ("a_eigenvectors", 1, lambda t: t.double(), r"eigen_adam: a_eigenvectors\[1\] has dtype Double but g_eigenvectors\[0\] has Float"),
    "moment shape": ("exp_avgs", 4, lambda t: t[:, :-1].contiguous(),
                     r"eigen_adam: exp_avgs\[4\] has shape \[70, 256\] but grads\[4\] has shape \[70, 257\]"),
    "moment dtype": ("exp_avg_sqs", 2, lambda t: t.double(), r"eigen_adam: exp_avg_sqs\[2\] has dtype Double but must have Float \(the eigenvectors' dtype\)"),
    "moment not contiguous": ("exp_avg_sqs", 3, lambda t: t.T.contiguous().T, r"eigen_adam: exp_avg_sqs\[3\] must be contiguous"),
    "step dtype": ("steps", 1, lambda t: t.double(), r"eigen_adam: steps\[1\] must be a 0-d float32 tensor, got Double"),
    "step shape": ("steps", 0, lambda t: t[None], r"eigen_adam: steps\[0\] must be a 0-d float32 tensor, got Float of shape \[1\]"),
    "steps too short": ("steps", None, lambda ts: ts[:4], r"eigen_adam: steps has 4 entries but grads has 5"),
    "a bases too long": ("a_eigenvectors", None, lambda ts: ts + ts[:1], r"eigen_adam: a_eigenvectors has 6 entries but grads has 5"),
    "float keep": ("keep", None, lambda t: t.float(), r"eigen_adam: keep must be a 0-d bool tensor, got Float"),
    "beta1 = 1": ("beta1", None, lambda _: 1.0, r"eigen_adam: beta1 must be in \[0, 1\), got 1"),
    "nan beta2": ("beta2", None, lambda _: math.nan, r"eigen_adam: beta2 must be in \[0, 1\), got nan"),
    "zero eps": ("eps", None, lambda _: 0.0, r"eigen_adam: eps must be finite and > 0, got 0"),
}


@pytest.mark.parametrize("case", BAD_ADAM.values(), ids=BAD_ADAM.keys())
def test_eigen_adam_bad_input(device, case):
    """Refused before anything is written: the moments and counts are untouched."""
    field, index, make, match = case
    kwargs = replace(adam_kwargs(device), field, index, make)
    before = [t.clone() for t in kwargs["exp_avgs"] + kwargs["exp_avg_sqs"] + kwargs["steps"]]
    with pytest.raises(RuntimeError, match=match):
        ops.eigen_adam_(**kwargs)
    after = kwargs["exp_avgs"] + kwargs["exp_avg_sqs"] + kwargs["steps"]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.kron_matmul([], [], []), r"kron_matmul: lefts must hold at least one tensor"),
        (lambda: ops.precondition_eigen([], [], [], [], [], 0.1),
         r"precondition_eigen: grads must hold at least one tensor"),
        (lambda: ops.eigen_adam_([], [], [], [], [], [], torch.tensor(True), 0.9, 0.99, 1e-8),
         r"eigen_adam: grads must hold at least one tensor"),
    ],
    ids=["kron_matmul", "precondition_eigen", "eigen_adam"],
)
def test_empty_lists(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("field", ["mats", "rights"])
def test_kron_matmul_mixed_devices(field):
    args = replace(kron_args("cpu"), field, 1, lambda t: t.cuda())
    with pytest.raises(RuntimeError, match=rf"kron_matmul: {field}\[1\] is on cuda"):
        ops.kron_matmul(**args)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("field", ["grads", "a_eigenvectors", "a_eigenvalues"])
def test_precondition_eigen_mixed_devices(field):
    args = replace(eigen_kwargs("cpu"), field, 1, lambda t: t.cuda())
    with pytest.raises(RuntimeError, match=rf"precondition_eigen: {field}\[1\] is on cuda"):
        ops.precondition_eigen(**args)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("field", ["grads", "a_eigenvectors", "exp_avg_sqs", "steps"])
def test_eigen_adam_mixed_devices(field):
    args = replace(adam_kwargs("cpu"), field, 1, lambda t: t.cuda())
    with pytest.raises(RuntimeError, match=rf"eigen_adam: {field}\[1\] is on cuda"):
        ops.eigen_adam_(**args)
