"""The damped inverses of the factors: named records, inversion with its fallback, the stacked
groups of same-shape blocks, preconditioning a gradient with them, and the KL clip.

A block has an A-side and a G-side record. The form is fixed by the settings:

* :class:`Inverse` — ``(F + d I)⁻¹`` (Cholesky; or eigen with factored damping, formed at
  inversion time as ``Q diag(1/(λ + d)) Qᵀ`` so that a step costs 2 GEMMs per block, not 4);
  for a diagonal factor (an embedding's A, a vector) ``1 / (a + d)``.
* :class:`EigenPair` — ``λ + d`` and ``Q`` (exact eigen damping ``λ_G λ_Aᵀ + γ`` needs the
  eigenpairs of both sides); for a diagonal factor ``a + d`` and no vectors.

:data:`REMOTE` in place of a record: another rank holds it (the owner modes of
:mod:`kfac_ext.topology`). In a ``state_dict`` the records are the tuples ``(inverse,)`` and
``(values, vectors)`` of the earlier checkpoint format (:func:`to_tuple` / :func:`from_tuple`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .ops import Status
from .util import kron_times, warn_once

if TYPE_CHECKING:
    from .layers import Block


@dataclasses.dataclass(frozen=True)
class Inverse:
    """``(F + d I)⁻¹``, or ``1 / (a + d)`` for a diagonal factor (a vector)."""

    matrix: Tensor


@dataclasses.dataclass(frozen=True)
class EigenPair:
    """``F = Q diag(λ) Qᵀ`` with the damping added: ``values = λ + d``; ``vectors`` None for a
    diagonal factor (its values are its diagonal)."""

    values: Tensor
    vectors: Tensor | None


class _Remote:
    """The record of a factor another rank inverted and holds."""

    def __repr__(self) -> str:
        return "REMOTE"


REMOTE = _Remote()
InverseRecord = Inverse | EigenPair | _Remote


def tensors(record: InverseRecord) -> list[Tensor]:
    if isinstance(record, Inverse):
        return [record.matrix]
    if isinstance(record, EigenPair):
        return [t for t in (record.values, record.vectors) if t is not None]
    return []


def to_tuple(record: InverseRecord) -> tuple:
    """The checkpoint form: ``(inverse,)``, ``(values, vectors)``, or ``()`` (held elsewhere)."""
    if isinstance(record, Inverse):
        return (record.matrix,)
    if isinstance(record, EigenPair):
        return (record.values, record.vectors)
    return ()


def from_tuple(saved: tuple, move: Callable[[Any], Any]) -> InverseRecord:
    """The record of a checkpoint tuple, each tensor through ``move``."""
    if len(saved) == 1:
        return Inverse(move(saved[0]))
    if len(saved) == 2:
        return EigenPair(move(saved[0]), move(saved[1]))
    return REMOTE


def _identity(dim: int, diagonal: bool, inverse_form: bool, dtype, device) -> InverseRecord:
    ones = torch.ones(dim, dtype=dtype, device=device)
    if diagonal:
        return Inverse(ones) if inverse_form else EigenPair(ones, None)
    eye = torch.eye(dim, dtype=dtype, device=device)
    return Inverse(eye) if inverse_form else EigenPair(ones, eye)


class Inverses:
    """The records of every block, ``{block name: (A side, G side)}``, and what is done with them.

    ``ops`` is the op module (native or reference); ``inversion`` ``"eigen"`` or ``"cholesky"``;
    ``inverse_form``: the records are :class:`Inverse` (Cholesky, or eigen with factored
    damping), else :class:`EigenPair`.
    """

    def __init__(self, ops, inversion: str, inverse_form: bool, inv_dtype: torch.dtype):
        self.ops, self.inversion, self.inverse_form, self.inv_dtype = ops, inversion, inverse_form, inv_dtype
        self.records: dict[str, tuple[InverseRecord, InverseRecord]] = {}
        self._groups: dict[tuple, list] = {}  # stacked groups per (blocks, grad dtypes): see grouped

    def __contains__(self, name: str) -> bool:
        return name in self.records

    def tensors(self) -> list[Tensor]:
        return [t for sides in self.records.values() for side in sides for t in tensors(side)]

    def state(self) -> dict[str, tuple[tuple, tuple]]:
        """The records held here as checkpoint tuples (see the module docstring)."""
        return {name: (to_tuple(a), to_tuple(g)) for name, (a, g) in self.records.items()
                if a is not REMOTE and g is not REMOTE}

    def load(self, saved: dict[str, tuple[tuple, tuple]], move: Callable[[str, Any], Any]) -> None:
        """Records from :meth:`state`'s tuples, each tensor through ``move(block name, tensor)``."""
        self.records = {name: tuple(from_tuple(side, lambda t, name=name: move(name, t)) for side in sides)
                        for name, sides in saved.items()}
        self._groups = {}

    # ---- inversion -----------------------------------------------------------------------------

    def update(self, blocks: list[Block], factors: list[Tensor], damping: list[float], invert_everywhere,
               counters: dict, warned: set[str], due: list[bool] | None = None) -> None:
        """New records for ``blocks`` from ``factors`` (every block's A, then every block's G, in
        the inverses' dtype) and their damping. ``invert_everywhere(factors, invert, fresh)``
        runs ``invert(positions)`` where the topology says and returns every record
        (:data:`REMOTE` where another rank holds it) with the statuses; ``fresh[j]``: factor
        ``j`` gets a new record. ``due[j]`` False: factor ``j`` keeps the record it has (the
        same object), not inverted (a factor without one is inverted anyway).
        A failed inversion keeps the previous record, or the identity before there is one (warned
        once per factor)."""
        n = len(blocks)
        previous = [self.records.get(b.name, (None, None))[k] for k in range(2) for b in blocks]
        kept = [due is not None and not due[j] and previous[j] is not None for j in range(len(factors))]

        def invert(positions: list[int]) -> tuple[list[InverseRecord], list[int]]:
            fresh = [j for j in positions if not kept[j]]
            got, codes = self.invert([factors[j] for j in fresh], [damping[j] for j in fresh])
            by_position = dict(zip(fresh, zip(got, codes)))
            pairs = [by_position.get(j, (previous[j], int(Status.OK))) for j in positions]
            return [r for r, _ in pairs], [c for _, c in pairs]

        results, status = invert_everywhere(factors, invert, [not k for k in kept])
        # a kept record is the one this rank holds (the topology returns REMOTE where another rank
        # inverts that factor, and sends nothing for it)
        results = [previous[j] if kept[j] else r for j, r in enumerate(results)]
        for i, block in enumerate(blocks):
            sides = []
            for k, side in enumerate("AG"):
                j = i + k * n
                sides.append(self._accept(block, side, status[j], results[j], previous[j], factors[j], counters, warned))
            self.records[block.name] = (sides[0], sides[1])
        self._groups = {}

    def invert(self, factors: list[Tensor], damping: list[float]) -> tuple[list[InverseRecord], list[int]]:
        """Every factor's record and status; a diagonal factor (a vector) inverted elementwise."""
        dense = [i for i, f in enumerate(factors) if f.dim() == 2]
        results: list[InverseRecord] = [REMOTE] * len(factors)
        status = [int(Status.OK)] * len(factors)
        if dense:
            got, codes = self._invert_dense([factors[i] for i in dense], [damping[i] for i in dense])
            for i, r, c in zip(dense, got, codes):
                results[i], status[i] = r, c
        for i, f in enumerate(factors):
            if f.dim() == 1:
                results[i], status[i] = _invert_diagonal(f, damping[i], self.inverse_form)
        return results, status

    def _invert_dense(self, factors: list[Tensor], damping: list[float]) -> tuple[list[InverseRecord], list[int]]:
        """Identical factors with identical damping (the A factors of self-attention's q, k and
        v) are inverted once and share the result."""
        firsts, source = _distinct(factors, damping)
        results, status = self._invert_distinct([factors[i] for i in firsts], [damping[i] for i in firsts])
        return [results[j] for j in source], [status[j] for j in source]

    def _invert_distinct(self, factors: list[Tensor], damping: list[float]) -> tuple[list[InverseRecord], list[int]]:
        if self.inversion == "cholesky":
            inverses, status = self.ops.damped_inverse(factors, damping)
            return [Inverse(inv) for inv in inverses], status.tolist()
        values, vectors, status = self.ops.eigen_decompose(factors)
        if self.inverse_form:
            results = [Inverse((q * (1.0 / (lam + d))) @ q.mT) for lam, q, d in zip(values, vectors, damping)]
        else:
            results = [EigenPair(lam + d, q) for lam, q, d in zip(values, vectors, damping)]
        return results, status.tolist()

    def _accept(self, block: Block, side: str, status: int, result, previous, factor: Tensor, counters: dict,
                warned: set[str]):
        if status == Status.OK_AFTER_FP64_RETRY:
            counters["fp64_retries"] += 1
        if status in (Status.OK, Status.OK_AFTER_FP64_RETRY):
            return result
        counters["failed_inversions"] += 1
        fallback = "the previous inverse" if previous is not None else "the identity"
        warn_once(warned, f"{block.name}.{side}",
                  f"KFACPreconditioner: inverting factor {side} of block {block.name!r} failed "
                  f"({Status(status).name}) even in float64; using {fallback} (warned once per factor)")
        if previous is not None:
            return previous
        return _identity(factor.shape[0], factor.dim() == 1, self.inverse_form, self.inv_dtype, factor.device)

    # ---- preconditioning ---------------------------------------------------------------------

    def apply(self, blocks: list[Block], grads: list[Tensor], gamma: float) -> list[Tensor]:
        """The preconditioned gradient of each of ``blocks`` (``grads`` in the same order): one
        batched GEMM per side for the blocks of one gradient shape (:meth:`grouped`). ``gamma``:
        the exact eigen damping (0 with factored damping)."""
        updates: list[Tensor] = [None] * len(blocks)  # type: ignore[list-item]
        for indices, a_side, g_side in self.grouped(blocks, grads):
            batch = [grads[i] for i in indices]
            stacked = batch[0] if len(batch) == 1 else torch.stack(batch)
            if blocks[indices[0]].a_diagonal:  # an embedding's diagonal A: a group of its own
                got = _precondition_diagonal_a(stacked, a_side, g_side, gamma)
            elif isinstance(g_side, Inverse):
                got = self.ops.precondition_inverse([g_side.matrix], [stacked], [a_side.matrix])[0]
            else:
                got = self.ops.precondition_eigen([g_side.vectors], [g_side.values], [stacked], [a_side.vectors],
                                                  [a_side.values], gamma)[0]
            if len(indices) == 1:
                updates[indices[0]] = got
            else:
                for i, u in zip(indices, got.unbind(0)):
                    updates[i] = u
        return updates

    def grouped(self, blocks: list[Block], grads: list[Tensor]) -> list[tuple[list[int], Any, Any]]:
        """``blocks`` (indices into it) in groups of one gradient shape and dtype, each with its
        records stacked ``[k, n, n]`` (a group of one keeps its own tensors). Built once per
        inversion and cached: stacking at every step would copy every inverse every step."""
        key = tuple((b.name, g.dtype) for b, g in zip(blocks, grads))
        if key not in self._groups:
            members: dict[tuple, list[int]] = {}
            for i, (block, g) in enumerate(zip(blocks, grads)):
                shape = ("diagonal", i) if block.a_diagonal else (tuple(g.shape), g.dtype)
                members.setdefault(shape, []).append(i)
            groups = []
            for indices in members.values():
                sides = [self.records[blocks[i].name] for i in indices]
                a_side, g_side = (_stacked([s[k] for s in sides]) for k in (0, 1))
                groups.append((indices, a_side, g_side))
                if len(indices) > 1:  # the blocks' records become views of the stacks: no second copy
                    for m, i in enumerate(indices):
                        self.records[blocks[i].name] = (_member(a_side, m), _member(g_side, m))
            self._groups[key] = groups
        return self._groups[key]

    def cached_groups(self) -> list[list[tuple[list[int], Any, Any]]]:
        """The groups :meth:`grouped` built since the last inversion (for inspection)."""
        return list(self._groups.values())


def _stacked(records: list[InverseRecord]) -> InverseRecord:
    if len(records) == 1:
        return records[0]
    first = records[0]
    if isinstance(first, Inverse):
        return Inverse(torch.stack([r.matrix for r in records]))
    vectors = None if first.vectors is None else torch.stack([r.vectors for r in records])
    return EigenPair(torch.stack([r.values for r in records]), vectors)


def _member(stacked: InverseRecord, m: int) -> InverseRecord:
    if isinstance(stacked, Inverse):
        return Inverse(stacked.matrix[m])
    return EigenPair(stacked.values[m], None if stacked.vectors is None else stacked.vectors[m])


def _distinct(factors: list[Tensor], damping: list[float]) -> tuple[list[int], list[int]]:
    """``(firsts, source)``: the indices of the first of each set of equal (factor, damping)
    pairs, and for every factor the position in ``firsts`` of its equal. Sums are compared first
    (one read back for all), elements only where sums agree."""
    sums = torch.stack([f.sum().to(torch.float64) for f in factors]).tolist()
    firsts: list[int] = []
    source: list[int] = []
    by_key: dict[tuple, list[int]] = {}
    for i, f in enumerate(factors):
        key = (f.shape, f.dtype, f.device, damping[i], sums[i])
        same = next((j for j in by_key.get(key, []) if torch.equal(factors[firsts[j]], f)), None)
        if same is None:
            same = len(firsts)
            firsts.append(i)
            by_key.setdefault(key, []).append(same)
        source.append(same)
    return firsts, source


def _invert_diagonal(a: Tensor, damping: float, inverse_form: bool) -> tuple[InverseRecord, int]:
    """A diagonal factor's record ``1 / (a + d)`` or ``(a + d, None)`` and its status (no record
    on failure)."""
    if not bool(torch.isfinite(a).all()):
        return REMOTE, int(Status.NON_FINITE_INPUT)
    damped = a + damping
    if inverse_form:
        if not bool((damped > 0).all()):
            return REMOTE, int(Status.FAILED)
        return Inverse(1.0 / damped), int(Status.OK)
    return EigenPair(damped, None), int(Status.OK)


def _precondition_diagonal_a(grad: Tensor, a_side: InverseRecord, g_side: InverseRecord, gamma: float) -> Tensor:
    """``G⁻¹ ∇W̄ A⁻¹`` with a diagonal A (``∇W̄`` is ``[g_dim, a_dim]``): the A side scales
    columns. Eigen form: ``Q_G ((Q_Gᵀ ∇W̄) / (λ_G λ_Aᵀ + γ))``."""
    if isinstance(a_side, Inverse):
        out = kron_times(g_side.matrix, grad.to(a_side.matrix.dtype), a_side.matrix, None)
    else:
        g = grad.to(a_side.values.dtype)
        out = g_side.vectors @ ((g_side.vectors.T @ g) / (torch.outer(g_side.values, a_side.values) + gamma))
    return out.to(grad.dtype)


# ---- the KL clip ---------------------------------------------------------------------------------


def kl_clip_scale(updates: list[Tensor], grads: list[Tensor], kl_clip: float, lr: float,
                  total: Callable[[Tensor], Tensor], device: torch.device) -> Tensor:
    """``ν = min(1, sqrt(kl_clip / (lr² Σ ⟨v, g⟩)))`` as a 0-d tensor on the device: ``total``
    sums this rank's part of ``Σ ⟨v, g⟩`` over the ranks that hold the other parts."""
    dots = [_dot(u, g) for u, g in zip(updates, grads)]
    vg = torch.stack(dots).sum() if dots else torch.zeros((), dtype=torch.float64, device=device)
    vg = total(vg) * lr**2
    return torch.where(vg != 0, (kl_clip / vg.abs()).sqrt().clamp(max=1.0), 1.0)


def _dot(u: Tensor, g: Tensor) -> Tensor:
    """``⟨u, g⟩`` as a float64 0-d tensor (accumulated in at least float32)."""
    if u.dtype in (torch.float16, torch.bfloat16):
        u, g = u.float(), g.float()
    return torch.vdot(u.reshape(-1), g.reshape(-1)).double()
