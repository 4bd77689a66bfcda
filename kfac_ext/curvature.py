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
        self._folded: Folded | None = None  # this step's micro-batches already in the factors

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
        self._folded = None

    def update(self, blocks: list[Block], stats: Statistics, grads_finite: Tensor, decay: Callable[[], float],
               topology: Local, counters: dict) -> bool | None:
        """``F ← ρ F + (1-ρ) F_step`` for every block with statistics, then the mean over the
        ranks. Returns False iff the gradients were not finite (nothing is updated), None when
        no block captured anything (gradients finite), else True (also when the statistics were
        not finite: that update is skipped and counted). The gradients' and the statistics' finite
        flags are read back together: one synchronization per factor step. After :meth:`fold`,
        :meth:`_finish_folding` instead."""
        if self._folded is not None:
            return self._finish_folding(blocks, stats, grads_finite, topology, counters)
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

    def fold(self, blocks: list[Block], stats: Statistics, rho: float, k: int) -> None:
        """Moves the step's micro-batches reduced so far into the factors now, so that gradient
        accumulation holds no factor-sized sums beside the factors. A block's first fold in a
        step scales its factor by ``ρ`` (a factor this step creates starts at 0); each micro-batch
        then adds ``(1-ρ)/k`` times its ``Σāāᵀ / rows`` and ``Σ w g gᵀ`` if its statistics are
        finite (decided on the device: no synchronization). :meth:`update` divides by the weight
        this adds up to, ``ρ + (1-ρ) m/k`` for the ``m`` finite micro-batches that ran the block:
        with all ``k`` finite and as many rows each, the factors of one step on their
        concatenation."""
        a_sum, a_rows, g_sum, forwards = stats.take_sums()
        have = [b for b in blocks if b.name in a_sum and b.name in g_sum]
        if not have or forwards <= 0:
            return
        folded = self._folded = self._folded or Folded(rho, k)
        folded.flags.append(all_finite([t for b in have for t in (a_sum[b.name], g_sum[b.name])]))
        weight = (1 - rho) / k
        for block in have:
            folded.add(block.name, forwards, self.a, self.g)
            a = (a_sum[block.name], weight * forwards / a_rows[block.name])
            g = (g_sum[block.name], weight)
            for store, (total, scale) in ((self.a, a), (self.g, g)):
                masked = torch.where(folded.flags[-1], total, 0.0)
                if block.name in store:
                    store[block.name].add_(masked, alpha=scale)
                else:
                    store[block.name] = masked.mul_(scale)

    def _finish_folding(self, blocks: list[Block], stats: Statistics, grads_finite: Tensor, topology: Local,
                        counters: dict) -> bool:
        """:meth:`update` after :meth:`fold`: the last micro-batch folded too, every folded factor
        divided by the weight its finite micro-batches add up to, and averaged over the ranks —
        also when the gradients are not finite (then the step is skipped, but the finite
        micro-batches' statistics stay in the factors). One synchronization, as in update()."""
        self.fold(blocks, stats, self._folded.rho, self._folded.k)
        folded, self._folded = self._folded, None
        topology.require_every_block([b.name for b in blocks if b.name not in folded.folds])
        grads_ok, *finite = torch.stack([grads_finite, *folded.flags]).tolist()
        for name, folds in folded.folds.items():
            finite_forwards = sum(forwards for i, forwards in folds if finite[i])
            total = folded.old_weight[name] + (1 - folded.rho) * finite_forwards / folded.k
            if total == 0:  # created this step, and no finite micro-batch ran it: no factor yet
                del self.a[name], self.g[name]
            elif total != 1:
                self.a[name].div_(total)
                self.g[name].div_(total)
        names = [name for name in folded.folds if name in self.a]
        topology.average([self.a[name] for name in names] + [self.g[name] for name in names])
        counters["factor_updates"] += any(finite)  # statistics went in
        if not grads_ok:
            return False  # the caller counts the skipped step
        counters["skipped_factor_updates"] += not all(finite)
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


class Folded:
    """A step's micro-batches already in the factors (:meth:`Curvature.fold`): ``ρ``, ``k``,
    one device flag per fold ("its statistics were finite"); per block, the weight its old
    factor kept (``ρ``, or 0 for a factor this step created) and its folds as ``(flag index,
    forwards)``."""

    def __init__(self, rho: float, k: int):
        self.rho, self.k = rho, k
        self.flags: list[Tensor] = []
        self.old_weight: dict[str, float] = {}
        self.folds: dict[str, list[tuple[int, int]]] = {}

    def add(self, name: str, forwards: int, a: dict[str, Tensor], g: dict[str, Tensor]) -> None:
        """Records the current fold for block ``name``; on its first, scales its factors by ``ρ``."""
        if name not in self.folds:
            self.folds[name] = []
            self.old_weight[name] = self.rho if name in a else 0.0
            if name in a:
                a[name].mul_(self.rho)
                g[name].mul_(self.rho)
        self.folds[name].append((len(self.flags) - 1, forwards))
