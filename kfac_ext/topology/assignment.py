"""Who inverts what: every factor's inversion has one owner rank, chosen by greedy
longest-processing-time first with cost ``n³`` (KAISA's ``WorkAssignment``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..layers import Block


def inversion_costs(blocks: Sequence[Block], colocate: bool) -> dict[str, float]:
    """Work items and their cost ``n³``: ``"<block>.A"`` and ``"<block>.G"`` each on their own,
    or (``colocate``) one item ``"<block>"`` costing ``a³ + g³``. A diagonal A costs ``n``
    (every rank inverts those itself)."""
    def a_cost(b):
        return float(b.a_dim) if b.a_diagonal else float(b.a_dim) ** 3

    if colocate:
        return {b.name: a_cost(b) + float(b.g_dim) ** 3 for b in blocks}
    costs = {}
    for b in blocks:
        costs[f"{b.name}.A"] = a_cost(b)
        costs[f"{b.name}.G"] = float(b.g_dim) ** 3
    return costs


def lpt_assignment(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Greedy longest-processing-time-first: items by decreasing cost (ties by name) each go to
    the least loaded rank (ties to the lowest rank). Deterministic, so every rank computes the
    same assignment from the same blocks.

    Balance: the most loaded rank carries at most ``avg + (1 - 1/p)·c`` where ``c`` is the cost
    of the last item it received (Graham), and at most ``4/3`` of the optimum. Whenever no more
    than ``world_size`` items cost more than half the average load (the usual case: many layers,
    or a few that dominate), that gives ``max(largest item, 1.5 × average)``. No assignment can
    promise that bound always: 5 equal items on 4 ranks put 2 on one rank, 1.6 × average.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0.0] * world_size
    owner = {}
    for name in sorted(costs, key=lambda k: (-costs[k], k)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[name] = rank
        loads[rank] += costs[name]
    return owner


def factor_owners(blocks: Sequence[Block], world_size: int, colocate: bool) -> dict[tuple[str, str], int]:
    """``{(block name, "A" | "G"): rank}``, identical on every rank; ``colocate``: a block's two
    factors have one owner (the rank that then holds its inverses and preconditions it)."""
    items = lpt_assignment(inversion_costs(blocks, colocate), world_size)
    if colocate:
        return {(b.name, s): items[b.name] for b in blocks for s in ("A", "G")}
    return {(b.name, s): items[f"{b.name}.{s}"] for b in blocks for s in ("A", "G")}
