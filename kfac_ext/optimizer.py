"""``KFAC``: a ``torch.optim`` optimizer that preconditions with K-FAC, then takes an SGD step."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .preconditioner import KFACPreconditioner, Schedule, _value

__all__ = ["KFAC"]


class KFAC(torch.optim.SGD):
    """K-FAC preconditioning followed by SGD with momentum / weight decay (``torch.optim.SGD``
    semantics, so ``param_groups``, ``lr_scheduler`` and ``state_dict`` behave as usual).

    Parameters of layers K-FAC does not support get plain SGD. Usage (two changed lines)::

        optimizer = kfac_ext.KFAC(model, lr=0.05, momentum=0.9, loss="cross_entropy")
        for x, y in data:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    Args:
        model: the model whose parameters are optimized.
        lr: a number (schedulable by ``torch.optim.lr_scheduler``) or a callable of the step
            (then it overrides ``param_groups[*]["lr"]`` each step).
        momentum, weight_decay, nesterov: as in ``torch.optim.SGD``; weight decay is added to the
            preconditioned direction.
        adaptive_damping: Levenberg-Marquardt adaptation of the damping γ (Martens & Grosse 2015
            §6.5) every ``adaptive_damping_interval`` steps from the reduction ratio
            ρ = (L(θ+δ) − L(θ)) / M(δ) of the K-FAC quadratic model; needs ``step(closure)``.
        **preconditioner_kwargs: forwarded to :class:`KFACPreconditioner` (``loss``,
            ``fisher_type``, ``damping``, ``kl_clip``, ...). ``lr`` is shared with it (KL clipping).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: Schedule = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        adaptive_damping: bool = False,
        adaptive_damping_interval: int = 5,
        **preconditioner_kwargs: Any,
    ):
        self._lr_schedule = lr if callable(lr) else None
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, lr=float(_value(lr, 0)), momentum=momentum,
                         weight_decay=weight_decay, nesterov=nesterov)
        if adaptive_damping and callable(preconditioner_kwargs.get("damping")):
            raise ValueError("adaptive_damping adapts a number: pass damping as a float")
        self.preconditioner = KFACPreconditioner(model, lr=lambda step: self.param_groups[0]["lr"],
                                                 **preconditioner_kwargs)
        self.adaptive_damping = adaptive_damping
        self.adaptive_damping_interval = adaptive_damping_interval

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Preconditions the gradients and takes the SGD step. A step whose gradients are not
        finite changes no parameter (and is counted in ``preconditioner.stats``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._lr_schedule is not None:
            for group in self.param_groups:
                group["lr"] = float(self._lr_schedule(self.preconditioner.steps))
        adapt = self.adaptive_damping and self.preconditioner.steps % self.adaptive_damping_interval == 0
        if adapt and closure is None:
            raise ValueError("KFAC(adaptive_damping=True) needs step(closure) to evaluate the loss after the update")
        if not self.preconditioner.step():
            return loss
        if not _all_finite(self.param_groups):
            self.preconditioner.stats["nonfinite_grad_steps"] += 1
            return loss
        before = [p.detach().clone() for p in self._params()] if adapt else None
        super().step()
        if adapt:
            self._adapt_damping(float(loss.detach()), before, closure)
        return loss

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _adapt_damping(self, loss_before: float, before: list[torch.Tensor], closure) -> None:
        """γ ← γ·ω if ρ > 3/4, γ / ω if ρ < 1/4, with ω = (19/20)^interval (Martens & Grosse)."""
        precond = self.preconditioner
        with torch.enable_grad():
            was_training = precond.model.training
            precond.model.eval()  # no capture, no factor statistics from this evaluation
            try:
                loss_after = float(closure().detach())
            finally:
                precond.model.train(was_training)
        deltas = [p.detach() - b for p, b in zip(self._params(), before)]
        raw_grads = precond.last_raw_gradients
        gamma = float(precond.damping)
        model_change = self._quadratic_model(deltas, raw_grads, gamma)
        rho = (loss_after - loss_before) / model_change if model_change < 0 else -math.inf
        omega = (19 / 20) ** self.adaptive_damping_interval
        if rho > 0.75:
            gamma *= omega
        elif rho < 0.25:
            gamma /= omega
        precond.damping = gamma
        precond.stats["reduction_ratio"] = rho

    def _quadratic_model(self, deltas, raw_grads, gamma: float) -> float:
        """M(δ) − M(0) = ∇ᵀδ + ½ δᵀ(F + γI)δ with F ≈ blockdiag(G ⊗ A) on K-FAC layers."""
        precond = self.preconditioner
        delta_by_param = {p: d for p, d in zip(self._params(), deltas)}
        linear = 0.0
        quad = gamma * sum(float((d.double() ** 2).sum()) for d in deltas)
        factors = precond.factors()
        for layer, grad in zip(precond.layers, raw_grads):
            w = layer.module.weight
            dw = delta_by_param[w].reshape(w.shape[0], -1)
            if layer.has_bias:
                dw = torch.cat([dw, delta_by_param[layer.module.bias].unsqueeze(1)], 1)
            a, g = factors[layer.name]
            dw = dw.to(a.dtype)
            curvature = precond.ops.kron_matmul([g], [dw], [a])[0]
            quad += float((dw.double() * curvature.double()).sum())
            linear += float((grad.double() * dw.double()).sum())
        return linear + 0.5 * quad

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["kfac"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.preconditioner.load_state_dict(state_dict.pop("kfac"))
        super().load_state_dict(state_dict)


def _all_finite(param_groups) -> bool:
    grads = [p.grad for group in param_groups for p in group["params"] if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
