"""``nn.Linear`` on inputs ``[..., d]``: the leading dimension indexes examples, any other leading
dimensions are positions (weight sharing, see :mod:`kfac_ext.layers.base`)."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Block, LayerKind, positions_rows


def _as_examples(t: Tensor) -> Tensor:
    """``[N, T, d]``: examples × positions × features (T = 1 for a ``[N, d]`` or ``[d]`` input)."""
    if t.dim() == 1:
        return t.reshape(1, 1, -1)
    if t.numel() == 0:  # e.g. an expert no token was routed to
        return t.new_empty(0, 1, t.shape[-1])
    return t.reshape(t.shape[0], -1, t.shape[-1])


class LinearBlock(Block):
    def activation_rows(self, x: Tensor) -> Tensor:
        return positions_rows(_as_examples(x), self.approx, Tensor.mean)

    def output_grad_rows(self, grad: Tensor) -> Tensor:
        return positions_rows(_as_examples(grad), self.approx, Tensor.sum)

    def weight_view(self, t: Tensor) -> Tensor:
        return t


class Linear(LayerKind):
    module_types = (nn.Linear,)

    @classmethod
    def blocks(cls, name, module, approx):
        return [LinearBlock(name, module, approx)]
