"""The losses K-FAC understands, as negative log-likelihoods of an output distribution.

A loss ``L`` as the user computes it is ``mean_n ℓ_n`` (``reduction="mean"``) or ``sum_n ℓ_n``
(``"sum"``), where ``ℓ_n`` is the per-example term of example ``n`` (row ``n`` of the model
output ``z``; trailing dimensions are flattened into ``D`` outputs per example). Note that
PyTorch's ``mse_loss``/``binary_cross_entropy_with_logits`` with ``"mean"`` average over all
``N·D`` elements, so their ``ℓ_n`` carries a ``1/D``.

Each loss gives what the Fisher estimators need, all w.r.t. ``z_n``:

* ``sample_output_grads(z, generator, mask)``: ``v_n = ∇ℓ_n`` at targets sampled from the model's
  predictive distribution (the "true" Fisher by Monte Carlo, seed §7), so ``E[v vᵀ] = ∇²ℓ_n``
  (where ``ℓ_n`` is ``w`` times a negative log-likelihood, ``v = √w ∇NLL``),
* ``hessian_sqrt(z, mask)``: ``K`` columns ``c_k`` with ``Σ_k c_k c_kᵀ = ∇²ℓ_n`` (the exact
  expectation over targets, "type-2", seed App. A; exact for these exponential families),
* ``hessian(z)``: ``∇²ℓ_n`` itself, dense, for the exact small-model Fisher,
* ``num_terms(z, mask)``: the ``M`` that ``reduction="mean"`` divides by.

Cross-entropy takes logits ``[..., C]``: every leading index is a term (a token of a ``[B, T, C]``
language-model output), and ``mask`` (``[...]``, bool; default all) says which terms the loss
counts — positions whose label is ``ignore_index`` or padding carry no curvature. A token-mean
loss is ``(1/M) Σ ℓ_t`` over the ``M`` counted tokens, so ``M`` is the number of counted tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Loss", "CrossEntropy", "MSE", "BCEWithLogits", "make_loss"]


class Loss:
    """Base class; ``reduction`` is ``"mean"`` or ``"sum"`` over examples."""

    name = ""

    def __init__(self, reduction: str = "mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{self.name}: reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        per_example = self.per_example(output, target)
        return per_example.mean() if self.reduction == "mean" else per_example.sum()

    def per_example(self, output: Tensor, target: Tensor) -> Tensor:
        """``[N]`` per-example terms ``ℓ_n``."""
        raise NotImplementedError

    def per_example_grad_scale(self, batch_size: int) -> float:
        """``∂ℓ_n/∂z_n = scale · ∂L/∂z_n``: undoes the mean's ``1/N``."""
        return float(batch_size) if self.reduction == "mean" else 1.0

    def num_terms(self, output: Tensor, mask: Tensor | None = None) -> int | Tensor:
        """``M``: the number of terms ``ℓ_n`` (``"mean"`` divides by it): the leading dimension
        (an int; a 0-d tensor where a loss counts it from a mask)."""
        return output.shape[0]

    def sample_output_grads(self, output: Tensor, generator: torch.Generator | None, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def hessian_sqrt(self, output: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[K, *output.shape]``: ``Σ_k c_k[n] c_k[n]ᵀ = ∇²_{z_n} ℓ_n`` for every ``n``."""
        raise NotImplementedError

    def hessian(self, output: Tensor) -> Tensor:
        """``[N, D, D]`` dense ``∇²_{z_n} ℓ_n``."""
        c = self.hessian_sqrt(output).flatten(2)  # [K, N, D]
        return torch.einsum("knd,kne->nde", c, c)


class CrossEntropy(Loss):
    """``ℓ_n = -log softmax(z_n)[y_n]`` for logits ``z`` of shape ``[..., C]`` (every leading
    index a term ``n``), integer targets ``[...]``; targets equal to ``ignore_index`` are not
    counted (as in ``F.cross_entropy``)."""

    name = "cross_entropy"

    def __init__(self, reduction: str = "mean", ignore_index: int = -100):
        super().__init__(reduction)
        self.ignore_index = ignore_index

    def per_example(self, output, target):
        return F.cross_entropy(output, target, reduction="none", ignore_index=self.ignore_index)

    def num_terms(self, output, mask=None):
        # Counted from a mask, M stays a 0-d tensor on the device: reading it would synchronize.
        return mask.sum() if mask is not None else output.numel() // output.shape[-1]

    def sample_output_grads(self, output, generator, mask=None):
        log_p = torch.log_softmax(_stat(output), dim=-1)
        # Gumbel-max, y = argmax(log p - log(-log u)), u ~ U[0, 1): a draw from p that, unlike
        # torch.multinomial, neither checks the probabilities on the host nor asserts on the device
        # when the logits hold NaN/inf (the factor update's finite check then drops the step).
        u = torch.rand(log_p.shape, generator=generator, device=log_p.device, dtype=log_p.dtype)
        y = (log_p - torch.log(-torch.log(u))).argmax(-1)
        p = log_p.exp()
        v = p - F.one_hot(y, p.shape[-1]).to(p.dtype)
        return _masked(v, mask).to(output.dtype)

    def hessian_sqrt(self, output, mask=None):
        p = torch.softmax(_stat(output), dim=-1)  # [..., C]
        eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
        # c_k = sqrt(p_k) (e_k - p): Σ_k p_k (e_k - p)(e_k - p)ᵀ = diag(p) - p pᵀ
        cols = p.movedim(-1, 0).sqrt().unsqueeze(-1) * (eye.reshape(-1, *[1] * (p.dim() - 1), p.shape[-1]) - p)
        return _masked(cols, mask).to(output.dtype)


def _masked(v: Tensor, mask: Tensor | None) -> Tensor:
    """``v`` (``[..., C]``, or ``[K, ..., C]``) with the terms outside ``mask`` zeroed."""
    if mask is None:
        return v
    return v * mask.to(v.dtype).unsqueeze(-1)


class _Elementwise(Loss):
    """Losses that are a sum over the ``D`` output elements of an example (mean: ``/D``)."""

    def _element_weight(self, output: Tensor) -> float:
        d = output[0].numel() if output.dim() > 1 else 1
        return 1.0 / d if self.reduction == "mean" else 1.0

    def _per_element(self, output, target) -> Tensor:
        raise NotImplementedError

    def per_example(self, output, target):
        elements = self._per_element(output, target).reshape(output.shape[0], -1)
        return elements.sum(1) * self._element_weight(output)

    def _diag_hessian_sqrt(self, output: Tensor, diag: Tensor) -> Tensor:
        # One column per output element: c_k = sqrt(h_k) e_k.
        d = diag[0].numel()
        flat = diag.reshape(diag.shape[0], d).sqrt()
        cols = torch.diag_embed(flat).permute(2, 0, 1)  # [D, N, D]
        return cols.reshape(d, *output.shape).to(output.dtype)


class MSE(_Elementwise):
    """``ℓ_n = w Σ_j (z_nj - y_nj)²`` with ``w = 1/D`` for ``"mean"`` (``F.mse_loss``), else 1.

    As a likelihood: a Gaussian whose negative log-density has the same Hessian, ``2w I``; the
    Monte Carlo targets are ``y ~ N(z, σ²I)`` with ``σ² = 1/(2w)``.
    """

    name = "mse"

    def _per_element(self, output, target):
        return (output - target) ** 2

    def sample_output_grads(self, output, generator, mask=None):
        w = self._element_weight(output)
        noise = torch.randn(output.shape, generator=generator, device=output.device, dtype=_stat(output).dtype)
        # ∇ℓ = 2w (z - y) = -2w σ ε with 2wσ = sqrt(2w): the sign does not matter for g gᵀ.
        return (math.sqrt(2.0 * w) * noise).to(output.dtype)

    def hessian_sqrt(self, output, mask=None):
        diag = torch.full_like(_stat(output), 2.0 * self._element_weight(output))
        return self._diag_hessian_sqrt(output, diag)


class BCEWithLogits(_Elementwise):
    """``ℓ_n = w Σ_j BCE(z_nj, y_nj)`` (independent Bernoullis with logits ``z``), ``w`` as in MSE."""

    name = "bce_with_logits"

    def _per_element(self, output, target):
        return F.binary_cross_entropy_with_logits(output, target.to(output.dtype), reduction="none")

    def sample_output_grads(self, output, generator, mask=None):
        s = torch.sigmoid(_stat(output))
        # y ~ Bernoulli(s) as u < s: unlike torch.bernoulli, no device assert on a NaN probability.
        y = (torch.rand(s.shape, generator=generator, device=s.device, dtype=s.dtype) < s).to(s.dtype)
        # ℓ_n is w times a Bernoulli NLL: sqrt(w) ∇NLL has E[v vᵀ] = w diag(s(1-s)) = ∇²ℓ_n.
        return (math.sqrt(self._element_weight(output)) * (s - y)).to(output.dtype)

    def hessian_sqrt(self, output, mask=None):
        s = torch.sigmoid(_stat(output))
        return self._diag_hessian_sqrt(output, self._element_weight(output) * s * (1 - s))


def _stat(output: Tensor) -> Tensor:
    """The output detached, in at least float32 (statistics never in bf16/fp16)."""
    return output.detach().to(torch.promote_types(output.dtype, torch.float32))


_BY_NAME = {cls.name: cls for cls in (CrossEntropy, MSE, BCEWithLogits)}


def make_loss(loss: str | nn.Module | Loss | None, reduction: str = "mean") -> Loss | None:
    """A :class:`Loss` from a name (``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``), a
    ``torch.nn`` loss module (``CrossEntropyLoss``, ``MSELoss``, ``BCEWithLogitsLoss`` with their
    default options), or a :class:`Loss`. ``None`` stays ``None``.
    """
    if loss is None or isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss not in _BY_NAME:
            raise ValueError(f"loss must be one of {sorted(_BY_NAME)}, got {loss!r}")
        return _BY_NAME[loss](reduction)
    if isinstance(loss, nn.CrossEntropyLoss):
        unsupported = loss.weight is not None or loss.label_smoothing != 0.0
        made = _from_module(loss, CrossEntropy, unsupported, "weight or label_smoothing")
        made.ignore_index = loss.ignore_index
        return made
    if isinstance(loss, nn.MSELoss):
        return _from_module(loss, MSE, False, "")
    if isinstance(loss, nn.BCEWithLogitsLoss):
        unsupported = loss.weight is not None or loss.pos_weight is not None
        return _from_module(loss, BCEWithLogits, unsupported, "weight or pos_weight")
    raise ValueError(
        f"unsupported loss {type(loss).__name__}: use 'cross_entropy', 'mse', 'bce_with_logits', "
        "their torch.nn modules, or fisher_type='empirical' with loss=None"
    )


def _from_module(module: nn.Module, cls: type[Loss], unsupported: bool, what: str) -> Loss:
    if unsupported:
        raise ValueError(f"{type(module).__name__} with {what} is not a likelihood K-FAC supports")
    if module.reduction not in ("mean", "sum"):
        raise ValueError(f"{type(module).__name__}: reduction must be 'mean' or 'sum', got {module.reduction!r}")
    return cls(module.reduction)
