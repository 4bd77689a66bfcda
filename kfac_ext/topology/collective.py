"""What every mode over more than one rank shares: agreement on flags, the averaged factors,
inversion by owners, sums over the ranks, checkpoints (see :mod:`kfac_ext.topology`)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from ..inverse import REMOTE, EigenPair, Inverse, InverseRecord
from ..util import all_finite, batched_by_bytes, group_by
from .assignment import factor_owners
from .local import Invert, Local
from .packing import pack_upper, packed_size, triangle, unpack_upper_

if TYPE_CHECKING:
    from ..layers import Block


class Collective(Local):
    """The ranks of ``group`` (more than one). Subclasses say where gradients are whole and who
    preconditions what.

    Attributes:
        rank, world_size: this process in ``group``.
        owners: ``{(block name, "A" | "G"): rank}``, identical on every rank.
        comm_bytes: per category (``"factors"``, ``"inverses"``, ``"gradients"``, ``"flags"``),
            the bytes handed to collectives since construction (reset them freely). The FSDP2
            gradient exchanges count the bytes this rank sends to the others.
    """

    #: Every rank holds every inverse (they are broadcast after each inversion); else a block's
    #: inverses stay on its owner, which alone preconditions it.
    holds_every_inverse = True
    grad_worker_fraction = 1.0

    def __init__(self, blocks: Sequence[Block], group: dist.ProcessGroup | None, bucket_cap_mb: float = 25.0):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = blocks[0].device
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.owners = factor_owners(blocks, self.world_size, colocate=not self.holds_every_inverse)
        # Factor order of an inversion: every block's A, then every block's G.
        self._factor_owner = [self.owners[(b.name, "A")] for b in blocks] + [self.owners[(b.name, "G")] for b in blocks]
        self._comm_bytes = dict(factors=0, inverses=0, gradients=0, flags=0)

    @property
    def comm_bytes(self) -> dict[str, int]:
        return self._comm_bytes

    @comm_bytes.setter
    def comm_bytes(self, value: dict[str, int]) -> None:
        self._comm_bytes = dict(value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"

    def grad_owner(self, block: Block) -> int:
        """The rank that preconditions ``block`` in the owner modes (and that accounts for it in
        sums over the blocks under FSDP2)."""
        return self.owners[(block.name, "A")]

    def _count(self, category: str, t: Tensor) -> None:
        self._comm_bytes[category] += t.nbytes

    def _broadcast(self, flat: Tensor, src: int):
        """Async broadcast from ``src``, a rank of ``group`` (the API takes global ranks)."""
        root = src if self.group is None else dist.get_global_rank(self.group, src)
        return dist.broadcast(flat, root, group=self.group, async_op=True)

    def all_sum(self, value: Tensor) -> Tensor:
        """``value`` summed over the ranks (a new tensor)."""
        total = value.reshape(-1).clone()
        self._count("flags", total)
        dist.all_reduce(total, group=self.group)
        return total.view_as(value)

    # ---- flags -----------------------------------------------------------------------------

    def agree(self, flag: Tensor) -> Tensor:
        bad = (~flag.reshape(1)).to(torch.int32)
        self._count("flags", bad)
        dist.all_reduce(bad, group=self.group)
        return bad[0] == 0

    def finite(self, grads: list[Tensor]) -> Tensor:
        """FSDP2 shards (DTensors) are checked locally and the flag agreed; other gradients are the
        same on every rank."""
        flag = super().finite(grads)
        return self.agree(flag) if any(isinstance(g, DTensor) for g in grads) else flag

    def mean_values(self, values: Tensor) -> list[float]:
        return (self.all_sum(values.double().to(self.device)) / self.world_size).tolist()

    def require_every_block(self, missing: list[str]) -> None:
        if missing:
            raise RuntimeError(
                f"KFACPreconditioner: blocks {missing} captured no statistics in this step; with "
                "more than one rank every block must run in every factor-update step (pass the "
                "others in skip_layers)"
            )

    # ---- factors -----------------------------------------------------------------------------

    def average(self, factors: list[Tensor]) -> None:
        """In place, every (symmetric) factor becomes its mean over the ranks, exactly symmetric
        and bitwise identical on every rank. Upper triangles only, in buckets of at most
        ``bucket_cap_mb`` per dtype and device."""
        pending = []
        for group in group_by(factors, lambda f: (f.dtype, f.device)).values():
            for mats in batched_by_bytes(group, lambda m: packed_size(m) * m.element_size(), self.bucket_cap_bytes):
                flat = torch.empty(sum(packed_size(m) for m in mats), dtype=mats[0].dtype, device=mats[0].device)
                offset = 0
                for m in mats:
                    k = packed_size(m)
                    pack_upper(m, out=flat[offset:offset + k])
                    offset += k
                self._count("factors", flat)
                pending.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, mats))
        for work, flat, mats in pending:
            work.wait()
            flat.div_(self.world_size)
            offset = 0
            for m in mats:
                k = packed_size(m)
                unpack_upper_(m, flat[offset:offset + k])
                offset += k

    # ---- inversion ---------------------------------------------------------------------------

    def invert(self, factors: list[Tensor], invert: Invert, inverse_form: bool, fresh: list[bool]
               ) -> tuple[list[InverseRecord], list[int]]:
        """Each factor inverted only by its owner (diagonal factors, cheap, by every rank); the
        statuses all-reduced, so a failed inversion leads every rank to the same fallback. With
        :attr:`holds_every_inverse` the owners broadcast the fresh results (every rank holds the
        kept ones already); else they stay there. ``fresh`` is the same on every rank, as the
        broadcasts' sizes must be: the due factors are (the schedule and the budget are agreed),
        and so are the records held, in this mode the owners' broadcasts or one checkpoint's."""
        n = len(factors)
        mine = [i for i in range(n) if self._factor_owner[i] == self.rank or factors[i].dim() == 1]
        results: list[InverseRecord] = [REMOTE] * n
        status = torch.zeros(n, dtype=torch.int32, device=factors[0].device)
        if mine:
            local, local_status = invert(mine)
            for i, r in zip(mine, local):
                results[i] = r
            owned = [(i, code) for i, code in zip(mine, local_status) if self._factor_owner[i] == self.rank]
            if owned:  # the owner alone reports (the all-reduce sums the codes)
                status[[i for i, _ in owned]] = torch.tensor([c for _, c in owned], dtype=torch.int32).to(status.device)
        self._count("flags", status)
        status_work = dist.all_reduce(status, group=self.group, async_op=True)
        if self.holds_every_inverse:
            self._broadcast_results(results, factors, inverse_form, fresh)
        status_work.wait()
        return results, status.tolist()

    def _broadcast_results(self, results: list, factors: list[Tensor], inverse_form: bool, fresh: list[bool]
                           ) -> None:
        """Every owner's fresh dense results to every rank, one flat buffer per owner: an
        inverse's upper triangle, or an eigenpair's values and vectors."""
        dtype, device = factors[0].dtype, factors[0].device  # the factors come in the inverses' dtype
        pending = []
        for src in range(self.world_size):
            idx = [i for i, owner in enumerate(self._factor_owner)
                   if owner == src and factors[i].dim() == 2 and fresh[i]]
            if not idx:
                continue
            dims = [factors[i].shape[0] for i in idx]
            if src == self.rank:
                flat = torch.cat([piece for i in idx for piece in _packed(results[i])]).to(dtype)
            else:
                numel = sum(triangle(d) if inverse_form else d + d * d for d in dims)
                flat = torch.empty(numel, dtype=dtype, device=device)
            self._count("inverses", flat)
            pending.append((self._broadcast(flat, src), idx, dims, flat))
        for work, idx, dims, flat in pending:
            work.wait()
            offset = 0  # the owner unpacks its own buffer too: bitwise the same results everywhere
            for i, d in zip(idx, dims):
                results[i], k = _unpacked(flat, offset, d, inverse_form)
                offset += k

    # ---- checkpoints -------------------------------------------------------------------------

    def checkpoint_entries(self) -> dict:
        return dict(generator_rank=self.rank)

    def after_generator_load(self, generator: torch.Generator, state: dict, seed: int) -> None:
        """The rank that saved the generator state continues it; every other rank starts its own
        stream, derived from (seed, rank, step)."""
        if state.get("generator_rank", 0) == self.rank:
            return
        key = f"kfac_ext/{seed}/{self.rank}/{state['steps']}".encode()
        generator.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1))


def _packed(record: InverseRecord) -> list[Tensor]:
    if isinstance(record, Inverse):
        return [pack_upper(record.matrix)]
    return [record.values.reshape(-1), record.vectors.reshape(-1)]


def _unpacked(flat: Tensor, offset: int, d: int, inverse_form: bool) -> tuple[InverseRecord, int]:
    """The record of side ``d`` at ``offset`` of a broadcast buffer, and its size there."""
    if inverse_form:
        k = triangle(d)
        return Inverse(unpack_upper_(flat.new_empty(d, d), flat[offset:offset + k])), k
    k = d + d * d
    return EigenPair(flat[offset:offset + d].clone(), flat[offset + d:offset + k].reshape(d, d).clone()), k
