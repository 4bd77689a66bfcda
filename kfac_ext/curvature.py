"""Per-block curvature: the Kronecker factors A and G as exponential moving averages of each
step's statistics, and how the damping γ is split between them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .util import all_finite

if TYPE_CHECKING:
    from .capture import Statistics
    from .layers import Block
    from .topology import Local


class Curvature:
    """``a`` and ``g``: ``{block name: factor}`` (A of an embedding is its diagonal, a vector),
    present once a block's first update initialised them."""

    def __init__(self):
        self.a: dict[str, Tensor] = {}
        self.g: dict[str, Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.a)

    def factors(self, blocks: list[Block]) -> dict[str, tuple[Tensor, Tensor]]:
        return {b.name: (self.a[b.name], self.g[b.name]) for b in blocks if b.name in self.a}

    def tensors(self) -> list[Tensor]:
        return list(self.a.values()) + list(self.g.values())

    def state(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {name: (self.a[name], self.g[name]) for name in self.a}

    def load(self, factors: dict[str, tuple[Tensor, Tensor]], move: Callable[[str, Tensor], Tensor]) -> None:
        """``factors`` as :meth:`state` gives them, each through ``move(block name, tensor)``."""
        self.a = {name: move(name, a) for name, (a, _) in factors.items()}
        self.g = {name: move(name, g) for name, (_, g) in factors.items()}

    def update(self, blocks: list[Block], stats: Statistics, grads_finite: Tensor, decay: Callable[[], float],
               topology: Local, counters: dict) -> bool | None:
        """``F ← ρ F + (1-ρ) F_step`` for every block with statistics, then the mean over the
        ranks. Returns False iff the gradients were not finite (nothing is updated), None when
        no block captured anything (gradients finite), else True (also when the statistics were
        not finite: that update is skipped and counted). The gradients' and the statistics' finite
        flags are read back together: one synchronization per factor step."""
        have = [b for b in blocks if b.name in stats.a_sum and b.name in stats.g_sum]
        topology.require_every_block([b.name for b in blocks if b not in have] if len(have) != len(blocks) else [])
        if not have:
            return False if not bool(grads_finite) else None
        # This step's A = Σāāᵀ / rows and G = Σ w g gᵀ / forwards: the sums with their weights,
        # so the moving average scales each sum once (no separate division pass).
        a_steps = [(stats.a_sum[b.name], 1.0 / stats.a_rows[b.name]) for b in have]
        g_steps = [(stats.g_sum[b.name], 1.0 / stats.forwards) for b in have]
        stats_finite = topology.agree(all_finite([t for t, _ in a_steps + g_steps]))
        grads_ok, stats_ok = torch.stack([grads_finite, stats_finite]).tolist()
        if not grads_ok:
            return False
        if not stats_ok:
            counters["skipped_factor_updates"] += 1
            return True
        rho = decay()
        for block, a, g in zip(have, a_steps, g_steps):
            for store, (total, weight) in ((self.a, a), (self.g, g)):
                if block.name in store:
                    store[block.name].mul_(rho).add_(total, alpha=(1 - rho) * weight)
                else:  # out of place: blocks sharing their inputs share one sum
                    store[block.name] = total * weight
        topology.average([self.a[b.name] for b in have] + [self.g[b.name] for b in have])
        counters["factor_updates"] += 1
        return True

    def damped(self, blocks: list[Block], gamma: float, mode: str, dtype: torch.dtype
               ) -> tuple[list[Tensor], list[float]]:
        """Every block's A, then every block's G, in ``dtype``, with the damping each gets:
        ``√γ`` each (``"tikhonov"``), ``π√γ`` and ``√γ/π`` with ``π² = (tr A / a_dim) /
        (tr G / g_dim)`` (``"pi"``, Martens & Grosse 2015 §6.3), or none (``"eigen"``, exact
        ``λ_G λ_Aᵀ + γ`` at preconditioning time)."""
        if gamma <= 0 or not math.isfinite(gamma):
            raise ValueError(f"KFACPreconditioner: damping must be finite and > 0, got {gamma}")
        factors = [self.a[b.name].to(dtype) for b in blocks] + [self.g[b.name].to(dtype) for b in blocks]
        n = len(blocks)
        if mode == "eigen":
            return factors, [0.0] * (2 * n)
        root = math.sqrt(gamma)
        if mode == "tikhonov":
            return factors, [root] * (2 * n)
        traces = torch.stack([torch.stack([_trace(self.a[b.name]) / b.a_dim, self.g[b.name].trace() / b.g_dim])
                              for b in blocks]).tolist()
        pis = [math.sqrt(ta / tg) if ta > 0 and tg > 0 and math.isfinite(ta / tg) else 1.0 for ta, tg in traces]
        return factors, [pi * root for pi in pis] + [root / pi for pi in pis]


def _trace(factor: Tensor) -> Tensor:
    return factor.sum() if factor.dim() == 1 else factor.trace()
