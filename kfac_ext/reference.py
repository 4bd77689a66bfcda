"""Pure-PyTorch versions of every native op: the oracle for the tests and the baseline for the
benchmarks. Kept simple and obviously right (they materialise ``[x, 1]``, loop over layers, and
use ``torch.linalg`` directly); same signatures and semantics as :mod:`kfac_ext.ops`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .ops import Status, _per_layer


def _symmetrize(m: Tensor) -> Tensor:
    return (m + m.mT) / 2


def factor_update_(
    factors: Sequence[Tensor],
    xs: Sequence[Tensor],
    *,
    decay: float,
    scales: float | Sequence[float],
    append_ones: bool | Sequence[bool],
) -> None:
    n = len(factors)
    scales = _per_layer(scales, n, "scales", float)
    append_ones = _per_layer(append_ones, n, "append_ones", bool)
    for factor, x, scale, ones in zip(factors, xs, scales, append_ones):
        xbar = x.to(factor.dtype)
        if ones:
            xbar = torch.cat([xbar, xbar.new_ones(xbar.shape[0], 1)], dim=1)
        new = scale * (xbar.T @ xbar)
        if decay == 0.0:
            factor.copy_(_symmetrize(new))
        else:
            factor.copy_(_symmetrize(decay * factor + new))


def damped_inverse(
    factors: Sequence[Tensor], damping: float | Sequence[float]
) -> tuple[list[Tensor], Tensor]:
    damping = _per_layer(damping, len(factors), "damping", float)
    inverses, status = [], []
    for factor, gamma in zip(factors, damping):
        inverse, code = _damped_inverse_one(factor, gamma)
        inverses.append(inverse)
        status.append(code)
    return inverses, torch.tensor(status, dtype=torch.int32, device=factors[0].device)


def _attempts(dtype: torch.dtype) -> list[tuple[torch.dtype, Status]]:
    """The dtypes to try in order, with the status a success in each earns: float32 failures are
    retried in float64."""
    attempts = [(dtype, Status.OK)]
    if dtype == torch.float32:
        attempts.append((torch.float64, Status.OK_AFTER_FP64_RETRY))
    return attempts


def _damped_inverse_one(factor: Tensor, gamma: float) -> tuple[Tensor, int]:
    if not torch.isfinite(factor).all():
        return torch.zeros_like(factor), Status.NON_FINITE_INPUT
    for dtype, code in _attempts(factor.dtype):
        damped = _symmetrize(factor.to(dtype))
        damped = damped + gamma * torch.eye(len(damped), dtype=dtype, device=damped.device)
        chol, info = torch.linalg.cholesky_ex(damped)
        inverse = _symmetrize(torch.cholesky_inverse(chol)).to(factor.dtype)
        if info == 0 and torch.isfinite(inverse).all():
            return inverse, code
    return torch.zeros_like(factor), Status.FAILED


def eigen_decompose(factors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor]:
    eigenvalues, eigenvectors, status = [], [], []
    for factor in factors:
        values, vectors, code = _eigen_one(factor)
        eigenvalues.append(values)
        eigenvectors.append(vectors)
        status.append(code)
    return eigenvalues, eigenvectors, torch.tensor(status, dtype=torch.int32, device=factors[0].device)


def _eigen_one(factor: Tensor) -> tuple[Tensor, Tensor, int]:
    failed_values = factor.new_zeros(factor.shape[0])
    if not torch.isfinite(factor).all():
        return failed_values, torch.zeros_like(factor), Status.NON_FINITE_INPUT
    for dtype, code in _attempts(factor.dtype):
        try:
            values, vectors = torch.linalg.eigh(_symmetrize(factor.to(dtype)))
        except torch.linalg.LinAlgError:
            continue
        return values.clamp_min(0).to(factor.dtype), vectors.to(factor.dtype), code
    return failed_values, torch.zeros_like(factor), Status.FAILED


def kron_matmul(
    lefts: Sequence[Tensor], mats: Sequence[Tensor], rights: Sequence[Tensor]
) -> list[Tensor]:
    return [(l @ c.to(l.dtype) @ r.mT).to(c.dtype) for l, c, r in zip(lefts, mats, rights)]


def precondition_inverse(
    g_inverses: Sequence[Tensor], grads: Sequence[Tensor], a_inverses: Sequence[Tensor]
) -> list[Tensor]:
    return kron_matmul(g_inverses, grads, a_inverses)


def precondition_eigen(
    g_eigenvectors: Sequence[Tensor],
    g_eigenvalues: Sequence[Tensor],
    grads: Sequence[Tensor],
    a_eigenvectors: Sequence[Tensor],
    a_eigenvalues: Sequence[Tensor],
    damping: float | Sequence[float],
) -> list[Tensor]:
    damping = _per_layer(damping, len(grads), "damping", float)
    out = []
    for qg, lg, grad, qa, la, gamma in zip(
        g_eigenvectors, g_eigenvalues, grads, a_eigenvectors, a_eigenvalues, damping
    ):
        rotated = qg.mT @ grad.to(qg.dtype) @ qa
        rotated = rotated / (lg.unsqueeze(-1) * la.unsqueeze(-2) + gamma)
        out.append((qg @ rotated @ qa.mT).to(grad.dtype))
    return out


def eigen_adam_(
    g_eigenvectors: Sequence[Tensor],
    grads: Sequence[Tensor],
    a_eigenvectors: Sequence[Tensor | None],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    keep: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> list[Tensor]:
    out = []
    for qg, grad, qa, m, v, step in zip(g_eigenvectors, grads, a_eigenvectors, exp_avgs, exp_avg_sqs, steps):
        g = qg.mT @ grad.to(qg.dtype)
        g = g @ qa if qa is not None else g
        # a skipped step lerps each moment toward itself: exactly unchanged
        m.lerp_(torch.where(keep, g, m), 1 - beta1)
        v.lerp_(torch.where(keep, g * g, v), 1 - beta2)
        step.add_(keep)
        t = step.double().clamp_min(1.0)  # never stepped: m = 0
        c1, c2 = ((1 - beta**t).to(m.dtype) for beta in (beta1, beta2))
        u = qg @ ((m / c1) / ((v / c2).sqrt() + eps))
        out.append((u @ qa.mT if qa is not None else u).to(grad.dtype))
    return out
