"""One step's statistics: the captured micro-batches reduced to per-block sums, ``Σ ā āᵀ`` with its
row count and ``Σ w g gᵀ``, as soon as each micro-batch ends (so that gradient accumulation holds
one micro-batch of activations, not all of them)."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from .layers import Block
from .util import batched_by_bytes, group_by

FLUSH_BYTES = 256 * 2**20  # activation rows materialised at once when reducing a micro-batch
#: ``factor_rows="auto"``: a factor ``d`` wide takes at most about ``ROWS_PER_WIDTH · d`` rows of a
#: micro-batch, and never fewer than ``AUTO_MIN_ROWS``
ROWS_PER_WIDTH = 4
AUTO_MIN_ROWS = 1024


@dataclasses.dataclass
class Statistics:
    """A step's reduced micro-batches, per block name: ``Σ ā āᵀ`` and its row count, ``Σ w g gᵀ``,
    and how many forwards each sum covers; and the number of captured forwards (micro-batches)."""

    a_sum: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    a_rows: dict[str, int] = dataclasses.field(default_factory=dict)
    g_sum: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    #: per factor kind (``"a"``, ``"g"``) and block: how many forwards its sum covers (a forward's
    #: output-gradient rows may reach it in parts: they count once)
    covered: dict[str, dict[str, int]] = dataclasses.field(default_factory=lambda: {"a": {}, "g": {}})
    forwards: int = 0
    #: at most about this many rows of a block's micro-batch enter its sums (None: all of them;
    #: "auto": a number per factor width, :meth:`row_budget`)
    max_rows: int | str | None = None
    #: which of the strided subsets :meth:`subsample` takes (advanced by the caller, per reduction)
    phase: int = 0
    #: per block: the activation rows its layer computed over, before any subset (what the
    #: layer's forward and backward multiply-adds scale with)
    layer_rows: dict[str, int] = dataclasses.field(default_factory=dict)
    _last_forward: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict, repr=False)

    def holds_sums(self) -> bool:
        return bool(self.a_sum or self.g_sum)

    def held_bytes(self) -> int:
        return sum(t.nbytes for t in self.a_sum.values()) + sum(t.nbytes for t in self.g_sum.values())

    def take(self, kind: str) -> tuple[dict[str, Tensor], dict[str, int] | None, dict[str, int]]:
        """The ``kind`` sums (``"a"``: ``Σ ā āᵀ``, with their row counts; ``"g"``: ``Σ w g gᵀ``,
        None) and how many forwards each covers, handed over (the statistics keep counting
        forwards but hold no such sums after this)."""
        covered, self.covered[kind] = self.covered[kind], {}
        if kind == "a":
            taken = self.a_sum, self.a_rows, covered
            self.a_sum, self.a_rows = {}, {}
        else:
            taken = self.g_sum, None, covered
            self.g_sum = {}
        return taken

    def _add(self, kind: str, name: str, total: Tensor) -> None:
        store = self.a_sum if kind == "a" else self.g_sum
        store[name] = store[name] + total if name in store else total
        if self._last_forward.get((kind, name)) != self.forwards:  # this forward's first part
            self._last_forward[kind, name] = self.forwards
            self.covered[kind][name] = self.covered[kind].get(name, 0) + 1

    def row_budget(self, width: int | None) -> int | None:
        """How many rows of a micro-batch a factor ``width`` wide takes at most (None: all; a
        ``width`` of None: a sum without a GEMM, e.g. an embedding's counts, which "auto" keeps
        whole)."""
        if self.max_rows != "auto":
            return self.max_rows
        return None if width is None else max(AUTO_MIN_ROWS, ROWS_PER_WIDTH * width)

    def row_pick(self, n: int, width: int | None) -> slice | None:
        """Which of ``n`` rows a factor ``width`` wide takes (None: all of them): every ``k``-th
        row from offset ``phase mod k``, so that successive reductions walk through every offset;
        a stride, unlike a random pick, needs no generator and is reproducible from the
        factor-update count alone. ``k`` is the least stride from ``⌈n / budget⌉`` with no divisor
        in common with ``n``: rows are (example, position) pairs, and a stride that divides the
        positions per example (4 of a 4x4 feature map's 16) would take the same positions of
        every example."""
        budget = self.row_budget(width)
        if budget is None or n <= budget:
            return None
        stride = -(-n // budget)
        while math.gcd(stride, n) != 1:
            stride += 1
        return slice(self.phase % stride, None, stride)

    def subsample(self, rows: Tensor, width: int | None) -> tuple[Tensor, float]:
        """The rows :meth:`row_pick` takes and ``N / n``, the factor that keeps a sum over them an
        unbiased estimate of the sum over all ``N``."""
        pick = self.row_pick(rows.shape[0], width)
        if pick is None:
            return rows, 1.0
        picked = rows[pick].contiguous()
        return picked, rows.shape[0] / picked.shape[0]

    def _activation_rows(self, block: Block, xs: list[Tensor], width: int | None) -> tuple[Tensor, int]:
        """The rows of ``block``'s inputs ``xs`` that enter its ``Σ ā āᵀ``, and how many there were."""
        if len(xs) > 1:
            every = _cat([block.activation_rows(x) for x in xs])
            return self.subsample(every, width)[0], every.shape[0]
        seen = []

        def pick(n: int) -> slice | None:
            seen.append(n)
            return self.row_pick(n, width)

        return block.sampled_activation_rows(xs[0], pick), seen[0]

    def add_activations(self, items: list[tuple[Block, list[Tensor]]], ops, dtype: torch.dtype) -> None:
        """Adds ``Σ ā āᵀ`` of each block's inputs ``xs`` (and their row count)."""
        dense, same_rows = [], []  # blocks with rows of their own / rows another block has too
        firsts: dict[tuple, tuple[Block, int, int]] = {}  # the first block, rows taken, rows seen
        for block, xs in items:
            # Blocks that saw the same inputs and read them alike (q, k, v of self-attention)
            # have the same rows: they are built, and Σ ā āᵀ reduced, once.
            key = (tuple(id(x) for x in xs), type(block).activation_rows, block.approx, block.has_bias, block.a_dim)
            if key in firsts:
                first, count, seen = firsts[key]
                self.layer_rows[block.name] = self.layer_rows.get(block.name, 0) + seen
                if count:
                    self.a_rows[block.name] = self.a_rows.get(block.name, 0) + count
                    same_rows.append((block, first))
                continue
            width = None if block.a_diagonal else block.a_dim
            rows, seen = self._activation_rows(block, xs, width)  # their count says how many were taken
            self.layer_rows[block.name] = self.layer_rows.get(block.name, 0) + seen
            firsts[key] = (block, rows.shape[0], seen)
            if rows.shape[0] == 0:  # e.g. an expert no token was routed to
                continue
            self.a_rows[block.name] = self.a_rows.get(block.name, 0) + rows.shape[0]
            if block.a_diagonal:
                # index_add_, not bincount: bincount reads the largest index back to the host
                counts = torch.zeros(block.a_dim, dtype=dtype, device=rows.device)
                counts.index_add_(0, rows, torch.ones(rows.shape, dtype=dtype, device=rows.device))
                self._add("a", block.name, counts)
            else:
                dense.append((block, rows))
        sums: dict[str, Tensor] = {}
        for batch in batched_by_bytes(dense, lambda item: item[1].nbytes, FLUSH_BYTES):
            totals = [torch.empty(b.a_dim, b.a_dim, dtype=dtype, device=r.device) for b, r in batch]
            _sum_outer_products(ops, totals, [r for _, r in batch], [1.0] * len(batch), [b.has_bias for b, _ in batch])
            sums.update((b.name, t) for (b, _), t in zip(batch, totals))
        for block, _ in dense:
            self._add("a", block.name, sums[block.name])
        for block, first in same_rows:
            self._add("a", block.name, sums[first.name])

    def add_gradients(self, items: list[tuple[Block, list[tuple[Tensor, float | Tensor]]]], ops, dtype: torch.dtype
                      ) -> None:
        """Adds ``Σ w g gᵀ`` of each block's gradient rows and their weights."""
        work = [(block, self._subsampled(*_weighted_cat(chunks), block.g_dim)) for block, chunks in items]
        work = [(block, (g, w)) for block, (g, w) in work if g.shape[0] > 0]
        for batch in batched_by_bytes(work, lambda item: item[1][0].nbytes, FLUSH_BYTES):
            sums = [torch.empty(b.g_dim, b.g_dim, dtype=dtype, device=g.device) for b, (g, _) in batch]
            scales = [1.0 if isinstance(w, Tensor) else w for _, (_, w) in batch]  # the op takes host numbers
            _sum_outer_products(ops, sums, [g for _, (g, _) in batch], scales, [False] * len(batch))
            for (block, (_, w)), total in zip(batch, sums):
                self._add("g", block.name, total.mul_(w) if isinstance(w, Tensor) else total)

    def _subsampled(self, rows: Tensor, weight: float | Tensor, width: int) -> tuple[Tensor, float | Tensor]:
        rows, scale = self.subsample(rows, width)
        return rows, weight if scale == 1.0 else weight * scale


def _sum_outer_products(ops, outs, xs, scales, append_ones) -> None:
    """``outs[i] = scales[i] · x̄ᵀx̄`` (overwritten), one native call per activation dtype."""
    for idx in group_by(range(len(xs)), lambda i: xs[i].dtype).values():
        ops.factor_update_([outs[i] for i in idx], [xs[i] for i in idx], decay=0.0,
                           scales=[scales[i] for i in idx], append_ones=[append_ones[i] for i in idx])


def _cat(chunks: list[Tensor]) -> Tensor:
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _weighted_cat(chunks: list[tuple[Tensor, float | Tensor]]) -> tuple[Tensor, float | Tensor]:
    """Concatenates gradient rows whose factor weights agree (the same number, or the same
    device tensor); rows with another weight are rescaled by sqrt(weight ratio) first so one
    weight covers all."""
    weight = chunks[0][1]
    same = [w is weight or not isinstance(w, Tensor) and not isinstance(weight, Tensor) and w == weight
            for _, w in chunks]
    rows = [g if keep else g * (w / weight) ** 0.5 for (g, w), keep in zip(chunks, same)]
    return _cat(rows), weight
