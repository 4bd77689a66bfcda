"""Layer kinds K-FAC preconditions, as a registry: one :class:`~kfac_ext.layers.base.LayerKind`
per module type, each in its own module; adding a kind means adding a file and a line to
:data:`KINDS`.

=========================  =================================================================
kind                       blocks
=========================  =================================================================
``nn.Linear``              one; any leading dimensions (positions: expand / reduce)
``nn.Conv1d``/``Conv2d``   one (groups=1, zero padding); output positions: expand / reduce
HF ``Conv1D``              one (GPT-2's transposed-weight Linear)
``nn.MultiheadAttention``  ``q``, ``k``, ``v`` and ``out_proj`` (expand)
``nn.Embedding``           one, with a diagonal A (token frequencies)
=========================  =================================================================

Everything else with trainable parameters (LayerNorm, RMSNorm, BatchNorm, GroupNorm, …) is left
to the base optimizer and listed in the preconditioner's report, as are parameters shared by two
modules (tied weights), frozen weights, layers skipped by the user, and blocks with a dense factor
side larger than ``max_factor_dim``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .attention import MultiheadAttention
from .base import KFAC_APPROXIMATIONS, Block, LayerKind
from .conv import Conv
from .embedding import Embedding
from .hf_conv1d import HFConv1D
from .linear import Linear

__all__ = ["KINDS", "KFAC_APPROXIMATIONS", "Block", "LayerKind", "Registration", "find_blocks"]

KINDS: list[type[LayerKind]] = [Linear, Conv, HFConv1D, MultiheadAttention, Embedding]


@dataclass
class Registration:
    """What :func:`find_blocks` found: the blocks, the modules to hook (with their kind and
    blocks), and ``(name, reason)`` for every module or parameter left to the base optimizer."""

    blocks: list[Block] = field(default_factory=list)
    installs: list[tuple[type[LayerKind], nn.Module, list[Block]]] = field(default_factory=list)
    others: list[tuple[str, str]] = field(default_factory=list)
    module_count: int = 0  # modules of the model when registered

    def require_blocks(self) -> None:
        if not self.blocks:
            raise ValueError(
                "model has no layer K-FAC preconditions (Linear, Conv1d/2d, Hugging Face Conv1D, "
                "MultiheadAttention, Embedding); left to the base optimizer: "
                + "; ".join(f"{n or '<model>'}: {r}" for n, r in self.others)
            )

    def check_unchanged(self, model: nn.Module) -> None:
        """Refuses a model that gained a layer K-FAC would precondition since it was registered
        (modules are counted first: the search runs only when the count changed)."""
        count = sum(1 for _ in model.modules())
        if count == self.module_count:
            return
        known = {b.name for b in self.blocks} | {name for name, _ in self.others}
        for block in find_blocks(model).blocks:
            if block.name not in known:
                raise RuntimeError(
                    f"KFACPreconditioner: layer {block.name!r} was added to the model after the "
                    "preconditioner was built; build a new preconditioner"
                )
        self.module_count = count

    def report(self) -> list[str]:
        """The lines of a registration report: each block with its factor sizes, then what is
        left to the base optimizer and why."""
        lines = ["  preconditioned blocks:"]
        for b in self.blocks:
            a = f"A {b.a_dim} (diagonal)" if b.a_diagonal else f"A {b.a_dim}x{b.a_dim}"
            lines.append(f"    {b.name}: {type(b.module).__name__}, {a}, G {b.g_dim}x{b.g_dim}")
        if self.others:
            lines.append("  left to the base optimizer:")
            lines += [f"    {name or '<model>'}: {reason}" for name, reason in self.others]
        return lines


def kind_of(module: nn.Module) -> type[LayerKind] | None:
    return next((kind for kind in KINDS if kind.matches(module)), None)


def _skipped(name: str, module: nn.Module, skip) -> bool:
    """``skip``: module types, or regular expressions matched against the whole module name."""
    for s in skip:
        if isinstance(s, type):
            if isinstance(module, s):
                return True
        elif re.fullmatch(s, name):
            return True
    return False


def _owners(model: nn.Module) -> dict[int, dict[int, str]]:
    """``id(parameter)`` -> ``{id(module): name}`` of the modules that hold it directly: two or
    more modules means tied weights (one module reused in two places is weight sharing, which
    K-FAC handles: its hooks see every use)."""
    owners: dict[int, dict[int, str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(id(module), name)
    return owners


def _too_large(block: Block, max_factor_dim: int) -> str | None:
    sides = [("G", block.g_dim)] + ([] if block.a_diagonal else [("A", block.a_dim)])
    for side, n in sides:
        if n > max_factor_dim:
            return f"{side} would be {n}x{n}, above max_factor_dim={max_factor_dim}"
    return None


def _module_reason(name, module, kind, approx, skip, owners) -> str | None:
    if _skipped(name, module, skip):
        return "skipped by skip_layers"
    if kind is None:
        return f"{type(module).__name__} is not a layer kind K-FAC preconditions"
    reason = kind.unsupported_reason(module, approx)
    if reason is not None:
        return reason
    for p in module.parameters(recurse=False):
        tied = [o for m, o in owners[id(p)].items() if m != id(module)]
        if tied and p.requires_grad:
            return f"shares a parameter with {', '.join(tied)} (tied weights)"
    return None


def find_blocks(
    model: nn.Module, skip=(), approx: str = "expand", max_factor_dim: int = 8192
) -> Registration:
    """The K-FAC blocks of ``model`` and what is left to the base optimizer (see module doc)."""
    reg = Registration(module_count=sum(1 for _ in model.modules()))
    owners = _owners(model)
    claimed: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in claimed:
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        kind = kind_of(module)
        if kind is not None:
            claimed.update(id(m) for m in kind.claims(module))
            own += [p for m in kind.claims(module) for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        reason = _module_reason(name, module, kind, approx, skip, owners)
        if reason is not None:
            reg.others.append((name, reason))
            continue
        blocks, too_large_seen = [], False
        for block in kind.blocks(name, module, approx):
            if not block.weight.requires_grad:
                continue
            too_large = _too_large(block, max_factor_dim)
            too_large_seen |= too_large is not None
            if too_large:
                reg.others.append((block.name, too_large))
            else:
                blocks.append(block)
        if not blocks:
            if not too_large_seen:
                reg.others.append((name, "weight is frozen"))
            continue
        covered = {id(p) for b in blocks for p in b.params()}
        reg.others += [(f"{name}.{n}" if name else n, "not part of a K-FAC block")
                       for n, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
        reg.blocks += blocks
        reg.installs.append((kind, module, blocks))
    return reg
