"""``nn.Conv1d`` and ``nn.Conv2d`` with ``groups=1`` and zero padding, after KFC (Grosse &
Martens 2016): activation rows are the im2col patches, one per example and output position, and
``W`` is viewed as ``[out, C·k…]``; the output positions are shared-weight positions (expand or
reduce, see :mod:`kfac_ext.layers.base`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Block, LayerKind, positions_rows


class ConvBlock(Block):
    def _geometry(self, x: Tensor) -> tuple[Tensor, tuple, tuple, tuple, tuple]:
        """``x`` as a batched 2-D convolution's input ``[N, C, H, W]`` (Conv1d as a Conv2d of
        height 1; "same" padding applied) and the kernel size, dilation, stride and zero padding
        to read it with, each as a pair."""
        m = self.module
        conv1d = isinstance(m, nn.Conv1d)
        if conv1d:
            x = x.unsqueeze(-2)
        if x.dim() == 3:  # an unbatched input
            x = x.unsqueeze(0)
        def two_d(v, height):  # Conv1d's (v,) as (height, v)
            return (height, v[0]) if conv1d else tuple(v)

        kernel, dilation, stride = two_d(m.kernel_size, 1), two_d(m.dilation, 1), two_d(m.stride, 1)
        padding = m.padding
        if isinstance(padding, str):  # "valid" or "same" (stride 1): pad explicitly
            if padding == "same":
                x = F.pad(x, _same_padding(kernel, dilation))
            padding = (0, 0)
        else:
            padding = two_d(padding, 0)
        return x, kernel, dilation, stride, padding

    def _patches(self, x: Tensor) -> Tensor:
        """``[N, L, C·k…]`` im2col patches."""
        x, kernel, dilation, stride, padding = self._geometry(x)
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)

    def activation_rows(self, x: Tensor) -> Tensor:
        return positions_rows(self._patches(x), self.approx, Tensor.mean)

    def sampled_activation_rows(self, inputs: Tensor, pick: Callable[[int], slice | None]) -> Tensor:
        """Builds only the patches ``pick`` selects: im2col of every position, most of them
        dropped right after, cost more than the factor's GEMM on the rows kept."""
        if self.approx == "reduce":
            return super().sampled_activation_rows(inputs, pick)
        x, kernel, dilation, stride, padding = self._geometry(inputs)
        windows = _windows(F.pad(x, (padding[1], padding[1], padding[0], padding[0])), kernel, dilation, stride)
        examples, height, width = windows.shape[:3]
        chosen = pick(examples * height * width)
        if chosen is None:
            return self.activation_rows(inputs)
        # rows are (example, output position) pairs in im2col's order: example-major, then row-major
        row = torch.arange(chosen.start, examples * height * width, chosen.step, device=x.device)
        position = row % (height * width)
        return windows[row // (height * width), position // width, position % width].reshape(row.shape[0], -1)

    def output_grad_rows(self, grad: Tensor) -> Tensor:
        if grad.dim() == self.weight.dim() - 1:  # an unbatched output
            grad = grad.unsqueeze(0)
        rows = grad.flatten(2).transpose(1, 2)  # [N, L, out]
        return positions_rows(rows, self.approx, Tensor.sum)

    def weight_view(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], -1)

    def write_weight(self, t: Tensor, matrix: Tensor) -> None:
        t.copy_(matrix.reshape(t.shape))  # t may be channels-last: no flat view of it


def _windows(x: Tensor, kernel, dilation, stride) -> Tensor:
    """``[N, H_out, W_out, C, k_h, k_w]``: a view of the padded input ``[N, C, H, W]`` whose
    ``[n, i, j]`` is the patch im2col makes of output position ``(i, j)`` of example ``n``."""
    for dim, (k, d, s) in enumerate(zip(kernel, dilation, stride), start=2):
        x = x.unfold(dim, d * (k - 1) + 1, s)
    return x[..., ::dilation[0], ::dilation[1]].permute(0, 2, 3, 1, 4, 5)


def _same_padding(kernel, dilation) -> list[int]:
    pads = []
    for k, d in zip(reversed(kernel), reversed(dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads


class Conv(LayerKind):
    module_types = (nn.Conv1d, nn.Conv2d)

    @classmethod
    def unsupported_reason(cls, module, approx):
        kind = type(module).__name__
        if module.groups != 1:
            return f"{kind} with groups={module.groups} (only groups=1)"
        if module.padding_mode != "zeros":
            return f"{kind} with padding_mode={module.padding_mode!r} (only 'zeros')"
        if module.padding == "same" and any(s != 1 for s in module.stride):
            return f"{kind} with padding='same' and stride > 1"
        return None

    @classmethod
    def blocks(cls, name, module, approx):
        return [ConvBlock(name, module, approx)]
