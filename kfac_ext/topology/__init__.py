"""Where K-FAC's work happens: the distribution mode, chosen once when the preconditioner is
built. Distributed K-FAC on ``torch.distributed`` (gloo on CPU, NCCL on GPU) after KAISA
(Pauloski et al., SC'21, "KAISA: An Adaptive Second-Order Optimizer Framework for Deep Neural
Networks").

Five modes, one interface (:class:`~kfac_ext.topology.local.Local`'s methods):

============================  =====================================================================
:class:`Local`                one process (no process group, or a group of one rank)
:class:`Replicated`           DDP-style replicated gradients, ``grad_worker_fraction = 1``
:class:`ReplicatedOwners`     replicated gradients, ``grad_worker_fraction < 1``
:class:`Sharded`              FSDP2 row shards, ``grad_worker_fraction = 1``
:class:`ShardedOwners`        FSDP2 row shards, ``grad_worker_fraction < 1`` (the default there)
============================  =====================================================================

Over more than one rank every rank calls the same collectives in the same order, so all ranks end
every step with identical factors, inverses, statistics and gradients:

1. **Factor-update steps.** The "this step's statistics are finite" flag is agreed by an
   all-reduce (one rank with a non-finite activation or output gradient makes every rank skip
   that factor update). Each rank updates its factors with its own micro-batch, then the factors
   are averaged by all-reduce. Because the factors were identical before the update,
   ``mean_r(ρF + (1-ρ)S_r) = ρF + (1-ρ) mean_r(S_r)``: with equal per-rank batches this is the
   factor a single process gets on the concatenated batch. The all-reduce is bucketed (a few
   flat buffers of at most ``bucket_cap_mb``) and carries only the upper triangle of each
   symmetric factor, unpacked and mirrored so the result stays exactly symmetric. Under gradient
   accumulation the micro-batches go into each rank's factors as they come, each kept or left out
   by its own rank's finite flag (no collective between micro-batches); the average at
   ``step()`` makes the ranks identical again.
2. **Inverse-update steps.** Every inversion has one owner rank
   (:func:`~kfac_ext.topology.assignment.lpt_assignment`, greedy longest-processing-time first
   with cost ``n³``); only the owner inverts. The status codes are all-reduced, so a failed
   inversion leads every rank to the same fallback (the previous inverse or the identity).
3. **Every step.** The "gradients are finite" flag is agreed by all-reduce.
4. **Preconditioning**, chosen by ``grad_worker_fraction`` (KAISA's names): ``1.0`` (COMM-OPT),
   the owners broadcast the inverses after each inversion and every rank preconditions every
   block; below ``1.0`` (MEM-OPT, KAISA's ``1/world``; any value below 1 means one gradient worker
   per block), a block's owner alone holds its inverses, preconditions its gradient and
   broadcasts (under FSDP2: scatters) the result at every step.

Gradients themselves are averaged by ``DistributedDataParallel`` (or by the user, for an
unwrapped model under a process group), not here. ``comm_bytes`` counts, per category, the bytes
of the buffers handed to collectives (a ring all-reduce moves about ``2(p-1)/p`` times it per
rank, a broadcast about once).

Checkpoints: factors, inverses and statistics are identical on all ranks, so a ``state_dict``
saved on rank 0 loads on any world size. Monte Carlo targets come from a per-rank stream (seed +
rank). A loaded state continues its saved generator on the rank that saved it (the
``generator_rank`` entry); every other rank starts a fresh stream derived from (seed, rank,
step). With ``grad_worker_fraction < 1`` a rank saves only the inverses it holds; a resumed run
recomputes the missing ones from the saved factors at its first step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import nn

from ..fsdp import check_sharding, is_sharded
from .assignment import factor_owners, inversion_costs, lpt_assignment
from .collective import Collective
from .local import Local
from .packing import pack_upper, unpack_upper_
from .replicated import Replicated, ReplicatedOwners
from .sharded import Sharded, ShardedOwners

if TYPE_CHECKING:
    from ..layers import Block

__all__ = [
    "Collective", "Local", "Replicated", "ReplicatedOwners", "Sharded", "ShardedOwners", "choose",
    "factor_owners", "inversion_costs", "lpt_assignment", "pack_upper", "unpack_upper_", "unwrap_model",
]


def choose(blocks: Sequence[Block], process_group: dist.ProcessGroup | None = None,
           grad_worker_fraction: float | None = None) -> Local:
    """The mode for ``blocks``: :class:`Local` unless ``torch.distributed`` is initialised with
    more than one rank in ``process_group`` (default: the world); then replicated or sharded
    (FSDP2 DTensor parameters), and ``grad_worker_fraction`` (default 1, or 0 when sharded)."""
    grad_worker_fraction = check_grad_worker_fraction(grad_worker_fraction)
    if not (dist.is_available() and dist.is_initialized()):
        return Local()
    check_sharding(blocks, process_group)  # FSDP2 on one rank too
    if dist.get_world_size(process_group) <= 1:
        return Local()
    sharded = is_sharded(blocks)
    if grad_worker_fraction is None:  # FSDP2 users want memory: owners hold a block's inverses
        grad_worker_fraction = 0.0 if sharded else 1.0
    if grad_worker_fraction == 1.0:
        return (Sharded if sharded else Replicated)(list(blocks), process_group)
    owners = ShardedOwners if sharded else ReplicatedOwners
    return owners(list(blocks), process_group, grad_worker_fraction=grad_worker_fraction)


def check_grad_worker_fraction(value: float | None) -> float | None:
    if value is None:  # chosen by the mode: 0 for FSDP2-sharded parameters, else 1
        return None
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"grad_worker_fraction must be in [0, 1], got {value}")
    return value


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
