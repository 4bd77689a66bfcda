"""FSDP2 (``fully_shard``) row shards: parameters and gradients are DTensors sharded on dim 0
over a 1-D mesh, ``torch.chunk`` style (``ceil(rows / p)`` rows per rank, the last ranks' short
or empty). Everything K-FAC needs to know about that layout, in one place."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

if TYPE_CHECKING:
    from .layers import Block


def whole(t: Tensor) -> Tensor:
    """``t``, or the whole tensor of an FSDP2 shard (a DTensor; an all-gather)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 DTensor, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def check_row_sharded(t: DTensor) -> None:
    """FSDP2's default layout, the only one K-FAC handles: dim 0 sharded over a 1-D mesh."""
    mesh, placements = t.device_mesh, t.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise NotImplementedError(f"K-FAC supports FSDP2 parameters sharded on dim 0 over a 1-D mesh, "
                                  f"got placements {placements} on a {mesh.ndim}-D mesh")


def chunk_rows(rows: int, world: int) -> int:
    """Rows of dim 0 per rank: FSDP2 shards as ``torch.chunk`` does, in chunks of
    ``ceil(rows / world)`` (the last ranks' may be short or empty)."""
    return -(-rows // world)


def shard_rows(rows: int, world: int, rank: int) -> slice:
    """The rows of dim 0 that ``rank`` holds."""
    chunk = chunk_rows(rows, world)
    return slice(min(rows, rank * chunk), min(rows, (rank + 1) * chunk))


def rows_of_rank(whole_tensor: Tensor, sharded: DTensor) -> Tensor:
    """The rows of ``whole_tensor`` (parameter-shaped) that this rank holds of ``sharded``."""
    check_row_sharded(sharded)
    mesh = sharded.device_mesh
    mine = whole_tensor[shard_rows(whole_tensor.shape[0], mesh.size(), mesh.get_local_rank())]
    shard = sharded.to_local()
    if mine.shape != shard.shape:
        raise RuntimeError(f"K-FAC: the FSDP2 shard of rank {mesh.get_local_rank()} has shape "
                           f"{tuple(shard.shape)}, expected {tuple(mine.shape)} (torch.chunk of "
                           f"{tuple(whole_tensor.shape)} on dim 0)")
    return mine


def is_sharded(blocks: Sequence[Block]) -> bool:
    return any(isinstance(p, DTensor) for b in blocks for p in b.params())


def check_sharding(blocks: Sequence[Block], group: dist.ProcessGroup | None) -> None:
    """FSDP2 parameters (DTensors) must be all or none of the blocks', row-sharded over a mesh
    of exactly the ranks of ``group``, and no parameter may belong to two blocks (each block's
    rows are exchanged as whole parameters)."""
    params = [p for b in blocks for p in b.params()]
    if not any(isinstance(p, DTensor) for p in params):
        return
    plain = sorted({b.name for b in blocks for p in b.params() if not isinstance(p, DTensor)})
    if plain:
        raise ValueError(f"K-FAC under FSDP2 needs every preconditioned layer sharded; {plain} are not "
                         "(fully_shard the root module too)")
    owner: dict[int, str] = {}
    for b in blocks:
        for p in b.params():
            if id(p) in owner:
                raise NotImplementedError(
                    f"K-FAC under FSDP2 does not support blocks sharing a parameter ({owner[id(p)]!r} and "
                    f"{b.name!r}, e.g. nn.MultiheadAttention's q/k/v slices of in_proj_weight); pass their "
                    "module in skip_layers")
            owner[id(p)] = b.name
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    for p in params:
        check_row_sharded(p)
    for mesh in {id(p.device_mesh): p.device_mesh for p in params}.values():  # usually one
        if dist.get_process_group_ranks(mesh.get_group()) != ranks:
            raise NotImplementedError("K-FAC under FSDP2 needs the parameters sharded over the ranks of its "
                                      "process group (no HSDP / replicated meshes)")


# ---- padded pieces: one rank's rows of several tensors in one flat buffer ---------------------

# torch 2.14 renamed all_gather_into_tensor (deprecated there, with a warning per call).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def piece(shape: torch.Size, world: int) -> int:
    """Elements of one rank's piece of a tensor of ``shape`` row-sharded over ``world`` ranks, in
    a flat buffer: ``ceil(rows / world)`` rows, so that every rank's piece has one size (the
    short ones padded)."""
    return chunk_rows(shape[0], world) * math.prod(shape[1:])


def pieces_size(parts: Mapping[int, list[Tensor]], idx: list[int], world: int) -> int:
    return sum(piece(t.shape, world) for i in idx for t in parts[i])


def flat_pieces(grads: list[DTensor], world: int) -> Tensor:
    """This rank's shards of ``grads`` side by side, each in its padded piece."""
    flat = grads[0].to_local().new_empty(sum(piece(g.shape, world) for g in grads))
    offset = 0
    for g in grads:
        shard = g.to_local()
        flat[offset:offset + shard.numel()].copy_(shard.reshape(-1))
        offset += piece(g.shape, world)
    return flat


def unflat_pieces(pieces: Tensor, shapes: list[torch.Size], world: int) -> list[Tensor]:
    """Whole tensors of ``shapes`` from ``pieces[r]``, rank ``r``'s padded row pieces."""
    wholes, offset = [], 0
    for shape in shapes:
        size = piece(shape, world)
        rows = pieces[:, offset:offset + size].reshape(-1, *shape[1:])
        wholes.append(rows[:shape[0]])
        offset += size
    return wholes


def padded_rows(wholes: list[Tensor], world: int, like: Tensor) -> Tensor:
    """``[world, n]`` (dtype and device of ``like``): row ``r`` holds rank ``r``'s rows
    (``torch.chunk`` on dim 0) of each of ``wholes``, in their padded pieces."""
    out = like.new_empty(world, sum(piece(w.shape, world) for w in wholes))
    offset = 0
    for w in wholes:
        size = piece(w.shape, world)
        padded = w.new_zeros(world * chunk_rows(w.shape[0], world), *w.shape[1:])
        padded[:w.shape[0]] = w
        out[:, offset:offset + size].copy_(padded.view(world, size))
        offset += size
    return out
