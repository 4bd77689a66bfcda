"""Which modules K-FAC preconditions, and how to read a layer's activations, output gradients and
gradient matrix ``∇W̄ = [∇W | ∇b]``.

* ``nn.Linear`` on inputs ``[..., d]``: every leading index is an example or a position; rows of
  the activation matrix are all of them (the "expand" convention).
* ``nn.Conv2d`` (groups=1, zero padding), KFC: rows are im2col patches, one per example and
  output position; ``W`` is viewed as ``[out, C·kh·kw]``.

Anything else with parameters is left to the base optimizer and listed in the report.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KFACLayer", "find_layers"]


@dataclasses.dataclass
class KFACLayer:
    name: str
    module: nn.Module

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def a_dim(self) -> int:
        """Rows of A: input features (with the appended 1 when the layer has a bias)."""
        w = self.module.weight
        return w[0].numel() + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.weight.shape[0]

    def activations(self, x: Tensor) -> Tensor:
        """``[rows, d]`` contiguous activation matrix (without the ones column)."""
        m = self.module
        if isinstance(m, nn.Linear):
            return x.reshape(-1, x.shape[-1]).contiguous()
        padding = m.padding
        if isinstance(padding, str):  # "valid" or "same" (stride 1): pad explicitly
            padding = 0
            if m.padding == "same":
                x = F.pad(x, _same_padding(m))
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1]).contiguous()

    def output_grads(self, grad: Tensor) -> Tensor:
        """``[rows, out]`` contiguous gradient matrix w.r.t. the layer output."""
        if isinstance(self.module, nn.Linear):
            return grad.reshape(-1, grad.shape[-1]).contiguous()
        return grad.movedim(1, -1).reshape(-1, grad.shape[1]).contiguous()

    def grad_matrix(self) -> Tensor | None:
        """``∇W̄ = [∇W | ∇b]`` of shape ``[out, a_dim]``; None before a backward."""
        w = self.module.weight
        if w.grad is None:
            return None
        g = w.grad.reshape(w.shape[0], -1)
        if not self.has_bias:
            return g.clone(memory_format=torch.contiguous_format)  # a copy: .grad is rewritten later
        b = self.module.bias.grad
        return torch.cat([g, (b if b is not None else torch.zeros_like(self.module.bias)).unsqueeze(1)], 1)

    def set_grad(self, matrix: Tensor) -> None:
        """Writes ``[∇W | ∇b]`` back into ``.grad`` (in the parameters' dtype and shape)."""
        w = self.module.weight
        cols = w[0].numel()
        w.grad.copy_(matrix[:, :cols].reshape(w.shape))
        if self.has_bias:
            if self.module.bias.grad is None:
                self.module.bias.grad = torch.zeros_like(self.module.bias)
            self.module.bias.grad.copy_(matrix[:, cols])


def _same_padding(conv: nn.Conv2d) -> list[int]:
    pads = []
    for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads


def _unsupported_reason(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} (only groups=1)"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r} (only 'zeros')"
        if module.padding == "same" and any(s != 1 for s in module.stride):
            return "Conv2d with padding='same' and stride > 1"
        return None
    return f"{type(module).__name__} is not a supported layer type (Linear, Conv2d)"


def find_layers(
    model: nn.Module, skip: tuple[str | type, ...] = ()
) -> tuple[list[KFACLayer], list[tuple[str, str]]]:
    """The layers K-FAC preconditions, and ``(name, reason)`` for every other module that owns
    trainable parameters directly (those go to the base optimizer unpreconditioned)."""
    layers, others = [], []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if any(s == name or (isinstance(s, type) and isinstance(module, s)) for s in skip):
            others.append((name, "skipped by skip_layers"))
            continue
        reason = _unsupported_reason(module)
        if reason is None and not module.weight.requires_grad:
            reason = "weight is frozen"
        if reason is None:
            layers.append(KFACLayer(name, module))
        else:
            others.append((name, reason))
    return layers, others
