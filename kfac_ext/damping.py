"""Adaptive damping: Levenberg-Marquardt adaptation of γ (Martens & Grosse 2015 §6.5) from the
reduction ratio ρ = (L(θ+δ) − L(θ)) / M(δ) of the K-FAC quadratic model, asking the topology
which rank accounts for which terms."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .fsdp import local
from .util import kron_times

if TYPE_CHECKING:
    from .preconditioner import KFACPreconditioner


class AdaptiveDamping:
    """Every ``interval`` steps of ``precond``: γ ← γ·ω if ρ > 3/4, γ / ω if ρ < 1/4, with
    ω = (19/20)^interval. Needs the loss again after the update, from the step's closure."""

    def __init__(self, precond: KFACPreconditioner, interval: int):
        self.precond, self.interval = precond, interval

    def due(self) -> bool:
        return self.precond.steps % self.interval == 0

    def rng_state(self) -> tuple:
        """The random state before the closure runs (dropout masks), to evaluate L(θ + δ) alike."""
        return _rng_state(self.precond.blocks[0].device)

    def adapt(self, params: list[Tensor], loss_before: Tensor, before: list[Tensor], closure: Callable, rng) -> None:
        """``params`` moved from ``before`` by this step; ``loss_before`` = L(θ) from ``closure``
        under the random state ``rng``."""
        precond = self.precond
        topology = precond.topology
        mean_before = topology.mean(loss_before)  # every rank adapts alike
        loss_after = topology.mean(self._loss_as_before(closure, rng))
        deltas = {id(p): p.detach() - b for p, b in zip(params, before)}
        gamma = float(precond.damping)
        model_change = self._quadratic_model(params, deltas, gamma)
        rho = (loss_after - mean_before) / model_change if model_change < 0 else -math.inf
        omega = (19 / 20) ** self.interval
        if rho > 0.75:
            gamma *= omega
        elif rho < 0.25:
            gamma /= omega
        precond.damping = gamma
        precond.stats["reduction_ratio"] = rho

    def _loss_as_before(self, closure, rng) -> Tensor:
        """L(θ + δ) computed as L(θ) was: same mode, same random numbers (dropout masks), no
        statistics captured, and buffers (BatchNorm running stats) and RNG left as they were."""
        precond = self.precond
        buffers = [b.detach().clone() for b in precond.model.buffers()]
        after = _rng_state(precond.blocks[0].device)
        _set_rng_state(rng)
        try:
            with torch.enable_grad(), precond.pause():
                return closure().detach()
        finally:
            _set_rng_state(after)
            for b, saved in zip(precond.model.buffers(), buffers):
                b.copy_(saved)

    def _quadratic_model(self, params: list[Tensor], deltas: dict[int, Tensor], gamma: float) -> float:
        """M(δ) − M(0) = ∇ᵀδ + ½ δᵀ(F + γI)δ, F ≈ blockdiag(G ⊗ A) on the K-FAC blocks and 0 on
        the parameters the base optimizer moves alone (their ∇ᵀδ and γ‖δ‖² still count: L(θ+δ)
        sees their change too). Each block's terms come from a rank that holds its raw gradient
        and parameter changes whole (under FSDP2 its owner, which gets the changes by the
        gradients' exchange), the other parameters' from the local shards; the topology sums."""
        precond, topology = self.precond, self.precond.topology
        raw_grads = precond.last_raw_gradients
        terms = torch.zeros(2, dtype=torch.float64, device=precond.blocks[0].device)  # linear, quadratic
        factors = precond.factors()
        blocks = precond.blocks
        parts = {i: [deltas[id(p)] for p in b.params()] for i, b in enumerate(blocks)
                 if b.weight.grad is not None and b.name in factors}
        modelled = {id(p) for i in parts for p in blocks[i].params()}
        for i, block_deltas in topology.whole_on_owners(blocks, parts).items():
            block, grad = blocks[i], raw_grads[i]
            if block_deltas is None or not topology.accounts_for(block):
                continue
            dw = block.matrix(block_deltas[0], block_deltas[1] if block.bias is not None else None)
            a, g = factors[block.name]
            dw = dw.to(a.dtype)
            curvature = kron_times(g, dw, a, precond.ops)
            terms[0] += (grad.double() * dw.double()).sum()
            terms[1] += (dw.double() * (curvature.double() + gamma * dw.double())).sum()
        for p in params:
            if id(p) in modelled or p.grad is None or not topology.accounts_for_param(p):
                continue
            d = local(deltas[id(p)]).double()
            terms[0] += (local(p.grad).double() * d).sum()
            terms[1] += gamma * (d * d).sum()
        linear, quad = topology.model_total(terms).tolist()
        return linear + 0.5 * quad


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, device


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, device = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
