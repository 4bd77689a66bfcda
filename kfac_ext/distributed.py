"""Distributed K-FAC on ``torch.distributed`` (gloo on CPU, NCCL on GPU), after KAISA
(Pauloski et al., SC'21, "KAISA: An Adaptive Second-Order Optimizer Framework for Deep Neural
Networks").

:class:`~kfac_ext.KFACPreconditioner` builds a :class:`DistributedContext` when a process group
is initialised with more than one rank, and calls it at four points of ``step()``. Every rank
calls the same collectives in the same order, so all ranks end every step with identical
factors, inverses, statistics and gradients:

1. **Factor-update steps.** The "this step's statistics are finite" flag is agreed by an
   all-reduce (one rank with a non-finite activation or output gradient makes every rank skip
   that factor update). Each rank updates its factors with its own micro-batch, then the factors
   are averaged by all-reduce. Because the factors were identical before the update,
   ``mean_r(ρF + (1-ρ)S_r) = ρF + (1-ρ) mean_r(S_r)``: with equal per-rank batches this is the
   factor a single process gets on the concatenated batch. The all-reduce is bucketed (a few
   flat buffers of at most ``bucket_cap_mb``, not one call per factor) and carries only the
   upper triangle of each symmetric factor, unpacked and mirrored so the result stays exactly
   symmetric.
2. **Inverse-update steps.** Every inversion has one owner rank (:func:`lpt_assignment`, greedy
   longest-processing-time first with cost ``n³``); only the owner inverts. The status codes are
   all-reduced, so a failed inversion leads every rank to the same fallback (the previous inverse
   or the identity). What is shared next depends on ``grad_worker_fraction``.
3. **Every step.** The "gradients are finite" flag is agreed by all-reduce.
4. **Preconditioning**, chosen by ``grad_worker_fraction`` (KAISA's names):

   * ``1.0`` (default, COMM-OPT): every rank is a gradient worker for every layer. The owners
     broadcast the inverses (upper triangle) or eigenvalues + eigenvectors after each inversion,
     one flat buffer per owner; every rank preconditions every layer. Communication only on
     inverse-update steps; every rank holds every inverse.
   * below ``1.0`` (MEM-OPT, KAISA's ``1/world``): a layer's two inversions have the same owner,
     which alone holds the layer's inverses, preconditions its gradient and broadcasts the
     result (one flat buffer per owner) at every step. Less memory and preconditioning work per
     rank; gradient-sized communication at every step. KAISA's hybrid fractions in between are
     not implemented: any value below 1 means one gradient worker per layer.

   Under FSDP2 (``fully_shard``) the gradients are row shards (DTensors, ``torch.chunk`` on dim
   0), and the modes become: ``1.0``, one all-gather of every rank's shards, then every rank
   preconditions every block and keeps its rows; below 1 (the default under FSDP2), one
   all-to-all sends each block's rows to its owner, which alone holds the block's inverses and
   its whole gradient, and one all-to-all sends every rank its rows of the result back. Summed
   over ``p`` ranks, per step, that is ``2(p-1)`` gradient shards' worth of bytes against
   ``p(p-1)`` for the all-gather (equal at 2 ranks, a third at 6), and no rank materialises a
   gradient it does not precondition. Each rank's piece is padded to ``ceil(rows / p)`` rows, so
   the pieces of one collective have one size.

Gradients themselves are averaged by ``DistributedDataParallel`` (or by the user, for an
unwrapped model under a process group), not here. ``comm_bytes`` counts, per category, the
bytes of the buffers handed to collectives (the payload; a ring all-reduce moves about
``2(p-1)/p`` times it per rank, a broadcast about once).

Checkpoints: factors, inverses and statistics are identical on all ranks, so a ``state_dict``
saved on rank 0 loads on any world size. Monte Carlo targets come from a per-rank stream (seed
+ rank). A loaded state continues its saved generator on the rank that saved it (the
``generator_rank`` entry); every other rank starts a fresh stream derived from (seed, rank,
step). With ``grad_worker_fraction < 1`` a rank saves only the inverses it owns; a resumed run
recomputes the missing ones from the saved factors at its first step (the same trajectory when
that step is an inverse-update step anyway).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .layers.base import check_row_sharded, chunk_rows

if TYPE_CHECKING:
    from .layers import Block
    from .preconditioner import KFACPreconditioner

__all__ = [
    "DistributedContext",
    "inversion_costs",
    "lpt_assignment",
    "setup",
    "unwrap_model",
]

#: Results of a factor held by another rank (``grad_worker_fraction < 1``): an empty tuple in
#: ``KFACPreconditioner._inv``, never used for preconditioning and never saved.
REMOTE: tuple = ()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` and ``torch.compile`` wrappers, in any
    nesting (so that layer, factor and ``state_dict`` names carry no ``module.`` or
    ``_orig_mod.`` prefix), or ``model`` itself."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(model, OptimizedModule):
            context = getattr(model, "dynamo_ctx", None)
            if getattr(context, "fullgraph", False) or getattr(context, "error_on_graph_break", False):
                raise ValueError(
                    "KFACPreconditioner: torch.compile(model, fullgraph=True) cannot work with K-FAC: "
                    "its capture hooks run eagerly between compiled pieces (a graph break at each "
                    "preconditioned layer, by design); compile without fullgraph=True"
                )
            model = model._orig_mod
        else:
            return model


def check_grad_worker_fraction(value: float | None) -> float | None:
    if value is None:  # chosen by the context: 0 for FSDP2-sharded parameters, else 1
        return None
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"grad_worker_fraction must be in [0, 1], got {value}")
    return value


def setup(
    precond: KFACPreconditioner,
    *,
    process_group: dist.ProcessGroup | None = None,
    grad_worker_fraction: float | None = None,
    seed: int = 0,
) -> DistributedContext | None:
    """A :class:`DistributedContext` for ``precond`` when ``torch.distributed`` is initialised
    with more than one rank in ``process_group`` (default: the world), else None (the
    single-process code path, unchanged)."""
    grad_worker_fraction = check_grad_worker_fraction(grad_worker_fraction)
    if not (dist.is_available() and dist.is_initialized()):
        return None
    _check_sharding(precond.blocks, process_group)  # FSDP2 on one rank too
    if dist.get_world_size(process_group) <= 1:
        return None
    return DistributedContext(precond, process_group, grad_worker_fraction, seed)


# ---- assignment --------------------------------------------------------------------------


def inversion_costs(layers: Sequence[Block], colocate: bool) -> dict[str, float]:
    """Work items and their cost ``n³``: ``"<layer>.A"`` and ``"<layer>.G"`` each on their own,
    or (``colocate``) one item ``"<layer>"`` costing ``a³ + g³``. A diagonal A costs ``n``
    (every rank inverts those itself, see :meth:`DistributedContext.invert`)."""
    def a_cost(l):
        return float(l.a_dim) if l.a_diagonal else float(l.a_dim) ** 3

    if colocate:
        return {l.name: a_cost(l) + float(l.g_dim) ** 3 for l in layers}
    costs = {}
    for l in layers:
        costs[f"{l.name}.A"] = a_cost(l)
        costs[f"{l.name}.G"] = float(l.g_dim) ** 3
    return costs


def lpt_assignment(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Greedy longest-processing-time-first: items by decreasing cost (ties by name) each go to
    the least loaded rank (ties to the lowest rank). Deterministic, so every rank computes the
    same assignment from the same layers.

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


# ---- packing -----------------------------------------------------------------------------

_TRIU: dict[tuple[int, torch.device], Tensor] = {}


def _triu_flat_indices(n: int, device: torch.device) -> Tensor:
    """Row-major flat indices of the upper triangle (diagonal included) of an ``[n, n]`` matrix,
    in the order of ``torch.triu_indices``; cached per size and device."""
    key = (n, torch.device(device))
    if key not in _TRIU:
        rows, cols = torch.triu_indices(n, n, device=device)
        _TRIU[key] = rows * n + cols
    return _TRIU[key]


def _triangle(n: int) -> int:
    return n * (n + 1) // 2


def _packed_size(f: Tensor) -> int:
    """Elements a factor takes in a flat buffer: a matrix's upper triangle, a vector whole."""
    return _triangle(f.shape[0]) if f.dim() == 2 else f.numel()


def pack_upper(m: Tensor, out: Tensor | None = None) -> Tensor:
    """The upper triangle of the square contiguous ``m`` as a flat ``[n(n+1)/2]`` tensor
    (written into ``out`` when given); a vector (a diagonal factor) is taken whole."""
    if m.dim() == 1:
        return out.copy_(m) if out is not None else m.clone()
    idx = _triu_flat_indices(m.shape[0], m.device)
    return torch.index_select(m.reshape(-1), 0, idx, out=out) if out is not None else m.reshape(-1)[idx]


def unpack_upper_(m: Tensor, flat: Tensor) -> Tensor:
    """Writes the upper triangle ``flat`` into the contiguous ``m`` and mirrors it: ``m`` is
    exactly symmetric (each lower entry is a copy, ``x + 0``, of its upper twin). A vector is
    copied whole."""
    if m.dim() == 1:
        return m.copy_(flat)
    m.view(-1).index_copy_(0, _triu_flat_indices(m.shape[0], m.device), flat)
    m.copy_(m.triu() + m.triu(1).mT)
    return m


def _buckets(sizes: Sequence[int], element_size: int, cap_bytes: int) -> list[list[int]]:
    """Consecutive indices grouped so each group's total stays under ``cap_bytes`` (a single
    larger item gets a group of its own)."""
    groups, current, total = [], [], 0
    for i, size in enumerate(sizes):
        nbytes = size * element_size
        if current and total + nbytes > cap_bytes:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += nbytes
    if current:
        groups.append(current)
    return groups


# ---- the per-preconditioner context ------------------------------------------------------


class DistributedContext:
    """Communication and work assignment of one :class:`~kfac_ext.KFACPreconditioner` over a
    process group of more than one rank. See the module docstring for what happens when.

    Attributes:
        rank, world_size: this process in ``group``.
        shares_gradients: ``grad_worker_fraction < 1``: owners precondition their layers and
            broadcast the result (scatter it, under FSDP2).
        sharded: the blocks' parameters are FSDP2 row shards (DTensors).
        owners: ``{(layer name, "A" | "G"): rank}``, identical on every rank.
        comm_bytes, comm_calls: per category (``"factors"``, ``"inverses"``, ``"gradients"``,
            ``"flags"``), the bytes handed to collectives and the number of collectives, summed
            since construction (reset them freely). The FSDP2 gradient exchanges count the bytes
            this rank sends to the others: ``p - 1`` times its shards for an all-gather, the
            parts for other ranks of an all-to-all.
    """

    def __init__(
        self,
        precond: KFACPreconditioner,
        group: dist.ProcessGroup | None,
        grad_worker_fraction: float | None,
        seed: int,
        bucket_cap_mb: float = 25.0,
    ):
        self.precond = precond
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        layers = precond.blocks
        self.sharded = any(isinstance(p, DTensor) for l in layers for p in l.params())  # checked by setup
        if grad_worker_fraction is None:  # FSDP2 users want memory: owners hold a layer's inverses
            grad_worker_fraction = 0.0 if self.sharded else 1.0
        self.grad_worker_fraction = grad_worker_fraction
        self.shares_gradients = grad_worker_fraction < 1.0
        self.seed = seed
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.device = layers[0].device
        items = lpt_assignment(inversion_costs(layers, colocate=self.shares_gradients), self.world_size)
        if self.shares_gradients:
            self.owners = {(l.name, s): items[l.name] for l in layers for s in ("A", "G")}
        else:
            self.owners = {(l.name, s): items[f"{l.name}.{s}"] for l in layers for s in ("A", "G")}
        # Factor order of _update_inverses: every layer's A, then every layer's G.
        self._factor_owner = [self.owners[(l.name, "A")] for l in layers]
        self._factor_owner += [self.owners[(l.name, "G")] for l in layers]
        self.comm_bytes = dict(factors=0, inverses=0, gradients=0, flags=0)
        self.comm_calls = dict(factors=0, inverses=0, gradients=0, flags=0)

    def __repr__(self) -> str:
        mode = "inverses broadcast"
        if self.shares_gradients:
            mode = f"owner preconditions + {'scatters' if self.sharded else 'broadcasts'} gradients"
        return (f"DistributedContext(rank={self.rank}, world_size={self.world_size}, "
                f"grad_worker_fraction={self.grad_worker_fraction}: {mode})")

    def _broadcast(self, flat: Tensor, src: int):
        """Async broadcast from ``src``, a rank of ``group`` (the API takes global ranks)."""
        root = src if self.group is None else dist.get_global_rank(self.group, src)
        return dist.broadcast(flat, root, group=self.group, async_op=True)

    def _count(self, category: str, t: Tensor) -> None:
        self.comm_bytes[category] += t.numel() * t.element_size()
        self.comm_calls[category] += 1

    # ---- 1. factors ----------------------------------------------------------------------

    def all_finite(self, finite: Tensor | bool) -> Tensor:
        """True on every rank iff ``finite`` (a bool or 0-d bool tensor) is True on every rank."""
        if isinstance(finite, bool):
            finite = torch.tensor(finite, device=self.device)
        bad = (~finite.reshape(1)).to(torch.int32)
        self._count("flags", bad)
        dist.all_reduce(bad, group=self.group)
        return bad[0] == 0

    def average_factors(self, factors: Sequence[Tensor]) -> None:
        """In place, every (symmetric) factor becomes its mean over the ranks, exactly symmetric
        and bitwise identical on every rank. Upper triangles only, in buckets of at most
        ``bucket_cap_mb`` per dtype and device."""
        by_kind: dict[tuple, list[Tensor]] = {}
        for f in factors:
            by_kind.setdefault((f.dtype, f.device), []).append(f)
        pending = []
        for group in by_kind.values():
            sizes = [_packed_size(f) for f in group]
            for idx in _buckets(sizes, group[0].element_size(), self.bucket_cap_bytes):
                mats = [group[i] for i in idx]
                flat = torch.empty(sum(sizes[i] for i in idx), dtype=mats[0].dtype, device=mats[0].device)
                offset = 0
                for m in mats:
                    k = _packed_size(m)
                    pack_upper(m, out=flat[offset:offset + k])
                    offset += k
                self._count("factors", flat)
                pending.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, mats))
        for work, flat, mats in pending:
            work.wait()
            flat.div_(self.world_size)
            offset = 0
            for m in mats:
                k = _packed_size(m)
                unpack_upper_(m, flat[offset:offset + k])
                offset += k

    # ---- 2. inversion --------------------------------------------------------------------

    def invert(self, factors: list[Tensor], damping: list[float]) -> tuple[list[tuple], list[int]]:
        """Distributed :meth:`KFACPreconditioner._invert`: the same ``(results, status)`` on
        every rank, each factor inverted only by its owner. With ``shares_gradients`` the results
        stay on the owner (others get :data:`REMOTE`); the status list is shared either way."""
        precond = self.precond
        n = len(factors)
        # Diagonal factors are cheap: every rank inverts them, none is broadcast.
        mine = [i for i in range(n) if self._factor_owner[i] == self.rank or factors[i].dim() == 1]
        results: list[tuple] = [REMOTE] * n
        status = torch.zeros(n, dtype=torch.int32, device=factors[0].device)
        if mine:
            local, local_status = precond._invert([factors[i] for i in mine], [damping[i] for i in mine])
            for i, r in zip(mine, local):
                results[i] = r
            owned = [(i, code) for i, code in zip(mine, local_status) if self._factor_owner[i] == self.rank]
            if owned:  # the owner alone reports (the all-reduce sums the codes)
                status[[i for i, _ in owned]] = torch.tensor([c for _, c in owned], dtype=torch.int32).to(status.device)
        self._count("flags", status)
        status_work = dist.all_reduce(status, group=self.group, async_op=True)
        if not self.shares_gradients:
            self._broadcast_results(results, factors)
        status_work.wait()
        return results, status.tolist()

    def _broadcast_results(self, results: list[tuple], factors: list[Tensor]) -> None:
        cholesky = self.precond._inverse_form  # (inverse,) per factor, packed as a triangle
        dtype, device = self.precond.inv_dtype, factors[0].device
        pending = []
        for src in range(self.world_size):
            idx = [i for i, owner in enumerate(self._factor_owner) if owner == src and factors[i].dim() == 2]
            if not idx:
                continue
            dims = [factors[i].shape[0] for i in idx]
            if src == self.rank:
                pieces = []
                for i in idx:
                    if cholesky:
                        pieces.append(pack_upper(results[i][0]))
                    else:
                        pieces += [results[i][0].reshape(-1), results[i][1].reshape(-1)]
                flat = torch.cat(pieces).to(dtype)
            else:
                numel = sum(_triangle(d) if cholesky else d + d * d for d in dims)
                flat = torch.empty(numel, dtype=dtype, device=device)
            self._count("inverses", flat)
            pending.append((self._broadcast(flat, src), src, idx, dims, flat))
        for work, src, idx, dims, flat in pending:
            work.wait()
            offset = 0  # the owner unpacks its own buffer too: bitwise the same results everywhere
            for i, d in zip(idx, dims):
                if cholesky:
                    k = _triangle(d)
                    inverse = torch.empty(d, d, dtype=dtype, device=device)
                    results[i] = (unpack_upper_(inverse, flat[offset:offset + k]),)
                else:
                    k = d + d * d
                    results[i] = (flat[offset:offset + d].clone(), flat[offset + d:offset + k].reshape(d, d).clone())
                offset += k

    # ---- 3./4. gradients -----------------------------------------------------------------

    def precondition(self, layers: list, grads: list[Tensor]) -> list[Tensor]:
        """``shares_gradients`` mode: the preconditioned gradient of each of ``layers`` (blocks),
        computed by its owner and broadcast (one flat buffer per owner and dtype)."""
        precond = self.precond
        mine = [i for i, l in enumerate(layers) if self.owners[(l.name, "A")] == self.rank]
        updates: list[Tensor | None] = [None] * len(layers)
        if mine:
            local = precond._apply_inverses([layers[i] for i in mine], [grads[i] for i in mine])
            for i, u in zip(mine, local):
                updates[i] = u
        pending = []
        for src in range(self.world_size):
            by_dtype: dict[torch.dtype, list[int]] = {}
            for i, l in enumerate(layers):
                if self.owners[(l.name, "A")] == src:
                    by_dtype.setdefault(grads[i].dtype, []).append(i)
            for dtype, idx in by_dtype.items():
                if src == self.rank:
                    flat = torch.cat([updates[i].reshape(-1) for i in idx])
                else:
                    flat = torch.empty(sum(grads[i].numel() for i in idx), dtype=dtype, device=grads[idx[0]].device)
                self._count("gradients", flat)
                pending.append((self._broadcast(flat, src), src, idx, flat))
        for work, src, idx, flat in pending:
            work.wait()
            if src == self.rank:
                continue
            offset = 0
            for i in idx:
                k = grads[i].numel()
                updates[i] = flat[offset:offset + k].view_as(grads[i])
                offset += k
        return updates

    # ---- FSDP2: row-sharded gradients -----------------------------------------------------

    def gather_gradients(self, blocks: list[Block]) -> list[Tensor | None]:
        """``∇W̄`` of every block, whole, from the FSDP2 gradient shards (:meth:`gather_whole`);
        None for a block that did not run, and for one another rank preconditions."""
        wholes = self.gather_whole(blocks, {i: b.grads() for i, b in enumerate(blocks) if b.weight.grad is not None})
        return [b.matrix(w[0], w[1] if b.bias is not None else None) if w is not None else None
                for b, w in zip(blocks, wholes)]

    def gather_whole(self, blocks: list[Block], parts: dict[int, list[DTensor]]) -> list[list[Tensor] | None]:
        """For each ``i`` in ``parts``, the whole tensors of the row-sharded ``parts[i]`` (block
        ``i``'s parameter-shaped tensors): on every rank (one all-gather per dtype) when every
        rank preconditions every block, else on the block's owner only (one all-to-all per
        dtype: each rank sends its rows to the owner), None elsewhere."""
        wholes: list[list[Tensor] | None] = [None] * len(blocks)
        world = self.world_size
        for idx in _by_dtype(parts):
            if self.shares_gradients:
                owned = self._by_owner(blocks, idx)
                here = owned[self.rank]
                send = _flat([t for ids in owned for i in ids for t in parts[i]], world)
                splits = [_pieces_size(parts, ids, world) for ids in owned]
                pieces = send.new_empty(world, splits[self.rank])
                self._exchange(pieces.view(-1), send, [splits[self.rank]] * world, splits)
            else:
                here = idx
                send = _flat([t for i in idx for t in parts[i]], world)
                pieces = send.new_empty(world, send.numel())
                self._count_sent(send.numel() * (world - 1) * send.element_size())
                _all_gather_single(pieces.view(-1), send, group=self.group)
            unpacked = iter(_unflat(pieces, [t.shape for i in here for t in parts[i]], world))
            for i in here:
                wholes[i] = [next(unpacked) for _ in parts[i]]
        return wholes

    def scatter_gradients(self, blocks: list[Block], indices: list[int], results: dict[int, Tensor]) -> None:
        """``shares_gradients`` under FSDP2: for the ``blocks[i]``, ``i`` in ``indices``, each
        owner sends every rank its rows of ``results[i]`` (W̄-shaped; the owner's blocks only) and
        every rank writes what it receives into its gradient shards (one all-to-all per dtype)."""
        world = self.world_size
        grads = {i: blocks[i].grads() for i in indices}
        for idx in _by_dtype(grads):
            owned = self._by_owner(blocks, idx)
            wholes = [w for i in owned[self.rank] for w in blocks[i].split(results[i])]
            send = _padded_rows(wholes, world, like=grads[idx[0]][0].to_local())
            sizes = [_pieces_size(grads, ids, world) for ids in owned]
            received = send.new_empty(sum(sizes))
            self._exchange(received, send.view(-1), sizes, [send.shape[1]] * world)
            offset = 0
            for i in (i for ids in owned for i in ids):
                for g in grads[i]:
                    local = g.to_local()
                    local.copy_(received[offset:offset + local.numel()].view(local.shape))
                    offset += _piece(g.shape, world)

    def _by_owner(self, blocks: list[Block], idx: list[int]) -> list[list[int]]:
        """``idx`` split by the rank that preconditions each block (in ``idx``'s order)."""
        owned: list[list[int]] = [[] for _ in range(self.world_size)]
        for i in idx:
            owned[self.grad_owner(blocks[i])].append(i)
        return owned

    def all_sum(self, value: Tensor) -> Tensor:
        """``value`` summed over the ranks (a new tensor)."""
        total = value.reshape(-1).clone()
        self._count("flags", total)
        dist.all_reduce(total, group=self.group)
        return total.view_as(value)

    def grad_owner(self, block: Block) -> int:
        """The rank that preconditions ``block`` when ``shares_gradients`` (and that accounts
        for it in sums over the blocks under FSDP2)."""
        return self.owners[(block.name, "A")]

    def _exchange(self, received: Tensor, send: Tensor, received_sizes: list[int], send_sizes: list[int]) -> None:
        self._count_sent((send.numel() - send_sizes[self.rank]) * send.element_size())
        dist.all_to_all_single(received, send, received_sizes, send_sizes, group=self.group)

    def _count_sent(self, nbytes: int) -> None:
        self.comm_bytes["gradients"] += nbytes
        self.comm_calls["gradients"] += 1

    # ---- checkpoints ---------------------------------------------------------------------

    def adjust_state_dict(self, state: dict) -> None:
        """Keeps only inverses held here (not :data:`REMOTE`) and records whose generator it is."""
        state["inverses"] = {k: v for k, v in state["inverses"].items() if all(len(side) for side in v)}
        state["generator_rank"] = self.rank

    def load_generator(self, state: dict) -> None:
        """After the saved generator state was loaded: the rank that saved it continues it; every
        other rank starts its own stream, derived from (seed, rank, step)."""
        if state.get("generator_rank", 0) == self.rank:
            return
        key = f"kfac_ext/{self.seed}/{self.rank}/{state['steps']}".encode()
        derived = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)
        self.precond.generator.manual_seed(derived)


# ---- FSDP2 row shards ----------------------------------------------------------------------


def _check_sharding(layers: Sequence[Block], group: dist.ProcessGroup | None) -> None:
    """FSDP2 parameters (DTensors) must be all or none of the blocks', row-sharded over a mesh
    of exactly the ranks of ``group``, and no parameter may belong to two blocks (each block's
    rows are exchanged as whole parameters)."""
    params = [p for l in layers for p in l.params()]
    if not any(isinstance(p, DTensor) for p in params):
        return
    plain = sorted({l.name for l in layers for p in l.params() if not isinstance(p, DTensor)})
    if plain:
        raise ValueError(f"K-FAC under FSDP2 needs every preconditioned layer sharded; {plain} are not "
                         "(fully_shard the root module too)")
    owner: dict[int, str] = {}
    for l in layers:
        for p in l.params():
            if id(p) in owner:
                raise NotImplementedError(
                    f"K-FAC under FSDP2 does not support blocks sharing a parameter ({owner[id(p)]!r} and "
                    f"{l.name!r}, e.g. nn.MultiheadAttention's q/k/v slices of in_proj_weight); pass their "
                    "module in skip_layers")
            owner[id(p)] = l.name
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    for p in params:
        check_row_sharded(p)
    for mesh in {id(p.device_mesh): p.device_mesh for p in params}.values():  # usually one
        if dist.get_process_group_ranks(mesh.get_group()) != ranks:
            raise NotImplementedError("K-FAC under FSDP2 needs the parameters sharded over the ranks of its "
                                      "process group (no HSDP / replicated meshes)")


# torch 2.14 renamed all_gather_into_tensor (deprecated there, with a warning per call).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _piece(shape: torch.Size, world: int) -> int:
    """Elements of one rank's piece of a tensor of ``shape`` row-sharded over ``world`` ranks, in
    a flat buffer: ``ceil(rows / world)`` rows, so that every rank's piece has one size (the
    short ones padded)."""
    return chunk_rows(shape[0], world) * math.prod(shape[1:])


def _pieces_size(parts: Mapping[int, list[Tensor]], idx: list[int], world: int) -> int:
    return sum(_piece(t.shape, world) for i in idx for t in parts[i])


def _by_dtype(parts: Mapping[int, list[Tensor]]) -> list[list[int]]:
    """The keys of ``parts`` grouped by the dtype of their tensors (one collective per group)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, tensors in parts.items():
        groups.setdefault(tensors[0].dtype, []).append(i)
    return list(groups.values())


def _flat(grads: list[DTensor], world: int) -> Tensor:
    """This rank's shards of ``grads`` side by side, each in its padded piece."""
    flat = grads[0].to_local().new_empty(sum(_piece(g.shape, world) for g in grads))
    offset = 0
    for g in grads:
        local = g.to_local()
        flat[offset:offset + local.numel()].copy_(local.reshape(-1))
        offset += _piece(g.shape, world)
    return flat


def _unflat(pieces: Tensor, shapes: list[torch.Size], world: int) -> list[Tensor]:
    """Whole tensors of ``shapes`` from ``pieces[r]``, rank ``r``'s padded row pieces."""
    wholes, offset = [], 0
    for shape in shapes:
        size = _piece(shape, world)
        rows = pieces[:, offset:offset + size].reshape(-1, *shape[1:])
        wholes.append(rows[:shape[0]])
        offset += size
    return wholes


def _padded_rows(wholes: list[Tensor], world: int, like: Tensor) -> Tensor:
    """``[world, n]`` (dtype and device of ``like``): row ``r`` holds rank ``r``'s rows
    (``torch.chunk`` on dim 0) of each of ``wholes``, in their padded pieces."""
    out = like.new_empty(world, sum(_piece(w.shape, world) for w in wholes))
    offset = 0
    for w in wholes:
        size = _piece(w.shape, world)
        padded = w.new_zeros(world * chunk_rows(w.shape[0], world), *w.shape[1:])
        padded[:w.shape[0]] = w
        out[:, offset:offset + size].copy_(padded.view(world, size))
        offset += size
    return out
