"""``nn.MultiheadAttention``: four Linear-like blocks — ``q``, ``k``, ``v`` (rows of the packed
``in_proj_weight``, or the separate ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ) and
``out_proj``, each on ``[batch, positions, features]`` rows (expand or reduce). In self-attention
the three input projections see the same input, so their activation rows (and A) are the same
and are reduced once.

Capture cannot use module hooks: ``MultiheadAttention.forward`` hands its weights to
``F.multi_head_attention_forward``, which calls ``F.linear`` itself (``out_proj``'s hooks never
fire), and a ``__torch_function__`` mode only sees that outer call. So while a registered
attention module runs its forward, ``torch.nn.functional.linear`` is swapped for a thin wrapper
that calls the original and reports the calls whose weight is one of this module's (identified by
storage, so ``chunk``/``split`` views of ``in_proj_weight`` are found with their row offset). The
wrapper is installed only during such forwards (reference-counted, restored even when the
forward raises) and passes every other call through untouched.
"""

from __future__ import annotations

import threading

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Hook, LayerKind, Record
from .linear import LinearBlock

_ORIGINAL_LINEAR = F.linear
_local = threading.local()  # .taps: the active taps of this thread, innermost last
_lock = threading.Lock()
_active = 0  # taps active in all threads: the wrapper is installed while > 0


def _tapped_linear(input, weight, bias=None):
    out = _ORIGINAL_LINEAR(input, weight, bias)
    taps = getattr(_local, "taps", None)
    if taps:
        taps[-1].see(input, weight, out)
    return out


def _push(tap: _Tap) -> None:
    global _active
    with _lock:
        if _active == 0:
            F.linear = _tapped_linear
        _active += 1
    _local.__dict__.setdefault("taps", []).append(tap)


def _pop(tap: _Tap) -> None:
    global _active
    taps = getattr(_local, "taps", [])
    if tap in taps:
        taps.remove(tap)
        with _lock:
            _active -= 1
            if _active == 0:
                F.linear = _ORIGINAL_LINEAR


class ProjectionBlock(LinearBlock):
    """Rows ``rows`` (the ``index``-th ``E`` rows) of ``in_proj_weight`` and ``in_proj_bias``, or
    a separate ``q/k/v_proj_weight`` (not ``packed``) with its rows of ``in_proj_bias``."""

    def __init__(self, name: str, module: nn.MultiheadAttention, weight: nn.Parameter, index: int, packed: bool,
                 approx: str = "expand"):
        e = module.embed_dim
        self.rows = slice(index * e, (index + 1) * e)  # read by the views, before Block sets the dims
        self.packed = packed
        super().__init__(name, module, approx, weight=weight, bias=module.in_proj_bias)

    def weight_view(self, t: Tensor) -> Tensor:
        return t[self.rows] if self.packed else t

    def bias_view(self, t: Tensor) -> Tensor:
        return t[self.rows]


class _Tap:
    """Reports the ``F.linear`` calls of one attention forward to ``record``."""

    def __init__(self, projections: list[ProjectionBlock], out_block, record: Record):
        self.projections, self.out_block, self.record = projections, out_block, record
        self.seq_shape = (0, 0)  # (L, B) of this forward's query, sequence-first

    def see(self, input: Tensor, weight: Tensor, out: Tensor) -> None:
        if self.out_block is not None and weight is self.out_block.weight:
            length, batch = self.seq_shape  # out_proj gets [L·B, E]
            self.record([(self.out_block, None)], input, out,
                        lambda t: t.reshape(length, batch, t.shape[-1]).transpose(0, 1))
            return
        pairs = self._projection_columns(weight)
        if pairs:
            self.record(pairs, input, out, _batch_major)

    def _projection_columns(self, weight: Tensor) -> list:
        pairs = []
        for block in self.projections:
            if not block.packed:
                if weight is block.weight:
                    pairs.append((block, None))
                continue
            w = block.weight
            if weight.untyped_storage().data_ptr() != w.untyped_storage().data_ptr():
                continue
            first = (weight.storage_offset() - w.storage_offset()) // w.shape[1]
            if first <= block.rows.start and block.rows.stop <= first + weight.shape[0]:
                pairs.append((block, slice(block.rows.start - first, block.rows.stop - first)))
        return pairs


def _batch_major(t: Tensor) -> Tensor:
    """``[L, B, d]`` (sequence first, as inside ``multi_head_attention_forward``) -> ``[B, L, d]``."""
    return t.transpose(0, 1) if t.dim() == 3 else t.unsqueeze(0)


class MultiheadAttention(LayerKind):
    module_types = (nn.MultiheadAttention,)

    @classmethod
    def blocks(cls, name, module, approx):
        packed = module._qkv_same_embed_dim
        blocks = []
        for i, side in enumerate("qkv"):
            weight = module.in_proj_weight if packed else getattr(module, f"{side}_proj_weight")
            blocks.append(ProjectionBlock(f"{name}.{side}" if name else side, module, weight, i, packed, approx))
        blocks.append(LinearBlock(f"{name}.out_proj" if name else "out_proj", module.out_proj, approx))
        return blocks

    @classmethod
    def claims(cls, module):
        return [module.out_proj]

    @classmethod
    def install(cls, module, blocks, record):
        projections = [b for b in blocks if isinstance(b, ProjectionBlock)]
        out = [b for b in blocks if not isinstance(b, ProjectionBlock)]
        tap = _Tap(projections, out[0] if out else None, record)

        def pre_hook(m, args, kwargs):
            query = args[0] if args else kwargs["query"]
            batched = query.dim() == 3
            if batched and m.batch_first:
                tap.seq_shape = (query.shape[1], query.shape[0])
            else:
                tap.seq_shape = (query.shape[0], query.shape[1] if batched else 1)
            _push(tap)

        def post_hook(m, args, output):
            _pop(tap)

        return [module.register_forward_pre_hook(Hook(pre_hook), with_kwargs=True),
                module.register_forward_hook(Hook(post_hook), always_call=True)]
