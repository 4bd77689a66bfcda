"""Replicated parameters (``DistributedDataParallel``, or gradients all-reduced by hand): every
rank holds every gradient whole."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..util import group_by
from .collective import Collective
from .local import Apply

if TYPE_CHECKING:
    from ..layers import Block


class Replicated(Collective):
    """``grad_worker_fraction = 1`` (KAISA's COMM-OPT): the owners broadcast the inverses after
    each inversion and every rank preconditions every block; communication on inversion steps
    only."""


class ReplicatedOwners(Collective):
    """``grad_worker_fraction < 1`` (KAISA's MEM-OPT): a block's two inversions have one owner,
    which alone holds its inverses, preconditions its gradient and broadcasts the result (one
    flat buffer per owner and dtype) at every step."""

    holds_every_inverse = False

    def __init__(self, blocks, group, grad_worker_fraction: float, **kwargs):
        super().__init__(blocks, group, **kwargs)
        self.grad_worker_fraction = grad_worker_fraction

    def precondition(self, blocks: list[Block], grads: list[Tensor], apply: Apply) -> list[Tensor]:
        mine = [i for i, b in enumerate(blocks) if self.grad_owner(b) == self.rank]
        updates: list[Tensor | None] = [None] * len(blocks)
        if mine:
            for i, u in zip(mine, apply([blocks[i] for i in mine], [grads[i] for i in mine])):
                updates[i] = u
        pending = []
        for src in range(self.world_size):
            owned = [i for i, b in enumerate(blocks) if self.grad_owner(b) == src]
            for idx in group_by(owned, lambda i: grads[i].dtype).values():
                if src == self.rank:
                    flat = torch.cat([updates[i].reshape(-1) for i in idx])
                else:
                    flat = torch.empty(sum(grads[i].numel() for i in idx), dtype=grads[idx[0]].dtype,
                                       device=grads[idx[0]].device)
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
