"""Symmetric matrices in flat buffers: only the upper triangle travels, and the receiver mirrors
it, so the result is exactly symmetric and bitwise identical on every rank."""

from __future__ import annotations

import torch
from torch import Tensor

_TRIU: dict[tuple[int, torch.device], Tensor] = {}


def _triu_flat_indices(n: int, device: torch.device) -> Tensor:
    """Row-major flat indices of the upper triangle (diagonal included) of an ``[n, n]`` matrix,
    in the order of ``torch.triu_indices``; cached per size and device."""
    key = (n, torch.device(device))
    if key not in _TRIU:
        rows, cols = torch.triu_indices(n, n, device=device)
        _TRIU[key] = rows * n + cols
    return _TRIU[key]


def triangle(n: int) -> int:
    return n * (n + 1) // 2


def packed_size(f: Tensor) -> int:
    """Elements a factor takes in a flat buffer: a matrix's upper triangle, a vector whole."""
    return triangle(f.shape[0]) if f.dim() == 2 else f.numel()


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
