"""``nn.Embedding`` as a Linear on one-hot inputs: ``W̄ = Wᵀ`` of shape ``[dim, vocab]``,
``G = w Σ g gᵀ`` (dense, ``dim × dim``) and ``A = 1/rows Σ onehot onehotᵀ`` — diagonal, the
token frequencies, kept as a vector (never a dense ``vocab × vocab`` matrix). Every position is
a row ("expand"; "reduce" would make A dense, so embeddings always expand)."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Block, LayerKind


class EmbeddingBlock(Block):
    a_diagonal = True

    def __init__(self, name: str, module: nn.Module, approx: str = "expand"):
        super().__init__(name, module, "expand")

    def activation_rows(self, x: Tensor) -> Tensor:
        """The token ids, one per row (A's diagonal counts them)."""
        return x.reshape(-1)

    def output_grad_rows(self, grad: Tensor) -> Tensor:
        return grad.reshape(-1, grad.shape[-1]).contiguous()

    def weight_view(self, t: Tensor) -> Tensor:
        return t.T


class Embedding(LayerKind):
    module_types = (nn.Embedding,)

    @classmethod
    def unsupported_reason(cls, module, approx):
        if module.sparse:
            return "Embedding with sparse=True (sparse gradients)"
        return None

    @classmethod
    def blocks(cls, name, module, approx):
        return [EmbeddingBlock(name, module)]
