"""One process: the interface every distribution mode implements, with nothing to communicate.

The preconditioner and the adaptive damping call a topology at fixed points and hand it
functions (the local inversion, the local preconditioning), never themselves; a mode that spans
several ranks (:mod:`kfac_ext.topology.replicated`, :mod:`kfac_ext.topology.sharded`) adds its
collectives there, and every rank calls the same collectives in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..fsdp import local, whole
from ..util import all_finite

if TYPE_CHECKING:
    from ..inverse import InverseRecord
    from ..layers import Block

#: ``indices -> (records, statuses)``: the inversion this rank runs on the factors at those positions.
Invert = Callable[[list[int]], tuple[list["InverseRecord"], list[int]]]
#: ``(blocks, grads) -> directions``: the preconditioned gradients of blocks this rank holds.
Apply = Callable[[list["Block"], list[Tensor]], list[Tensor]]


class Local:
    """A single process (FSDP2 on one rank included: its DTensors are whole)."""

    rank = 0
    world_size = 1

    @property
    def comm_bytes(self) -> dict[str, int]:
        """Bytes handed to collectives, per category: none here."""
        return {}

    # ---- every step ------------------------------------------------------------------------

    def gradients(self, blocks: list[Block], ran: list[Block]) -> tuple[list[Tensor | None], Tensor]:
        """``∇W̄`` of every block (None where it did not run, or, in the owner modes, where
        another rank preconditions it), and whether every gradient is finite (on every rank).
        ``ran``: the blocks with a gradient."""
        grads = [b.grad_matrix() for b in blocks]
        return grads, self.agree(all_finite([g for g in grads if g is not None]))

    def agree(self, flag: Tensor) -> Tensor:
        """True on every rank iff the 0-d bool ``flag`` is True on every rank."""
        return flag

    def precondition(self, blocks: list[Block], grads: list[Tensor], apply: Apply) -> list[Tensor]:
        """The preconditioned gradients of ``blocks`` (the ones with a gradient here)."""
        return apply(blocks, grads)

    def clip_total(self, partial: Tensor) -> Tensor:
        """``Σ ⟨v, g⟩`` over every block from this rank's part of it."""
        return partial

    def write(self, blocks: list[Block], ready: list[int], directions: dict[int, Tensor]) -> None:
        """Writes ``directions[i]`` into the gradients of ``blocks[i]`` for every ``i`` in
        ``ready`` (``directions`` holds the ones computed here)."""
        for i in ready:
            blocks[i].set_grad(directions[i])

    def finite(self, grads: list[Tensor]) -> Tensor:
        """Every element of ``grads`` (gradients of other parameters) finite, on every rank."""
        return all_finite([local(g) for g in grads])

    # ---- factor and inverse steps -----------------------------------------------------------

    def require_every_block(self, missing: list[str]) -> None:
        """Blocks that captured nothing in a factor step: fine in one process."""

    def average(self, factors: list[Tensor]) -> None:
        """Every factor becomes its mean over the ranks (in place)."""

    def invert(self, factors: list[Tensor], invert: Invert, inverse_form: bool, fresh: list[bool]
               ) -> tuple[list[InverseRecord], list[int]]:
        """Every factor's damped inverse record (``REMOTE`` where another rank holds it) and its
        status, the same statuses on every rank, ``invert`` run on this rank's share of the
        positions. ``inverse_form``: the records are :class:`~kfac_ext.inverse.Inverse`, else
        :class:`~kfac_ext.inverse.EigenPair`. ``fresh[j]`` False: factor ``j`` keeps the record
        every rank holding it has (``invert`` returns that one), so it is not sent."""
        return invert(list(range(len(factors))))

    # ---- adaptive damping: the quadratic model ------------------------------------------------

    def whole_on_owners(self, blocks: list[Block], parts: dict[int, list[Tensor]]) -> dict[int, list[Tensor] | None]:
        """For each ``i`` in ``parts`` (block ``i``'s parameter-shaped tensors), the whole
        tensors where block ``i``'s terms are computed, else None."""
        return {i: [whole(t) for t in ts] for i, ts in parts.items()}

    def accounts_for(self, block: Block) -> bool:
        """Whether this rank adds ``block``'s terms to sums over the blocks."""
        return True

    def accounts_for_param(self, param: Tensor) -> bool:
        """Whether this rank adds the terms of ``param`` (not in a block) to such sums."""
        return True

    def model_total(self, terms: Tensor) -> Tensor:
        """Sums over the blocks and parameters from every rank's accounted part."""
        return terms

    def mean(self, loss: Tensor) -> float:
        """The 0-d ``loss`` averaged over the ranks (each saw its own batch)."""
        return self.mean_values(loss.reshape(1))[0]

    def mean_values(self, values: Tensor) -> list[float]:
        """The 1-d ``values`` averaged elementwise over the ranks."""
        return values.tolist()

    # ---- checkpoints ------------------------------------------------------------------------

    def checkpoint_entries(self) -> dict:
        """What a ``state_dict`` records about the rank that saved it."""
        return {}

    def after_generator_load(self, generator: torch.Generator, state: dict, seed: int) -> None:
        """After ``state``'s generator state was loaded into ``generator``."""
