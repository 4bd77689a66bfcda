"""Exact Fisher, Fisher-vector products and natural gradients (kfac_ext.natural), in float64.

The references are independent computations: dense Jacobians vs forward-over-reverse products,
the Fisher vs ``torch.autograd.functional.hessian`` where they must agree (models linear in θ),
Monte Carlo vs exact expectations, and autodiff through a reparametrised model vs the chain rule.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_orthogonal, rel_err
from torch import nn
from torch.func import functional_call

from kfac_ext import natural
from kfac_ext.losses import Loss, make_loss

LOSSES = [
    pytest.param(name, reduction, id=f"{name}-{reduction}")
    for name in ("cross_entropy", "mse", "bce_with_logits")
    for reduction in ("mean", "sum")
]
MODELS = ["mlp", "linear"]
N_IN, N_HIDDEN, N_OUT = 3, 5, 4
FVP_TOL = 1e-10  # float64 products vs the dense Fisher

# PyTorch's forward-mode AD scripts its decompositions on first use, which warns on torch 2.14.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


class ZeroLogit(nn.Module):
    """Appends a constant-zero logit: the reference class that makes the softmax identifiable."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z, z.new_zeros(z.shape[0], 1)], dim=1)


class Reparametrised(nn.Module):
    """``model'(φ) = model(θ = M φ)``: one parameter ``φ``, initialised so that ``M φ = θ``."""

    def __init__(self, base: nn.Module, m: torch.Tensor):
        super().__init__()
        self._base = (base,)  # a tuple, so base's parameters are not this module's
        self.register_buffer("m", m)
        self.phi = nn.Parameter(torch.linalg.solve(m, natural.flatten_params(base)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._base[0]
        return functional_call(base, natural.unflatten_params(base, self.m @ self.phi), (x,))


def make_model(kind: str, n_out: int = N_OUT) -> nn.Module:
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(N_IN, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, n_out))
    elif kind == "linear":
        model = nn.Linear(N_IN, n_out)
    else:
        raise ValueError(kind)
    return model.double()


def make_targets(loss: Loss, n: int, n_out: int = N_OUT) -> torch.Tensor:
    if loss.name == "cross_entropy":
        return torch.randint(0, n_out, (n,))
    if loss.name == "mse":
        return torch.randn(n, n_out, dtype=torch.float64)
    return torch.bernoulli(torch.full((n, n_out), 0.5, dtype=torch.float64))


def inputs(n: int) -> torch.Tensor:
    return torch.randn(n, N_IN, dtype=torch.float64)


def loss_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Loss) -> torch.Tensor:
    """``∇²_θ L`` by double backward through the whole loss."""

    def objective(theta):
        return loss(functional_call(model, natural.unflatten_params(model, theta), (x,)), y)

    return torch.autograd.functional.hessian(objective, natural.flatten_params(model))


# ---- parameter vectors -----------------------------------------------------------------------


def test_flatten_params_order_and_round_trip():
    model = make_model("mlp")
    model[0].bias.requires_grad_(False)  # frozen parameters are not part of θ
    theta = natural.flatten_params(model)
    expected = [model[0].weight, model[2].weight, model[2].bias]
    assert theta.shape == (sum(p.numel() for p in expected),)
    assert torch.equal(theta, torch.cat([p.detach().reshape(-1) for p in expected]))
    params = natural.unflatten_params(model, theta)
    assert list(params) == ["0.weight", "2.weight", "2.bias"]
    for (name, p), q in zip(params.items(), expected):
        assert p.shape == q.shape and torch.equal(p, q), name
    x = inputs(7)
    assert torch.equal(functional_call(model, params, (x,)), model(x))


def test_unflatten_params_rejects_wrong_size():
    model = make_model("linear")
    with pytest.raises(ValueError, match=r"unflatten_params: flat must have shape \[16\]"):
        natural.unflatten_params(model, torch.zeros(15, dtype=torch.float64))


# ---- Fisher-vector products and the dense Fisher ---------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("name,reduction", LOSSES)
def test_fisher_vector_product_is_dense_fisher_times_vector(kind, name, reduction):
    model, loss, x = make_model(kind), make_loss(name, reduction), inputs(9)
    fisher = natural.exact_fisher(model, x, loss)
    for _ in range(3):
        v = torch.randn(fisher.shape[0], dtype=torch.float64)
        fv = natural.fisher_vector_product(model, x, loss, v)
        assert fv.dtype == torch.float64 and fv.shape == v.shape
        assert rel_err(fv, fisher @ v) < FVP_TOL


@pytest.mark.parametrize("name,reduction", LOSSES)
def test_fisher_is_loss_hessian_for_model_linear_in_parameters(name, reduction):
    # App. A: H = JᵀMJ + Σ (∇²z)(∇ℓ); the second term vanishes when z is linear in θ.
    model, loss, x = make_model("linear"), make_loss(name, reduction), inputs(9)
    y = make_targets(loss, 9)
    assert rel_err(natural.exact_fisher(model, x, loss), loss_hessian(model, x, y, loss)) < 1e-12


@pytest.mark.parametrize("name,reduction", LOSSES)
def test_fisher_is_not_loss_hessian_for_nonlinear_model(name, reduction):
    # The converse of the test above, so that it can fail: an MLP has curvature in z(θ).
    model, loss, x = make_model("mlp"), make_loss(name, reduction), inputs(9)
    y = make_targets(loss, 9)
    assert rel_err(natural.exact_fisher(model, x, loss), loss_hessian(model, x, y, loss)) > 1e-3


@pytest.mark.parametrize("method", ["jmj", "sampled"])
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("name,reduction", LOSSES)
def test_fisher_is_symmetric_positive_semidefinite(kind, name, reduction, method):
    model, loss, x = make_model(kind), make_loss(name, reduction), inputs(6)
    fisher = natural.exact_fisher(model, x, loss, method=method, samples=3)
    assert fisher.dtype == torch.float64
    assert torch.allclose(fisher, fisher.T, rtol=0, atol=1e-14 * fisher.abs().max())
    eigenvalues = torch.linalg.eigvalsh(fisher)
    assert eigenvalues.max() > 0
    assert eigenvalues.min() >= -1e-12 * eigenvalues.max()


def test_fisher_mean_is_sum_over_examples_and_elements():
    # "mean" divides by N, and the elementwise losses' ℓ_n by D too (as F.mse_loss does).
    model, x = make_model("mlp"), inputs(5)
    for name, divisor in (("cross_entropy", 5), ("mse", 5 * N_OUT), ("bce_with_logits", 5 * N_OUT)):
        mean = natural.exact_fisher(model, x, make_loss(name, "mean"))
        total = natural.exact_fisher(model, x, make_loss(name, "sum"))
        assert rel_err(divisor * mean, total) < 1e-14, name


def test_cross_entropy_fisher_is_blind_to_shifting_all_logits():
    # Adding c to every logit leaves the softmax unchanged: the last bias's all-ones direction is
    # in the null space of F, so a cross-entropy Fisher of such a model is always singular.
    model, loss, x = make_model("mlp"), make_loss("cross_entropy"), inputs(32)
    fisher = natural.exact_fisher(model, x, loss)
    shift = torch.zeros(fisher.shape[0], dtype=torch.float64)
    shift[-N_OUT:] = 1.0  # "2.bias" is the last parameter
    fv = natural.fisher_vector_product(model, x, loss, shift)
    assert fv.abs().max() < 1e-14 * fisher.abs().max()
    assert torch.linalg.eigvalsh(fisher)[0].abs() < 1e-14 * fisher.abs().max()


@pytest.mark.parametrize("name,reduction", LOSSES)
def test_sampled_fisher_converges_to_exact(name, reduction):
    model, loss, x = make_model("mlp"), make_loss(name, reduction), inputs(8)
    exact = natural.exact_fisher(model, x, loss, method="jmj")
    gen = torch.Generator().manual_seed(0)
    errors = {}
    for s in (100, 10000):
        sampled = natural.exact_fisher(model, x, loss, method="sampled", samples=s, generator=gen)
        errors[s] = rel_err(sampled, exact)
    # Monte Carlo error ~ 1/√S: about 10x smaller for 100x the samples (seen: 5x to 14x).
    assert errors[10000] < errors[100] / 3, errors
    assert errors[10000] < 0.03, errors


def test_sampled_fisher_is_reproducible_with_generator():
    model, loss, x = make_model("mlp"), make_loss("cross_entropy"), inputs(4)
    a, b = (
        natural.exact_fisher(
            model, x, loss, method="sampled", samples=5, generator=torch.Generator().manual_seed(3)
        )
        for _ in range(2)
    )
    assert torch.equal(a, b)


# ---- natural gradients -----------------------------------------------------------------------


def test_loss_gradient_matches_autograd():
    model, loss, x = make_model("mlp"), make_loss("cross_entropy"), inputs(6)
    y = make_targets(loss, 6)
    loss(model(x), y).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert rel_err(natural.loss_gradient(model, x, y, loss), expected) < 1e-14


@pytest.mark.parametrize("name,reduction", LOSSES)
def test_natural_gradient_solves_damped_fisher_system(name, reduction):
    model, loss, x = make_model("mlp"), make_loss(name, reduction), inputs(8)
    y = make_targets(loss, 8)
    fisher = natural.exact_fisher(model, x, loss)
    grad = natural.loss_gradient(model, x, y, loss)
    step = natural.natural_gradient(model, x, y, loss, damping=0.1)
    assert rel_err(fisher @ step + 0.1 * step, grad) < 1e-12


@pytest.mark.parametrize("name,reduction", LOSSES)
def test_natural_gradient_is_invariant_to_linear_reparametrisation(name, reduction):
    # Seed App. B: with θ = Mφ, F_φ = MᵀFM and ∇_φ = Mᵀ∇, so F_φ⁻¹∇_φ = M⁻¹F⁻¹∇. F_φ and ∇_φ
    # are computed by autodiff through the reparametrised model, not from these formulas.
    # β = 0 needs a full-rank F: N·rank(H_n) >= P, and for cross-entropy a fixed zero logit
    # (else F is singular, see test_cross_entropy_fisher_is_blind_to_shifting_all_logits).
    loss, n = make_loss(name, reduction), 32
    if name == "cross_entropy":
        model = nn.Sequential(
            nn.Linear(N_IN, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, N_OUT - 1), ZeroLogit()
        ).double()
    else:
        model = make_model("mlp")
    x, y = inputs(n), make_targets(loss, n)
    p = natural.flatten_params(model).numel()
    scales = torch.exp(torch.empty(p, dtype=torch.float64).uniform_(-1, 1))  # cond(M) <= e²
    m = random_orthogonal(p) @ torch.diag(scales) @ random_orthogonal(p)
    model_phi = Reparametrised(model, m)
    assert rel_err(model_phi(x), model(x)) < 1e-14

    fisher = natural.exact_fisher(model, x, loss)
    eigenvalues = torch.linalg.eigvalsh(fisher)
    condition = (eigenvalues[-1] / eigenvalues[0]).item()
    assert 0 < condition < 1e10, "F must be full rank for β = 0"
    fisher_phi = natural.exact_fisher(model_phi, x, loss)
    assert rel_err(fisher_phi, m.T @ fisher @ m) < 1e-12

    grad = natural.loss_gradient(model, x, y, loss)
    grad_phi = natural.loss_gradient(model_phi, x, y, loss)
    assert rel_err(grad_phi, m.T @ grad) < 1e-12
    assert rel_err(m @ grad_phi, grad) > 0.1  # the plain gradient step is not invariant

    step = natural.natural_gradient(model, x, y, loss, damping=0.0)
    step_phi = natural.natural_gradient(model_phi, x, y, loss, damping=0.0)
    # A backward-stable solve loses cond(F)·ε (seen: ≈ 6e-17·cond(F), cond(F) from 2e4 to 1e8).
    assert rel_err(m @ step_phi, step) < 1e-14 * condition


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("name,reduction", LOSSES)
def test_cg_natural_gradient_matches_dense_solve(kind, name, reduction):
    model, loss, x = make_model(kind), make_loss(name, reduction), inputs(8)
    y = make_targets(loss, 8)
    damping = 1e-3 if reduction == "mean" else 1e-2
    dense = natural.natural_gradient(model, x, y, loss, damping)
    p = dense.numel()
    cg = natural.cg_natural_gradient(model, x, y, loss, damping, max_iters=2 * p, tol=1e-13)
    assert rel_err(cg, dense) < 1e-9
    # Truncated CG: a few iterations already point the right way but are not the solution.
    few = natural.cg_natural_gradient(model, x, y, loss, damping, max_iters=3, tol=0.0)
    assert torch.dot(few, natural.loss_gradient(model, x, y, loss)) > 0
    assert rel_err(few, dense) > 1e-6


# ---- conjugate gradient ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 40])
def test_conjugate_gradient_solves_spd_system(n):
    q = random_orthogonal(n)
    a = q @ torch.diag(torch.logspace(0, 3, n, dtype=torch.float64)) @ q.T
    b = torch.randn(n, dtype=torch.float64)
    x = natural.conjugate_gradient(lambda v: a @ v, b, max_iters=10 * n, tol=1e-14)
    assert rel_err(x, torch.linalg.solve(a, b)) < 1e-10


def test_conjugate_gradient_stops_at_tolerance_and_max_iters():
    n = 30
    q = random_orthogonal(n)
    a = q @ torch.diag(torch.logspace(0, 2, n, dtype=torch.float64)) @ q.T
    b = torch.randn(n, dtype=torch.float64)
    calls = []

    def matvec(v):
        calls.append(1)
        return a @ v

    natural.conjugate_gradient(matvec, b, max_iters=4, tol=0.0)
    assert len(calls) == 4
    calls.clear()
    x = natural.conjugate_gradient(matvec, b, max_iters=1000, tol=1e-3)
    assert 0 < len(calls) < n
    assert torch.linalg.norm(b - a @ x) <= 1e-3 * torch.linalg.norm(b)
    zero = torch.zeros(n, dtype=torch.float64)
    assert torch.equal(natural.conjugate_gradient(matvec, zero), zero)


def test_conjugate_gradient_raises_on_indefinite_operator():
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="not positive definite"):
        natural.conjugate_gradient(lambda v: a @ v, torch.tensor([0.0, 1.0], dtype=torch.float64))


# ---- dtypes and argument checks --------------------------------------------------------------


def test_float32_model_computes_in_float32():
    model64, loss, x64 = make_model("mlp"), make_loss("mse"), inputs(8)
    y64 = make_targets(loss, 8)
    model32 = copy.deepcopy(model64).float()
    x32, y32 = x64.float(), y64.float()
    v = torch.randn(natural.flatten_params(model64).numel(), dtype=torch.float64)
    step64 = natural.natural_gradient(model64, x64, y64, loss, 0.1)
    results = [
        (natural.exact_fisher(model32, x32, loss), natural.exact_fisher(model64, x64, loss)),
        (
            natural.fisher_vector_product(model32, x32, loss, v.float()),
            natural.fisher_vector_product(model64, x64, loss, v),
        ),
        (natural.natural_gradient(model32, x32, y32, loss, 0.1), step64),
        (natural.cg_natural_gradient(model32, x32, y32, loss, 0.1), step64),
    ]
    for out32, ref64 in results:  # seen: 1e-7 to 5e-7
        assert out32.dtype == torch.float32
        assert rel_err(out32, ref64) < 1e-5


def test_argument_checks():
    model, loss, x = make_model("linear"), make_loss("mse"), inputs(4)
    y = make_targets(loss, 4)
    with pytest.raises(ValueError, match="method must be 'jmj' or 'sampled'"):
        natural.exact_fisher(model, x, loss, method="empirical")
    with pytest.raises(ValueError, match="samples must be a positive int"):
        natural.exact_fisher(model, x, loss, method="sampled", samples=0)
    with pytest.raises(ValueError, match=r"vector must have shape \(16,\)"):
        natural.fisher_vector_product(model, x, loss, torch.zeros(15, dtype=torch.float64))
    with pytest.raises(ValueError, match="damping must be >= 0"):
        natural.natural_gradient(model, x, y, loss, -1.0)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        natural.cg_natural_gradient(model, x, y, loss, float("nan"))
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        natural.flatten_params(model.requires_grad_(False))
