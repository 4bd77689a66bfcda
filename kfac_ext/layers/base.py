"""What every layer kind provides: :class:`Block`, one Kronecker block ``A ⊗ G`` of a module's
parameters, and :class:`LayerKind`, the per-module-type entry of the registry.

A block sees its parameters as the matrix ``W̄ = [W | b]`` of shape ``[g_dim, a_dim]``: ``W`` is
the module's weight (or a slice / transpose / reshape of it) in "output × input" layout and ``b``
the bias, present only when the module has one that is trainable (it adds the ones column to
``A``). A kind says how to read:

* activation rows: ``[rows, a_dim - has_bias]`` from the input the block saw,
* output-gradient rows: ``[rows, g_dim]`` from the gradient w.r.t. the block's output,
* ``W̄``-shaped matrices out of parameter-shaped tensors (``.grad``, an update) and back.

Weight sharing (``[B, T, d]`` inputs to a Linear, a convolution's output positions) is handled by
the two approximations of Eschenhagen et al. (NeurIPS 2023), for ``N`` examples of ``T``
positions (``T`` = 1 for a plain ``[B, d]`` Linear, where both coincide):

* ``"expand"`` (the default): every position is a row of its own,
  ``A = 1/(N·T) Σ_{n,t} ā_{n,t} ā_{n,t}ᵀ`` and ``G = w Σ_{n,t} g_{n,t} g_{n,t}ᵀ``;
* ``"reduce"``: positions are reduced first, the mean of the activations and the sum of the
  output gradients, ``A = 1/N Σ_n ā_n ā_nᵀ`` with ``ā_n = 1/T Σ_t ā_{n,t}`` and
  ``G = w Σ_n g_n g_nᵀ`` with ``g_n = Σ_t g_{n,t}`` (T× fewer rows).

``w`` is the loss's weight of one example (see :mod:`kfac_ext.preconditioner`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..fsdp import local, rows_of_rank, whole

KFAC_APPROXIMATIONS = ("expand", "reduce")
_MODULES_OWN = object()  # Block's default bias: the module's own


class Block:
    """One Kronecker block. Subclasses implement the ``*_rows`` and ``*_view`` methods; ``g_dim``
    and ``a_dim`` follow from ``weight_view`` of the weight (and the bias).

    Attributes:
        name: unique, the module's name (plus a suffix when a module has several blocks).
        module: the module the parameters belong to.
        approx: ``"expand"`` or ``"reduce"``.
        a_diagonal: A is kept as its diagonal (a vector) — e.g. one-hot inputs of an embedding.
    """

    a_diagonal = False

    def __init__(self, name: str, module: nn.Module, approx: str = "expand", *,
                 weight: nn.Parameter | None = None, bias: nn.Parameter | None | object = _MODULES_OWN):
        """``weight`` / ``bias``: the module's own ``weight`` and ``bias`` unless given (a block
        of part of a module's parameters). A bias that is frozen is no part of the block."""
        self.name, self.module, self.approx = name, module, approx
        self.weight: nn.Parameter = module.weight if weight is None else weight
        bias = getattr(module, "bias", None) if bias is _MODULES_OWN else bias
        self.bias: nn.Parameter | None = bias if bias is not None and bias.requires_grad else None
        self.g_dim, fan_in = self.weight_view(self.weight).shape
        self.a_dim = fan_in + int(self.has_bias)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, A {self.a_dim}, G {self.g_dim})"

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def params(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    # ---- rows (kind-specific) ------------------------------------------------------------

    def activation_rows(self, x: Tensor) -> Tensor:
        """``[rows, a_dim - has_bias]`` contiguous activation rows (without the ones column)."""
        raise NotImplementedError

    def sampled_activation_rows(self, x: Tensor, pick: Callable[[int], slice | None]) -> Tensor:
        """The activation rows ``pick(n)`` selects of the ``n`` rows of ``x`` (all of them when it
        returns None), contiguous. Kinds that build their rows (a convolution's patches) build
        only those."""
        rows = self.activation_rows(x)
        chosen = pick(rows.shape[0])
        return rows if chosen is None else rows[chosen].contiguous()

    def output_grad_rows(self, grad: Tensor) -> Tensor:
        """``[rows, g_dim]`` contiguous rows of the gradient w.r.t. the block's output."""
        raise NotImplementedError

    # ---- W̄ = [W | b] <-> parameter-shaped tensors ----------------------------------------

    def weight_view(self, t: Tensor) -> Tensor:
        """``[g_dim, a_dim - has_bias]`` view (or copy) of a weight-shaped tensor."""
        raise NotImplementedError

    def write_weight(self, t: Tensor, matrix: Tensor) -> None:
        """Writes ``[g_dim, a_dim - has_bias]`` into the weight-shaped ``t``."""
        self.weight_view(t).copy_(matrix)

    def bias_view(self, t: Tensor) -> Tensor:
        """``[g_dim]`` view of a bias-shaped tensor (writable)."""
        return t

    def matrix(self, weight_like: Tensor, bias_like: Tensor | None) -> Tensor:
        """``[g_dim, a_dim]``: a fresh ``[W | b]`` from weight- and bias-shaped tensors
        (``bias_like`` None counts as zeros)."""
        w = self.weight_view(weight_like)
        if not self.has_bias:
            return w.clone(memory_format=torch.contiguous_format)
        b = self.bias_view(bias_like) if bias_like is not None else w.new_zeros(w.shape[0])
        return torch.cat([w, b.unsqueeze(1)], 1)

    def grad_matrix(self) -> Tensor | None:
        """``∇W̄``; None when the weight has no gradient (the block did not run). FSDP2 gradients
        (DTensors; one rank, or every rank preconditioning every block) are gathered whole."""
        if self.weight.grad is None:
            return None
        bias_grad = whole(self.bias.grad) if self.bias is not None and self.bias.grad is not None else None
        return self.matrix(whole(self.weight.grad), bias_grad)

    def ensure_bias_grad(self) -> None:
        """A bias the forward did not use gets a zero gradient, so that it is written (and
        stepped: weight decay, momentum) like the weight."""
        if self.bias is not None and self.bias.grad is None:
            self.bias.grad = torch.zeros_like(self.bias)

    def split(self, matrix: Tensor) -> list[Tensor]:
        """``[∇W | ∇b]`` as whole parameter-shaped tensors (the weight's, then the bias's), in the
        dtype of the parameters' gradients."""
        cols = self.a_dim - int(self.has_bias)
        weight = torch.empty(self.weight.shape, dtype=local(self.weight.grad).dtype, device=matrix.device)
        self.write_weight(weight, matrix[:, :cols])
        if self.bias is None:
            return [weight]
        bias = torch.empty(self.bias.shape, dtype=weight.dtype, device=matrix.device)
        self.bias_view(bias).copy_(matrix[:, cols])
        return [weight, bias]

    def set_grad(self, matrix: Tensor) -> None:
        """Writes ``[∇W | ∇b]`` back into ``.grad`` (in the parameters' dtype and layout; into
        this rank's rows of an FSDP2-sharded gradient)."""
        self.ensure_bias_grad()
        if isinstance(self.weight.grad, DTensor):
            for grad, whole_grad in zip(self.grads(), self.split(matrix)):
                grad.to_local().copy_(rows_of_rank(whole_grad, grad))
            return
        cols = self.a_dim - int(self.has_bias)
        self.write_weight(self.weight.grad, matrix[:, :cols])
        if self.bias is not None:
            self.bias_view(self.bias.grad).copy_(matrix[:, cols])

    def grads(self) -> list[Tensor]:
        """The parameters' gradients that exist (DTensors under FSDP2)."""
        return [p.grad for p in self.params() if p.grad is not None]

    def mask_grad_(self, keep: Tensor) -> None:
        """Zeroes the gradients where the 0-d bool ``keep`` is False (decided on the device; the
        zeros replace NaNs too); this rank's shard of FSDP2 gradients."""
        for grad in self.grads():
            shard = local(grad)
            shard.copy_(torch.where(keep, shard, 0.0))


Record = Callable[..., None]
"""``record(pairs, x, output, layout=None)``: the preconditioner's capture callback. ``pairs``
are ``(block, cols)``: the blocks that saw input ``x`` and produced ``output``, each reading
``output[..., cols]`` (all of it when ``cols`` is None). ``layout``, when given, maps ``x`` and
the output gradient to the ``[examples, ...]`` layout the blocks expect."""


class Hook:
    """A module hook that a copy of the module does not keep: ``copy.deepcopy(model)`` (an EMA
    model, an evaluation copy) gets an inert hook, so the copy runs unobserved and the copy itself
    never drags the preconditioner along.

    Under ``torch.compile`` the hook runs eagerly, outside the graph (a graph break at each hooked
    module): traced, its Python state (step counters, pending lists) would become guards and
    recompile the model at every step."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        # Eagerly a plain call: torch.compiler.disable's wrapper costs ~0.15 ms per call on a CPU,
        # paid by every hooked module at every forward.
        if torch.compiler.is_compiling():
            return _outside_the_graph(self.fn, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        return _inert


@torch.compiler.disable
def _outside_the_graph(fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


def _inert(*args, **kwargs) -> None:
    return None


class LayerKind:
    """Registry entry: which modules it handles and which blocks it makes of them.

    ``blocks`` returns the blocks of one module, ``install`` hooks the module so that every
    forward calls ``record`` (module forward hooks unless the module's forward bypasses them).
    """

    module_types: tuple[type, ...] = ()

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.module_types)

    @classmethod
    def unsupported_reason(cls, module: nn.Module, approx: str) -> str | None:
        """Why this module of the kind's type cannot be preconditioned, or None."""
        return None

    @classmethod
    def blocks(cls, name: str, module: nn.Module, approx: str) -> list[Block]:
        raise NotImplementedError

    @classmethod
    def claims(cls, module: nn.Module) -> list[nn.Module]:
        """Submodules whose parameters this kind's blocks cover (not registered on their own)."""
        return []

    @classmethod
    def install(cls, module: nn.Module, blocks: list[Block], record: Record) -> list:
        """Default: one forward hook, the module's first input and its output, all blocks."""
        pairs = [(b, None) for b in blocks]
        return [module.register_forward_hook(Hook(lambda m, inputs, output: record(pairs, inputs[0], output)))]


def positions_rows(x: Tensor, approx: str, reduce_fn) -> Tensor:
    """Rows ``[N·T, d]`` (expand) or ``[N, d]`` (reduce) from ``x`` of shape ``[N, T, d]``
    (``reduce_fn`` is ``Tensor.mean`` for activations, ``Tensor.sum`` for gradients)."""
    if approx == "reduce":
        return reduce_fn(x, 1).contiguous()
    return x.reshape(-1, x.shape[-1]).contiguous()
