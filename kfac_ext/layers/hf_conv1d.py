"""Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2 and relatives): a Linear whose weight
is stored transposed, ``[in, out]``, computing ``x @ W + b``. Matched by name and attributes so
that transformers need not be installed."""

from __future__ import annotations

from torch import Tensor

from .base import LayerKind
from .linear import LinearBlock


class HFConv1DBlock(LinearBlock):
    def weight_view(self, t: Tensor) -> Tensor:
        return t.T


class HFConv1D(LayerKind):
    @classmethod
    def matches(cls, module):
        return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None

    @classmethod
    def blocks(cls, name, module, approx):
        return [HFConv1DBlock(name, module, approx)]
