"""FSDP2 (``fully_shard``): parameters and gradients are row shards (DTensors, ``torch.chunk``
on dim 0, :mod:`kfac_ext.fsdp`). Each rank's piece of a collective is padded to
``ceil(rows / p)`` rows, so that the pieces of one collective have one size."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from ..fsdp import all_gather_single, flat_pieces, padded_rows, piece, pieces_size, unflat_pieces
from ..util import all_finite, group_by
from .collective import Collective

if TYPE_CHECKING:
    from ..layers import Block


class Sharded(Collective):
    """``grad_worker_fraction = 1``: one all-gather of every rank's shards per dtype, then every
    rank preconditions every block and keeps its rows of the result. Sums over the blocks
    (the quadratic model of adaptive damping) count each block on its owner only."""

    def gradients(self, blocks: list[Block], ran: list[Block]) -> tuple[list[Tensor | None], Tensor]:
        finite = all_finite([g.to_local() for b in ran for g in b.grads()])
        wholes = self.gather_whole(blocks, {i: b.grads() for i, b in enumerate(blocks) if b.weight.grad is not None})
        grads = [b.matrix(w[0], w[1] if b.bias is not None else None) if w is not None else None
                 for b, w in zip(blocks, wholes)]
        return grads, self.agree(finite)

    def gather_whole(self, blocks: list[Block], parts: dict[int, list[DTensor]]) -> list[list[Tensor] | None]:
        """For each ``i`` in ``parts``, the whole tensors of the row-sharded ``parts[i]`` (block
        ``i``'s parameter-shaped tensors), on every rank; None for the other blocks."""
        wholes: list[list[Tensor] | None] = [None] * len(blocks)
        world = self.world_size
        for idx in _by_dtype(parts):
            send = flat_pieces([t for i in idx for t in parts[i]], world)
            pieces = send.new_empty(world, send.numel())
            self._count_sent(send.nbytes * (world - 1))
            all_gather_single(pieces.view(-1), send, group=self.group)
            _unpack(wholes, pieces, idx, parts, world)
        return wholes

    def whole_on_owners(self, blocks: list[Block], parts: dict[int, list[Tensor]]) -> dict[int, list[Tensor] | None]:
        wholes = self.gather_whole(blocks, parts)
        return {i: wholes[i] for i in parts}

    def accounts_for(self, block: Block) -> bool:
        return self.grad_owner(block) == self.rank

    def accounts_for_param(self, param: Tensor) -> bool:
        return isinstance(param, DTensor) or self.rank == 0  # a replicated parameter counts once

    def model_total(self, terms: Tensor) -> Tensor:
        return self.all_sum(terms)

    def _count_sent(self, nbytes: int) -> None:
        self._comm_bytes["gradients"] += nbytes


class ShardedOwners(Sharded):
    """``grad_worker_fraction = 0`` (the default under FSDP2): one all-to-all per dtype sends each
    block's rows to its owner, which alone holds the block's inverses and its whole gradient, and
    one all-to-all sends every rank its rows of the result back. Summed over ``p`` ranks, per
    step, that is ``2(p-1)`` gradient shards' worth of bytes against ``p(p-1)`` for the
    all-gather (equal at 2 ranks, a third at 6), and no rank materialises a gradient it does not
    precondition."""

    holds_every_inverse = False

    def __init__(self, blocks, group, grad_worker_fraction: float, **kwargs):
        super().__init__(blocks, group, **kwargs)
        self.grad_worker_fraction = grad_worker_fraction

    def gather_whole(self, blocks: list[Block], parts: dict[int, list[DTensor]]) -> list[list[Tensor] | None]:
        """As :meth:`Sharded.gather_whole`, on each block's owner only (None elsewhere): each rank
        sends its rows to the owners."""
        wholes: list[list[Tensor] | None] = [None] * len(blocks)
        world = self.world_size
        for idx in _by_dtype(parts):
            owned = self._by_owner(blocks, idx)
            send = flat_pieces([t for ids in owned for i in ids for t in parts[i]], world)
            splits = [pieces_size(parts, ids, world) for ids in owned]
            pieces = send.new_empty(world, splits[self.rank])
            self._exchange(pieces.view(-1), send, [splits[self.rank]] * world, splits)
            _unpack(wholes, pieces, owned[self.rank], parts, world)
        return wholes

    def clip_total(self, partial: Tensor) -> Tensor:
        return self.all_sum(partial)  # each rank holds its own blocks' terms

    def write(self, blocks: list[Block], ready: list[int], directions: dict[int, Tensor]) -> None:
        """Each owner sends every rank its rows of ``directions[i]`` (its blocks only), and every
        rank writes what it receives into its gradient shards (one all-to-all per dtype)."""
        world = self.world_size
        grads = {i: blocks[i].grads() for i in ready}
        for idx in _by_dtype(grads):
            owned = self._by_owner(blocks, idx)
            wholes = [w for i in owned[self.rank] for w in blocks[i].split(directions[i])]
            send = padded_rows(wholes, world, like=grads[idx[0]][0].to_local())
            sizes = [pieces_size(grads, ids, world) for ids in owned]
            received = send.new_empty(sum(sizes))
            self._exchange(received, send.view(-1), sizes, [send.shape[1]] * world)
            offset = 0
            for i in (i for ids in owned for i in ids):
                for g in grads[i]:
                    shard = g.to_local()
                    shard.copy_(received[offset:offset + shard.numel()].view(shard.shape))
                    offset += piece(g.shape, world)

    def _by_owner(self, blocks: list[Block], idx: list[int]) -> list[list[int]]:
        """``idx`` split by the rank that preconditions each block (in ``idx``'s order)."""
        owned: list[list[int]] = [[] for _ in range(self.world_size)]
        for i in idx:
            owned[self.grad_owner(blocks[i])].append(i)
        return owned

    def _exchange(self, received: Tensor, send: Tensor, received_sizes: list[int], send_sizes: list[int]) -> None:
        self._count_sent((send.numel() - send_sizes[self.rank]) * send.element_size())
        dist.all_to_all_single(received, send, received_sizes, send_sizes, group=self.group)


def _by_dtype(parts: dict[int, list[Tensor]]) -> list[list[int]]:
    """The keys of ``parts`` grouped by the dtype of their tensors (one collective per group)."""
    return list(group_by(parts, lambda i: parts[i][0].dtype).values())


def _unpack(wholes: list, pieces: Tensor, here: list[int], parts: dict[int, list[Tensor]], world: int) -> None:
    unpacked = iter(unflat_pieces(pieces, [t.shape for i in here for t in parts[i]], world))
    for i in here:
        wholes[i] = [next(unpacked) for _ in parts[i]]
