"""Typed wrappers over the native ops ``torch.ops.kfac_ext.*``, and their fake implementations.

Every op takes lists with one entry per layer and handles all layers of a model in one call.

Conventions (pinned by ``tests/``):

* A layer's input activations ``x`` have shape ``[rows, d]`` (rows = examples, or examples x
  positions). With the homogeneous coordinate, ``xbar = [x, 1]``: the 1 is appended LAST.
* ``W̄ = [W | b]`` has shape ``[out, in (+1)]``. With row-major flatten the Fisher block of a
  layer is ``G ⊗ A`` and ``(L ⊗ R) C.flatten() == (L @ C @ R.T).flatten()``.
* Factors are square, float32 or float64, contiguous; activations and gradients may also be
  bfloat16 or float16 and are cast up to the factor dtype before any arithmetic.
* Ops take every scale and damping explicitly; none is guessed.

On CUDA, ``factor_update_``, ``kron_matmul``, ``precondition_eigen`` and ``eigen_adam_`` never synchronize or copy
host to device (per-layer tables travel as kernel parameters), so they can be captured in a CUDA
graph; ``damped_inverse`` and ``eigen_decompose`` read their statuses back once per call (to retry
float32 failures in float64) and refuse to run under capture.

``kron_matmul`` and ``precondition_eigen`` also take batched entries: a leading dimension ``k`` on
every tensor of one entry holds ``k`` layers of one shape, done as one batched GEMM per side.

An empty list raises ``ValueError``; every other bad argument raises ``RuntimeError`` from the
native check, naming the op and the argument. Failed inversions never raise: they are reported per factor through a :class:`Status` tensor and
their results are all zeros (never NaN), so a caller that ignores the status cannot push NaN
into its parameters.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "Status",
    "factor_update_",
    "damped_inverse",
    "eigen_decompose",
    "kron_matmul",
    "precondition_inverse",
    "precondition_eigen",
    "eigen_adam_",
]


class Status(enum.IntEnum):
    """Per-factor outcome of :func:`damped_inverse` and :func:`eigen_decompose`."""

    OK = 0
    #: float32 failed (not positive definite / no convergence); float64 succeeded, cast back.
    OK_AFTER_FP64_RETRY = 1
    #: failed even in float64; the result is all zeros.
    FAILED = 2
    #: the factor held NaN or inf; the result is all zeros.
    NON_FINITE_INPUT = 3


def _nonempty(op: str, arg: str, tensors: Sequence[Tensor]) -> list[Tensor]:
    """The list itself; an empty one is refused here because the dispatcher needs a tensor to
    pick a device kernel, so the native check would never run."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{op}: {arg} must hold at least one tensor, got an empty list")
    return tensors


def _per_layer(value, n: int, name: str, kind: type) -> list:
    """Broadcasts a scalar to one value per layer, or checks a sequence has one per layer."""
    if isinstance(value, (bool, int, float)):
        return [kind(value)] * n
    values = [kind(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but there are {n} layers")
    return values


def factor_update_(
    factors: Sequence[Tensor],
    xs: Sequence[Tensor],
    *,
    decay: float,
    scales: float | Sequence[float],
    append_ones: bool | Sequence[bool],
) -> None:
    """In place, for every layer i: ``factors[i] <- decay * factors[i] + scales[i] * xbar.T @ xbar``.

    Args:
        factors: ``[d_i (+1), d_i (+1)]`` float32/float64 contiguous factors, all of one dtype
            and device. Updated in place; the result is exactly symmetric.
        xs: ``[rows_i, d_i]`` contiguous inputs (float32/float64/bfloat16/float16, all one
            dtype), accumulated in the factor's dtype. ``rows_i`` may differ per layer.
        decay: in ``[0, 1]``; ``0`` overwrites the factor (stale NaN/inf are dropped).
        scales: ``>= 0``, one per layer or one for all (e.g. ``1 / rows`` for a mean).
        append_ones: per layer or for all: use ``xbar = [x, 1]`` (ones column LAST) without
            materialising it; the factor then has ``d_i + 1`` rows and its corner gains
            ``scales[i] * rows_i``.

    Precision: every element is computed in the factor's dtype (``decay``, ``scales`` and the
    row count rounded to it), the ones column and its corner included, on every device and
    path; two paths may differ in the last bits (summation order, fused multiply-adds), so
    compare them with tolerances from the dtype, never for exact equality.

    Non-finite inputs are not checked here (a host sync on CUDA); they propagate into the factor.
    The optimizer screens activations before calling this.
    """
    factors = _nonempty("factor_update", "factors", factors)
    n = len(factors)
    torch.ops.kfac_ext.factor_update(
        factors,
        list(xs),
        float(decay),
        _per_layer(scales, n, "scales", float),
        _per_layer(append_ones, n, "append_ones", bool),
    )


def damped_inverse(
    factors: Sequence[Tensor], damping: float | Sequence[float]
) -> tuple[list[Tensor], Tensor]:
    """``(F_i + damping_i I)^-1`` for every factor, by Cholesky.

    The factor is symmetrized first, ``(F + F.T) / 2``. A factorization that fails in float32
    (not positive definite, or an inverse that overflows) is retried in float64 and cast back.

    Args:
        factors: square float32/float64 contiguous factors of any sizes, one dtype and device.
        damping: ``>= 0``, per factor or one for all.

    Returns:
        ``(inverses, status)``: inverses in the factors' dtype (exactly symmetric; all zeros where
        the status is ``FAILED`` or ``NON_FINITE_INPUT``) and an int32 :class:`Status` per factor
        on the factors' device.
    """
    factors = _nonempty("damped_inverse", "factors", factors)
    return torch.ops.kfac_ext.damped_inverse(
        factors, _per_layer(damping, len(factors), "damping", float)
    )


def eigen_decompose(factors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """``F_i = Q_i diag(λ_i) Q_i.T`` for every (symmetrized) factor, with ``λ_i`` clamped ``>= 0``.

    Damping is not applied here: :func:`precondition_eigen` applies it. Same status semantics as
    :func:`damped_inverse` (a float32 eigensolver failure is retried in float64).

    Returns:
        ``(eigenvalues, eigenvectors, status)``: ``[n_i]`` ascending eigenvalues, ``[n_i, n_i]``
        eigenvectors (columns), and an int32 :class:`Status` per factor.
    """
    return torch.ops.kfac_ext.eigen_decompose(_nonempty("eigen_decompose", "factors", factors))


def kron_matmul(
    lefts: Sequence[Tensor], mats: Sequence[Tensor], rights: Sequence[Tensor]
) -> list[Tensor]:
    """``lefts[i] @ mats[i] @ rights[i].T``, i.e. ``(L ⊗ R) vec(C)`` for row-major ``vec``.

    Args:
        lefts: ``[m_i, p_i]`` float32/float64; rights: ``[n_i, q_i]`` in the same dtype.
        mats: ``[p_i, q_i]`` of any supported float dtype, cast up to the lefts' dtype.
        An entry may be batched: ``[k_i, m_i, p_i]``, ``[k_i, p_i, q_i]``, ``[k_i, n_i, q_i]``.

    Returns:
        ``[m_i, n_i]`` (or ``[k_i, m_i, n_i]``) results in the mats' dtype.
    """
    lefts = _nonempty("kron_matmul", "lefts", lefts)
    return torch.ops.kfac_ext.kron_matmul(lefts, list(mats), list(rights))


def precondition_inverse(
    g_inverses: Sequence[Tensor], grads: Sequence[Tensor], a_inverses: Sequence[Tensor]
) -> list[Tensor]:
    """The K-FAC update in inverse form, ``G⁻¹ ∇W̄ A⁻¹`` per layer, i.e. ``(G ⊗ A)⁻¹ vec(∇W̄)``.

    Args:
        g_inverses: ``[out_i, out_i]`` damped inverses of G (from :func:`damped_inverse`).
        grads: ``[out_i, in_i (+1)]`` gradients ``∇W̄ = [∇W | ∇b]``.
        a_inverses: ``[in_i (+1), in_i (+1)]`` damped inverses of A (symmetric, so ``A⁻¹ᵀ = A⁻¹``).
    """
    return kron_matmul(g_inverses, grads, a_inverses)


def precondition_eigen(
    g_eigenvectors: Sequence[Tensor],
    g_eigenvalues: Sequence[Tensor],
    grads: Sequence[Tensor],
    a_eigenvectors: Sequence[Tensor],
    a_eigenvalues: Sequence[Tensor],
    damping: float | Sequence[float],
) -> list[Tensor]:
    """The K-FAC update in eigenbasis form, ``(G ⊗ A + γI)⁻¹ vec(∇W̄)`` per layer:
    ``Q_G ((Q_Gᵀ ∇W̄ Q_A) / (λ_G λ_Aᵀ + γ)) Q_Aᵀ``, the division fused into one pass.

    Args:
        g_eigenvectors, g_eigenvalues: ``[out_i, out_i]`` and ``[out_i]`` from :func:`eigen_decompose` of G.
        grads: ``[out_i, in_i (+1)]``, any supported float dtype; results come back in it.
        a_eigenvectors, a_eigenvalues: ``[in_i (+1), in_i (+1)]`` and ``[in_i (+1)]`` of A.
        damping: ``γ >= 0`` per layer or one for all. With ``γ = 0`` a zero eigenvalue product
            divides by zero; pass ``γ > 0`` unless the factors are known to be positive definite.
            Factored (Tikhonov) damping is ``λ_G + γ_G``, ``λ_A + γ_A`` added by the caller.

    An entry may be batched: a leading ``k_i`` on its eigenvectors, eigenvalues and gradient.
    """
    grads = _nonempty("precondition_eigen", "grads", grads)
    return torch.ops.kfac_ext.precondition_eigen(
        list(g_eigenvectors),
        list(g_eigenvalues),
        grads,
        list(a_eigenvectors),
        list(a_eigenvalues),
        _per_layer(damping, len(grads), "damping", float),
    )


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
    """One step of Adam in each layer's Kronecker eigenbasis (SOAP's idea with K-FAC's
    factors): the gradient rotated to ``ĝ = Q_Gᵀ ∇W̄ Q_A``; where ``keep``, in place,
    ``m ← β₁m + (1-β₁)ĝ``, ``v ← β₂v + (1-β₂)ĝ²`` (``torch.lerp``'s rounding) and ``step += 1``;
    returned, the bias-corrected step rotated back, ``Q_G (m̂ / (√v̂ + ε)) Q_Aᵀ`` with
    ``m̂ = m / (1-β₁ᵗ)``, ``v̂ = v / (1-β₂ᵗ)``, ``t = max(step, 1)``. With ``keep`` False nothing
    changes (the caller masks the returned step). Rotation, moments and the step are one fused
    pass per layer on CPU; on CUDA ``keep`` is read on the device (no synchronization).

    Args:
        g_eigenvectors: ``[out_i, out_i]`` eigenvectors of G, float32 or float64 (the dtype of
            the moments and of the arithmetic).
        grads: ``[out_i, in_i (+1)]``, any supported float dtype, contiguous; results come back in it.
        a_eigenvectors: ``[in_i (+1), in_i (+1)]`` eigenvectors of A, or None for a diagonal A
            (an embedding: its basis is the identity).
        exp_avgs, exp_avg_sqs: ``m`` and ``v``, shaped like ``grads[i]``, in the eigenvectors'
            dtype, contiguous; updated in place.
        steps: 0-d float32 step counts, updated in place.
        keep: 0-d bool on the layers' device: False leaves every moment and count as it was.
        beta1, beta2: in ``[0, 1)``; eps: ``> 0``.
    """
    grads = _nonempty("eigen_adam", "grads", grads)
    directions = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]
    torch.ops.kfac_ext.eigen_adam(list(g_eigenvectors), grads, list(a_eigenvectors), list(exp_avgs), list(exp_avg_sqs),
                                  list(steps), keep, float(beta1), float(beta2), float(eps), directions)
    return directions


# ---- fake implementations: shapes and dtypes only, so the ops trace under torch.compile -------


@torch.library.register_fake("kfac_ext::factor_update")
def _(factors, xs, decay, scales, append_ones):
    return None


@torch.library.register_fake("kfac_ext::damped_inverse")
def _(factors, damping):
    status = factors[0].new_empty((len(factors),), dtype=torch.int32)
    return [torch.empty_like(f) for f in factors], status


@torch.library.register_fake("kfac_ext::eigen_decompose")
def _(factors):
    status = factors[0].new_empty((len(factors),), dtype=torch.int32)
    eigenvalues = [f.new_empty((f.shape[0],)) for f in factors]
    return eigenvalues, [torch.empty_like(f) for f in factors], status


@torch.library.register_fake("kfac_ext::kron_matmul")
def _(lefts, mats, rights):
    return [c.new_empty((*c.shape[:-2], l.shape[-2], r.shape[-2])) for l, c, r in zip(lefts, mats, rights)]


@torch.library.register_fake("kfac_ext::precondition_eigen")
def _(g_eigenvectors, g_eigenvalues, grads, a_eigenvectors, a_eigenvalues, damping):
    return [torch.empty_like(g) for g in grads]


@torch.library.register_fake("kfac_ext::eigen_adam")
def _(g_eigenvectors, grads, a_eigenvectors, exp_avgs, exp_avg_sqs, steps, keep, beta1, beta2, eps, directions):
    return None
