"""Exact natural gradients for small models: the oracle K-FAC approximates.

Everything here works on the whole parameter vector of a model, with no Kronecker structure, so
it is for small models and tests: the dense Fisher, Fisher-vector products, the damped natural
gradient by a dense solve, and by truncated conjugate gradient on Fisher-vector products.

Conventions (as in :mod:`kfac_ext.losses`):

* The loss as the user computes it is ``L(θ) = w Σ_n ℓ_n`` with ``w = 1/N`` (``reduction="mean"``)
  or ``1`` (``"sum"``), where ``ℓ_n`` is the per-example term of example ``n`` (row ``n`` of the
  model output ``z``, trailing dimensions flattened into ``D`` outputs per example).
* The Fisher of that loss (seed eq. 47, a generalised Gauss-Newton matrix, App. A) is
  ``F = w Σ_n J_nᵀ H_n J_n`` with ``J_n = ∂z_n/∂θ`` (``[D, P]``) and ``H_n = ∇²_{z_n} ℓ_n``
  (``[D, D]``, :meth:`Loss.hessian`). For a model that is linear in ``θ`` it is the Hessian of
  ``L``.
* ``θ`` is the flat ``[P]`` vector of the parameters with ``requires_grad``, in
  ``model.named_parameters()`` order, each flattened row-major (:func:`flatten_params`).
* Everything is computed in the dtype and on the device of the model's parameters, at the
  parameters' current values; results carry no autograd history. The model is called as it is
  (put it in ``eval()`` mode for dropout/batch-norm); it must be a pure function of its
  parameters and inputs, since it runs under ``torch.func`` transforms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacfwd, jacrev, jvp, vjp

from .losses import Loss, make_loss

__all__ = [
    "flatten_params",
    "unflatten_params",
    "exact_fisher",
    "fisher_vector_product",
    "loss_gradient",
    "natural_gradient",
    "conjugate_gradient",
    "cg_natural_gradient",
]


# ---- parameter vectors -----------------------------------------------------------------------


def _named_params(model: nn.Module) -> list[tuple[str, Tensor]]:
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters with requires_grad")
    return params


def flatten_params(model: nn.Module) -> Tensor:
    """The model's parameters as one vector ``θ``.

    Args:
        model: the model; only parameters with ``requires_grad`` count.

    Returns:
        ``[P]`` detached copy of the parameters in ``model.named_parameters()`` order, each
        flattened row-major, in their (common) dtype and device.
    """
    return torch.cat([p.detach().reshape(-1) for _, p in _named_params(model)])


def unflatten_params(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    """Split a flat vector into the model's parameter shapes (inverse of :func:`flatten_params`).

    Args:
        model: the model whose parameter names and shapes to use.
        flat: ``[P]`` vector laid out as :func:`flatten_params` lays it out.

    Returns:
        ``{name: tensor}`` of views into ``flat`` with each parameter's shape, ready for
        ``torch.func.functional_call(model, params, inputs)``. Gradients flow back to ``flat``.
    """
    params = _named_params(model)
    size = sum(p.numel() for _, p in params)
    if flat.dim() != 1 or flat.numel() != size:
        raise ValueError(
            f"unflatten_params: flat must have shape [{size}] for {type(model).__name__}, "
            f"got {tuple(flat.shape)}"
        )
    out, offset = {}, 0
    for name, p in params:
        out[name] = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    return out


def _output_fn(model: nn.Module, inputs: Tensor) -> Callable[[Tensor], Tensor]:
    """``θ ↦ z(θ)``: the model output as a function of the flat parameter vector."""

    def output(theta: Tensor) -> Tensor:
        return functional_call(model, unflatten_params(model, theta), (inputs,))

    return output


def _as_loss(loss: Loss | str | nn.Module) -> Loss:
    out = make_loss(loss)
    if out is None:
        raise ValueError("loss must be a Loss, a loss name or a torch.nn loss module, got None")
    return out


def _batch_weight(loss: Loss, batch_size: int) -> float:
    """``w`` in ``L = w Σ_n ℓ_n``: ``1/N`` for ``"mean"``, 1 for ``"sum"``."""
    return 1.0 / loss.per_example_grad_scale(batch_size)


def _per_example(z: Tensor) -> Tensor:
    """``[N, D]`` view of an output ``[N, *]`` (a 1-D output has ``D = 1``)."""
    return z.reshape(z.shape[0], -1)


# ---- the Fisher ------------------------------------------------------------------------------


def _output_jacobian(model: nn.Module, inputs: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """The output ``[N, D]`` and its dense Jacobian ``[N, D, P]`` at ``theta``."""
    f = _output_fn(model, inputs)

    def flat_output(t: Tensor) -> tuple[Tensor, Tensor]:
        z = _per_example(f(t))
        return z, z

    # Forward mode pushes P tangents, reverse mode pulls N·D cotangents: use the fewer.
    n_out = _per_example(f(theta)).numel()
    jac = jacfwd if theta.numel() <= n_out else jacrev
    jacobian, z = jac(flat_output, has_aux=True)(theta)
    return z.detach(), jacobian.detach()


def _jmj(jacobian: Tensor, curvature: Tensor, weight: float) -> Tensor:
    """``w Σ_n J_nᵀ M_n J_n`` for ``J [N, D, P]`` and ``M [N, D, D]``, symmetrised."""
    n, d, p = jacobian.shape
    mj = torch.einsum("nde,nep->ndp", curvature, jacobian)
    fisher = weight * (jacobian.reshape(n * d, p).T @ mj.reshape(n * d, p))
    return (fisher + fisher.T) / 2


def exact_fisher(
    model: nn.Module,
    inputs: Tensor,
    loss: Loss | str | nn.Module,
    *,
    method: str = "jmj",
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The dense Fisher ``F = w Σ_n J_nᵀ H_n J_n`` of the loss, or its Monte Carlo estimate.

    Materialises the ``[N, D, P]`` output Jacobian: small models only.

    Args:
        model: the model, called as ``model(inputs)``.
        inputs: the batch, ``[N, ...]``.
        loss: a :class:`~kfac_ext.losses.Loss` (or a name / ``torch.nn`` loss module accepted by
            :func:`~kfac_ext.losses.make_loss`); its ``reduction`` sets ``w``.
        method: ``"jmj"`` for the exact ``w Σ_n J_nᵀ H_n J_n`` with ``H_n`` from
            :meth:`Loss.hessian` (the "type-2" Fisher, seed eq. 47); ``"sampled"`` for the
            covariance of sampled log-likelihood gradients (seed §7),
            ``w Σ_n (1/S) Σ_s g_{n,s} g_{n,s}ᵀ`` with
            ``g_{n,s} = ∇_θ(v_{n,s}ᵀ z_n) = J_nᵀ v_{n,s}`` and ``v_{n,s}`` from
            :meth:`Loss.sample_output_grads`. It is unbiased and converges to ``"jmj"`` as
            ``samples`` grows. (It is accumulated as ``J_nᵀ (Σ_s v vᵀ / S) J_n``, the
            same sum, without forming the ``S·N`` gradients.)
        samples: ``S``, the number of sampled targets per example for ``"sampled"``.
        generator: random source for ``"sampled"``, on the parameters' device.

    Returns:
        ``[P, P]`` symmetric positive semi-definite Fisher, in the parameters' dtype.
    """
    if method not in ("jmj", "sampled"):
        raise ValueError(f"exact_fisher: method must be 'jmj' or 'sampled', got {method!r}")
    if method == "sampled" and (not isinstance(samples, int) or samples < 1):
        raise ValueError(f"exact_fisher: samples must be a positive int, got {samples!r}")
    loss = _as_loss(loss)
    theta = flatten_params(model)
    z, jacobian = _output_jacobian(model, inputs, theta)
    n, d = z.shape
    if method == "jmj":
        curvature = loss.hessian(z)
    else:
        repeated = z.unsqueeze(0).expand(samples, n, d).reshape(samples * n, d)
        v = loss.sample_output_grads(repeated, generator).reshape(samples, n, d)
        curvature = torch.einsum("snd,sne->nde", v, v) / samples
    return _jmj(jacobian, curvature.to(theta.dtype), _batch_weight(loss, n))


def _fisher_matvec(
    model: nn.Module, inputs: Tensor, loss: Loss
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``θ`` and ``v ↦ F v`` at ``θ``, sharing one reverse pass across calls."""
    theta = flatten_params(model)
    f = _output_fn(model, inputs)
    z, pullback = vjp(f, theta)
    z = z.detach()
    hessian = loss.hessian(_per_example(z)).to(theta.dtype)  # [N, D, D]
    weight = _batch_weight(loss, z.shape[0])

    def matvec(vector: Tensor) -> Tensor:
        if vector.shape != theta.shape:
            raise ValueError(
                f"fisher_vector_product: vector must have shape {tuple(theta.shape)}, "
                f"got {tuple(vector.shape)}"
            )
        _, jv = jvp(f, (theta,), (vector.to(theta),))  # J v, forward mode
        mjv = torch.einsum("nde,ne->nd", hessian, _per_example(jv))  # H_n (J v)_n
        (fv,) = pullback(mjv.reshape(z.shape))  # Jᵀ (H J v), reverse mode
        return weight * fv.detach()

    return theta, matvec


def fisher_vector_product(
    model: nn.Module, inputs: Tensor, loss: Loss | str | nn.Module, vector: Tensor
) -> Tensor:
    """``F v`` without forming ``F`` or ``J`` (seed eq. 43): ``w Jᵀ(H (J v))``.

    One Jacobian-vector product of the output (forward mode), the per-example output Hessians
    ``H_n`` (:meth:`Loss.hessian`, ``[N, D, D]``), and one vector-Jacobian product back to
    parameter space (reverse mode): about two forward-and-backward passes.

    Args:
        model: the model, called as ``model(inputs)``.
        inputs: the batch, ``[N, ...]``.
        loss: the loss (see :func:`exact_fisher`).
        vector: ``[P]`` direction in parameter space, laid out as :func:`flatten_params`.

    Returns:
        ``[P]`` Fisher-vector product in the parameters' dtype.
    """
    _, matvec = _fisher_matvec(model, inputs, _as_loss(loss))
    return matvec(vector)


# ---- gradients and natural gradients ---------------------------------------------------------


def loss_gradient(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss: Loss | str | nn.Module
) -> Tensor:
    """``∇_θ L`` for ``L = loss(model(inputs), targets)``.

    Args:
        model: the model, called as ``model(inputs)``.
        inputs: the batch, ``[N, ...]``.
        targets: the targets ``loss`` takes (class indices ``[N]`` for cross-entropy, else the
            output's shape).
        loss: the loss (see :func:`exact_fisher`).

    Returns:
        ``[P]`` gradient, laid out as :func:`flatten_params`.
    """
    loss = _as_loss(loss)
    f = _output_fn(model, inputs)
    return torch.func.grad(lambda t: loss(f(t), targets))(flatten_params(model)).detach()


def _check_damping(name: str, damping: float) -> float:
    damping = float(damping)
    if not damping >= 0.0:
        raise ValueError(f"{name}: damping must be >= 0, got {damping}")
    return damping


def natural_gradient(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss: Loss | str | nn.Module,
    damping: float,
) -> Tensor:
    """The exact damped natural gradient ``(F + βI)⁻¹ ∇L`` (seed eq. 17), by a dense solve.

    Args:
        model: the model, called as ``model(inputs)``.
        inputs: the batch, ``[N, ...]``.
        targets: the targets of ``loss``.
        loss: the loss (see :func:`exact_fisher`).
        damping: ``β >= 0``. With ``β = 0`` the Fisher must be non-singular (for cross-entropy
            it never is when the logits are linear in some parameters: adding the same amount to
            every logit leaves the softmax unchanged).

    Returns:
        ``[P]`` natural gradient (the update is ``θ - lr · result``).

    Raises:
        RuntimeError: ``F + βI`` is singular.
    """
    damping = _check_damping("natural_gradient", damping)
    loss = _as_loss(loss)
    fisher = exact_fisher(model, inputs, loss)
    grad = loss_gradient(model, inputs, targets, loss)
    damped = fisher + damping * torch.eye(fisher.shape[0], dtype=fisher.dtype, device=fisher.device)
    try:
        return torch.linalg.solve(damped, grad)
    except torch.linalg.LinAlgError as e:
        raise RuntimeError(
            f"natural_gradient: F + {damping}·I is singular for {type(model).__name__}; "
            "use damping > 0"
        ) from e


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    max_iters: int | None = None,
    tol: float = 1e-6,
) -> Tensor:
    """Solve ``A x = b`` for a symmetric positive definite ``A`` given as ``x ↦ A x``.

    Plain conjugate gradient from ``x = 0``, stopped after ``max_iters`` products or once
    ``||b - A x|| <= tol · ||b||`` (truncated CG; exact in at most ``b.numel()`` steps in exact
    arithmetic).

    Args:
        matvec: ``x ↦ A x``, taking and returning tensors of ``b``'s shape.
        b: right-hand side, any shape (treated as a flat vector).
        max_iters: most products with ``A``; ``None`` for ``b.numel()``.
        tol: relative residual at which to stop.

    Returns:
        ``x``, shaped like ``b``.

    Raises:
        RuntimeError: a search direction with ``pᵀ A p <= 0`` (``A`` is not positive definite).
    """
    if max_iters is None:
        max_iters = b.numel()
    if max_iters < 0:
        raise ValueError(f"conjugate_gradient: max_iters must be >= 0, got {max_iters}")
    if not tol >= 0.0:
        raise ValueError(f"conjugate_gradient: tol must be >= 0, got {tol}")
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = torch.sum(r * r)
    stop = tol * rr.sqrt().item()
    for it in range(max_iters):
        if rr.sqrt().item() <= stop:
            break
        ap = matvec(p)
        pap = torch.sum(p * ap)
        if not pap.item() > 0.0:
            raise RuntimeError(
                f"conjugate_gradient: pᵀAp = {pap.item():.3e} at iteration {it}: "
                "the operator is not positive definite"
            )
        alpha = rr / pap
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = torch.sum(r * r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def cg_natural_gradient(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss: Loss | str | nn.Module,
    damping: float,
    max_iters: int = 100,
    tol: float = 1e-6,
) -> Tensor:
    """The damped natural gradient by truncated CG on ``(F + βI) x = ∇L`` (seed §6).

    Uses only Fisher-vector products (:func:`fisher_vector_product`), so it never forms ``F``;
    each iteration costs about two forward-and-backward passes.

    Args:
        model: the model, called as ``model(inputs)``.
        inputs: the batch, ``[N, ...]``.
        targets: the targets of ``loss``.
        loss: the loss (see :func:`exact_fisher`).
        damping: ``β >= 0`` (``β > 0`` keeps the system positive definite).
        max_iters: most Fisher-vector products.
        tol: relative residual at which CG stops.

    Returns:
        ``[P]`` approximate natural gradient.
    """
    damping = _check_damping("cg_natural_gradient", damping)
    loss = _as_loss(loss)
    grad = loss_gradient(model, inputs, targets, loss)
    _, fvp = _fisher_matvec(model, inputs, loss)
    return conjugate_gradient(lambda v: fvp(v) + damping * v, grad, max_iters=max_iters, tol=tol)
