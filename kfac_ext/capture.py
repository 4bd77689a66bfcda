"""Capture: the hooks that see every preconditioned layer's inputs and output gradients, the
pending micro-batch, and its reduction (:mod:`kfac_ext.statistics`) to one
:class:`~kfac_ext.statistics.Statistics` record per step.

For a step with ``N`` examples of ``T`` positions each, per block (see :mod:`kfac_ext.layers`
for how positions enter, ``kfac_approx``):

* ``A = (1/rows) Σ ā āᵀ`` over the activation rows, ``ā = [a, 1]`` (the 1 last; only when the
  block has a trainable bias);
* ``G = w Σ g gᵀ`` over the output-gradient rows, with ``g = ∂ℓ_n/∂s`` the gradient of the
  **per-term** loss ``ℓ_n`` w.r.t. the block's output and ``w = 1/M`` for ``reduction="mean"``
  (``L = (1/M) Σ_n ℓ_n``), ``w = 1`` for ``"sum"``. ``M`` is the number of terms the loss
  averages: the batch size for ``[N, C]`` outputs, and for cross-entropy on ``[B, T, C]``
  logits the number of **counted tokens** (labels other than ``ignore_index``, positions the
  ``loss_mask_fn`` keeps). Either way ``A ⊗ G`` approximates the curvature of the loss as the
  user computes it.

Every forward in train mode, with grad enabled, outside :meth:`Capture.pause`, during a
factor-update step counts as one micro-batch. A layer's inputs (the ones autograd saved for
its backward) are reduced to ``Σ ā āᵀ`` once its backward has begun, with the output-gradient
rows, which are reduced as soon as :data:`HELD_GRADIENT_BYTES` of rows and such inputs are
pending (and a sampled backward's rest as it ends): autograd frees a layer's saved input when
its backward has run, and none is kept beyond that. What no backward reached is reduced when
the next micro-batch starts (or at ``step()``). A micro-batch's sums go into the factors
(:meth:`~kfac_ext.curvature.Curvature.fold`) when the next one starts, a sampled backward's as
they are reduced (in one process; with several ranks, which fold in step, as it ends), so they
are not held through the user's backward, and in one process the user's backward's once
:data:`HELD_SUM_BYTES` of them are held. With
``grad_accumulation_steps=k`` the micro-batch losses are assumed divided by ``k`` (the usual
recipe; it matters for "empirical").

The output gradients come from one of three Fisher types (:data:`FISHER_TYPES`): targets sampled
from the model (``"mc"``) or the loss Hessian's square root (``"type-2"``), both through a
sampled backward run right after the forward, or the real labels' gradients of the user's own
backward (``"empirical"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .layers import Block
from .layers.base import Hook
from .losses import CrossEntropy, Loss
from .statistics import Statistics
from .util import warn_once

#: the most bytes of output-gradient rows held before they are reduced: small layers' rows are
#: still reduced together (one native call), and a large model's backward never holds all of them
HELD_GRADIENT_BYTES = 4 * 2**20
#: the most bytes of reduced sums held (in one process) before they go into the factors: a fold
#: costs a few small ops per block, so a small model's sums wait for step()
HELD_SUM_BYTES = 4 * 2**20

# ---- the Fisher types ------------------------------------------------------------------------


class FisherType:
    """Where the output gradients ``g`` come from. ``samples``: a sampled backward runs after
    every captured forward (the block outputs' gradient edges are kept for it); ``biased_by_batch_sums``:
    a block whose output is broadcast over the batch gets a biased G (warned)."""

    name = ""
    samples = True
    biased_by_batch_sums = True

    def directions(self, loss: Loss, logits: Tensor, mask: Tensor | None, generator: torch.Generator
                   ) -> list[Tensor]:
        """The ``grad_outputs`` of the sampled backwards (one backward each)."""
        raise NotImplementedError

    def weight(self, w):
        """The factor weight of each direction's ``g gᵀ``, from the loss's ``w`` per term."""
        return w


class MonteCarlo(FisherType):
    """Targets sampled from the model's predictive distribution, ``samples`` backwards. Unbiased
    under batch sums too: the examples' sampled terms are independent with mean 0."""

    name = "mc"
    biased_by_batch_sums = False

    def __init__(self, samples: int = 1):
        self.count = samples

    def directions(self, loss, logits, mask, generator):
        return [loss.sample_output_grads(logits, generator, mask) for _ in range(self.count)]

    def weight(self, w):
        return w / self.count


class Type2(FisherType):
    """The exact expectation over targets: one backward per column of the loss Hessian's square
    root (per class / output)."""

    name = "type-2"

    def directions(self, loss, logits, mask, generator):
        return list(loss.hessian_sqrt(logits, mask))


class Empirical(FisherType):
    """The real labels' gradients, from the user's own backward."""

    name = "empirical"
    samples = False


FISHER_TYPES = ("mc", "empirical", "type-2")


def make_fisher(name: str, mc_samples: int) -> FisherType:
    return {"mc": lambda: MonteCarlo(mc_samples), "type-2": Type2, "empirical": Empirical}[name]()


# ---- Hugging Face defaults ---------------------------------------------------------------------


def default_output_fn(output: Any) -> Tensor:
    """The loss input in what a model returned: the tensor itself; ``.logits`` of a Hugging Face
    ``ModelOutput`` (or a dict's ``"logits"``); else the first tensor of at least one dimension in
    a tuple/list/dict (a leading 0-d loss, as Hugging Face returns with ``return_dict=False``,
    is skipped)."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    for value in values:
        if isinstance(value, Tensor) and value.dim() > 0:
            return value
    raise TypeError(
        f"KFACPreconditioner: cannot find the logits in the model's output ({type(output).__name__}); "
        "pass output_fn=lambda output: <the loss input>"
    )


_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def default_loss_mask(model: nn.Module, args: tuple, kwargs: dict, logits: Tensor, loss: Loss) -> Tensor | None:
    """Which cross-entropy terms (positions of ``logits[..., C]``) the loss counts, from the
    forward's keyword arguments, as Hugging Face models compute their loss:

    * ``labels=``: the positions whose label is not ``loss.ignore_index``; for causal language
      models (class name ending in ``ForCausalLM`` / ``LMHeadModel``) shifted by one, since
      position ``t`` predicts label ``t + 1`` (the last position predicts nothing);
    * else ``attention_mask=`` of the logits' leading shape: the attended positions;
    * else None: every position counts.
    """
    lead = logits.shape[:-1]
    labels = kwargs.get("labels")
    if isinstance(labels, Tensor) and labels.shape == lead:
        counted = labels != loss.ignore_index
        if type(model).__name__.endswith(_CAUSAL_LM_SUFFIXES) and counted.dim() >= 2:
            counted = torch.cat([counted[..., 1:], torch.zeros_like(counted[..., :1])], dim=-1)
        return counted
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.shape == lead:
        return mask != 0
    return None


# ---- one step's statistics ---------------------------------------------------------------------


@dataclasses.dataclass
class CaptureSettings:
    fisher: FisherType
    loss: Loss | None
    reduction: str
    output_fn: Callable[[Any], Tensor]
    loss_mask_fn: Callable[..., Tensor | None] | None
    grad_accumulation_steps: int
    factor_dtype: torch.dtype
    grad_scaler: Any
    factor_rows: int | str | None = None


class Capture:
    """Installs the hooks on ``model`` and its blocks' modules (``installs``: the registration's
    ``(kind, module, blocks)``), and keeps the pending micro-batch and this step's
    :class:`Statistics`. ``factor_step()`` says whether the current step updates factors;
    ``ops`` reduces rows to sums; ``generator`` draws Monte Carlo targets; ``counters`` and
    ``warned`` are the preconditioner's; ``on_forward()`` runs as every forward that is not
    paused begins; ``fold(statistics, kinds)`` takes the step's sums of those kinds into the
    factors: both as a captured micro-batch begins while sums are held (the micro-batches before
    it), G as each sampled backward ends — or, with ``fold_gradient_parts`` (one process: no
    rank has to fold in step with the others), at every reduction in it."""

    def __init__(self, model: nn.Module, blocks: list[Block], installs, settings: CaptureSettings, *,
                 factor_step: Callable[[], bool], ops, generator: torch.Generator, counters: dict,
                 warned: set[str], fold: Callable[[Statistics, tuple[str, ...]], None],
                 fold_gradient_parts: bool = False, on_forward: Callable[[], None] | None = None):
        self.model, self.blocks, self.settings = model, blocks, settings
        self._by_name = {b.name: b for b in blocks}
        self._on_forward, self._fold, self._fold_gradient_parts = on_forward, fold, fold_gradient_parts
        self.fisher = settings.fisher
        self._factor_step, self.ops, self._generator = factor_step, ops, generator
        self._counters, self._warned = counters, warned
        self._paused = 0
        #: :data:`HELD_GRADIENT_BYTES`, or None: every row held until the micro-batch ends (for
        #: benchmarks that replay a micro-batch's reduction)
        self.held_gradient_bytes: int | None = HELD_GRADIENT_BYTES
        self._g_weight: float | Tensor | None = None  # set while a sampled backward runs
        #: M of the last captured forward (a device tensor when counted from a mask)
        self.terms: int | Tensor = 1
        self._empirical_w: float | Tensor | None = None  # the empirical weight of this forward
        self.clear()
        # Block hooks first: when the model is itself a layer, its output hook must exist before
        # the model hook runs the sampled backward (hooks run in registration order).
        self._handles = []
        for kind, module, kind_blocks in installs:
            self._handles += kind.install(module, kind_blocks, self.record)
        self._handles += [model.register_forward_pre_hook(Hook(self._pre_forward), prepend=True)]
        self._handles += [model.register_forward_hook(Hook(self._post_forward), with_kwargs=True)]

    def clear(self) -> None:
        """Drops the pending micro-batch and this step's statistics."""
        self.pending_a: dict[str, list[Tensor]] = {}  # this micro-batch's inputs, by block
        self.pending_g: dict[str, list[tuple[Tensor, float | Tensor]]] = {}  # its gradient rows and weights
        self._backward_began: dict[str, None] = {}  # blocks in pending_a whose backward has begun
        self._held_bytes = 0  # of pending_g, and of the inputs of the blocks above
        self._gradients_seen = False  # whether this micro-batch's backward has begun (for "empirical")
        self.statistics = Statistics(max_rows=self.settings.factor_rows)
        self.taps: list[GradientEdge] = []  # this forward's block outputs, for the sampled backward
        self._batch_rows: list[tuple[int, list[str]]] = []  # this forward's output rows, by blocks

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def pause(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def collect(self) -> Statistics:
        """This step's statistics, the pending micro-batch reduced into them."""
        self.flush()
        return self.statistics

    def _capturing(self) -> bool:
        return not self._paused and self.model.training and torch.is_grad_enabled() and self._factor_step()

    def _scaled(self) -> bool:
        scaler = self.settings.grad_scaler
        return scaler is not None and scaler.is_enabled()

    # ---- hooks -------------------------------------------------------------------------------

    def _pre_forward(self, module, inputs):
        self.taps, self._batch_rows = [], []  # a forward that raised may have left some
        if self._on_forward is not None and not self._paused:
            self._on_forward()
        if not self._capturing():
            return
        self.flush()
        if self.statistics.holds_sums():
            # The micro-batches so far, into the factors, so that no sums are held through this
            # one: under gradient accumulation, or after a step a grad scaler skipped.
            self._fold(self.statistics, ("a", "g"))

    def record(self, pairs: list[tuple[Block, slice | None]], x: Tensor, output: Tensor, layout=None) -> None:
        """Capture callback of the layer kinds: ``x`` went into ``pairs``' blocks, ``output`` came out."""
        if not self._capturing():
            return
        x = (layout(x) if layout is not None else x).detach()
        for block, _ in pairs:
            self.pending_a.setdefault(block.name, []).append(x)
        if self.fisher.biased_by_batch_sums:
            rows = _leading_dim(layout(output) if layout is not None else output)  # examples, or 1
            self._batch_rows.append((rows, [block.name for block, _ in pairs]))
        if output.requires_grad:
            # A tensor hook registered now sees the gradient w.r.t. this value even if an
            # in-place activation modifies the output afterwards.
            output.register_hook(lambda grad: self._grad_hook(pairs, grad, layout))
            if self.fisher.samples:
                self.taps.append(get_gradient_edge(output))

    def _grad_hook(self, pairs, grad: Tensor, layout) -> None:
        weight = self._g_weight
        if weight is None and not self.fisher.samples:
            if self._empirical_w is None:  # once per forward: every hook then shares one weight
                self._empirical_w = self._empirical_weight()
            weight = self._empirical_w
        if weight is None:
            return
        grad = (layout(grad) if layout is not None else grad).detach()
        self._gradients_seen = True
        for block, cols in pairs:
            rows = block.output_grad_rows(grad[..., cols] if cols is not None else grad)
            self.pending_g.setdefault(block.name, []).append((rows, weight))
            self._held_bytes += rows.nbytes
        self._hold_inputs_of([block for block, _ in pairs])
        if self.held_gradient_bytes is not None and self._held_bytes >= self.held_gradient_bytes:
            self._reduce_held()

    def _hold_inputs_of(self, blocks: list[Block]) -> None:
        """The inputs of ``blocks``, whose backward has begun, are reduced with the held gradient
        rows: autograd frees what it saved for a layer once the layer's backward has run, and a
        reference kept until step() would hold every layer's input through the whole backward."""
        held = {id(x): x.nbytes for block in blocks if block.name not in self._backward_began
                for x in self.pending_a.get(block.name, ())}
        self._backward_began.update((block.name, None) for block in blocks if block.name in self.pending_a)
        self._held_bytes += sum(held.values())

    def _empirical_weight(self) -> float | Tensor:
        # Hooks see h = ∂L/∂s of the loss the backward ran on; per-term g = k·s·h (s = M for
        # "mean", undoing the mean; k = accumulation steps, undoing the 1/k of each micro-batch);
        # this micro-batch's G is w Σ g gᵀ, w = 1/M ("mean") or 1: w (k s)² = k² M or k².
        k = self.settings.grad_accumulation_steps
        weight = k**2 * self.terms if self.settings.reduction == "mean" else float(k**2)
        if self._scaled():  # the scale as a device tensor: get_scale() would synchronize
            scaler = self.settings.grad_scaler
            scale = scaler._get_scale_async()
            scale = scale.double() if scale is not None else scaler.get_scale()
            weight = weight / scale**2
        return weight

    def _post_forward(self, module, args, kwargs, output):
        if not self._capturing():
            return
        settings = self.settings
        self.statistics.forwards += 1
        self._empirical_w = None
        if settings.loss is None:  # "empirical" without a loss: one term per example
            self.terms = _leading_dim(settings.output_fn(output))
            return
        logits = settings.output_fn(output)
        self._warn_batch_shared()
        mask = None
        if isinstance(settings.loss, CrossEntropy) and settings.loss_mask_fn is not None:
            mask = settings.loss_mask_fn(self.model, args, kwargs, logits, settings.loss)
        terms = settings.loss.num_terms(logits, mask)  # a tensor when counted on the device
        self.terms = terms.clamp_min(1).double() if isinstance(terms, Tensor) else max(1, terms)
        taps, self.taps = self.taps, []  # the model's own backward frees what they hold
        if not self.fisher.samples or not logits.requires_grad:
            return
        # Non-finite logits give non-finite sampled gradients, hence statistics: the factor
        # update's finite check drops them (no read back here).
        w = 1.0 / self.terms if settings.reduction == "mean" else 1.0
        directions = self.fisher.directions(settings.loss, logits, mask, self._generator)
        self._g_weight = self.fisher.weight(w)
        inputs = sampling_inputs(taps)
        try:
            for v in directions:
                # Backward of the surrogate Σ_n v_nᵀ z_n: the block hooks see per-term g = J_nᵀ v_n.
                torch.autograd.grad(logits, inputs, grad_outputs=v, retain_graph=True, allow_unused=True)
        finally:
            self._g_weight = None
        if self.held_gradient_bytes is not None:  # neither rows nor sums held through the user's backward
            self._reduce_held()
            self._fold(self.statistics, ("a", "g"))

    def _warn_batch_shared(self) -> None:
        """Blocks whose output had one row in a forward where other blocks' had ``N > 1`` (GPT-2's
        position embedding of ``position_ids`` ``[1, T]``) are broadcast over the batch: their
        output gradient arrives summed over the examples, so G is built from batch sums (noted
        under the Fisher types that sums bias only)."""
        seen, self._batch_rows = self._batch_rows, []
        batch = max((rows for rows, _ in seen), default=1)
        if batch <= 1:
            return
        for name in sorted({name for rows, names in seen if rows == 1 for name in names}):
            warn_once(self._warned, f"batch-shared {name}",
                      f"KFACPreconditioner: block {name!r} produced one row where other blocks produced {batch} "
                      "(an input broadcast over the batch, e.g. position_ids of shape [1, T]): its output "
                      f"gradient arrives summed over the batch, so under fisher_type={self.fisher.name!r} its G "
                      "is built from batch sums (biased, and dependent on how the batch is split over ranks); "
                      "pass per-example inputs (position_ids of shape [B, T]) or use fisher_type='mc' (warned "
                      "once per block)")

    # ---- reduction ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Reduces the pending micro-batch to per-block sums: ``Σ ā āᵀ`` (and its row count)
        and ``Σ w g gᵀ``, so that its activations and gradients can be freed."""
        if not self.fisher.samples and self.pending_a and not self._gradients_seen:
            self.pending_a = {}  # a forward no backward followed (e.g. for logging): no statistics
            self.statistics.forwards = max(0, self.statistics.forwards - 1)
            return
        self._backward_began = dict.fromkeys(self.pending_a)
        self._gradients_seen = False
        self._reduce_held()

    def _reduce_held(self) -> None:
        """Reduces the pending output-gradient rows to ``Σ w g gᵀ``, and the inputs of the blocks
        whose backward has begun to ``Σ ā āᵀ`` (each block's rows of the micro-batch at once: a
        mean over a forward's rows cannot be folded in parts)."""
        a_items = [(self._by_name[name], self.pending_a.pop(name)) for name in self._backward_began]
        g_items = [(self._by_name[name], chunks) for name, chunks in self.pending_g.items()]
        self.pending_g, self._backward_began, self._held_bytes = {}, {}, 0
        self._set_phase()
        self.statistics.add_activations(a_items, self.ops, self.settings.factor_dtype)
        self.statistics.add_gradients(g_items, self.ops, self.settings.factor_dtype)
        in_sampled_backward = self._g_weight is not None
        if self._fold_gradient_parts and (in_sampled_backward or self.statistics.held_bytes() >= HELD_SUM_BYTES):
            self._fold(self.statistics, ("a", "g"))  # one process: not held through the rest of the backward

    def _set_phase(self) -> None:
        # the strided row subset moves on with every micro-batch (and resumes from a checkpoint)
        self.statistics.phase = self._counters.get("factor_updates", 0) + self.statistics.forwards


def sampling_inputs(taps: list[GradientEdge]) -> list[GradientEdge]:
    """What the sampled backward differentiates with respect to, so that every block's output
    hook fires: gradient edges of the block outputs as they were recorded. No weight-gradient
    GEMMs are computed, parameters sharded by FSDP2 need not be in the graph, and an output an
    inplace activation modified since is still reached (its edge is the node that produced it,
    where its hook sits; a gradient w.r.t. the modified tensor would stop above it).

    Only the lowest taps are inputs (those no other tap lies below in the graph): every other tap
    is on the way to one of them, so its hook fires all the same, and ``autograd.grad`` returns —
    and holds until it returns — a gradient per input: with every tap an input, that was a second
    copy of every block's output gradient at the forward's memory peak."""
    unique = list({(id(edge.node), edge.output_nr): edge for edge in taps}.values())
    tap_nodes = {id(edge.node) for edge in unique}
    reaches_tap = _reaches(tap_nodes, [edge.node for edge in unique])
    return [edge for edge in unique
            if not any(child is not None and reaches_tap[id(child)] for child, _ in edge.node.next_functions)]


def _reaches(targets: set[int], roots: list) -> dict[int, bool]:
    """For every node below ``roots`` (by ``next_functions``, roots included): whether it is one of
    ``targets`` (by id) or one lies below it. Iterative (graphs are thousands of nodes deep); the
    walk keeps the nodes' Python objects alive, so their ids stay unique."""
    seen: dict[int, bool] = {}
    alive = []
    stack = [(node, False) for node in roots]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            seen[key] = key in targets or any(c is not None and seen[id(c)] for c, _ in node.next_functions)
            continue
        if key in seen:
            continue
        seen[key] = False  # provisional: the graph is acyclic, so nothing below reads it
        alive.append(node)
        stack.append((node, True))
        stack.extend((child, False) for child, _ in node.next_functions if child is not None and id(child) not in seen)
    return seen


def _leading_dim(output: Tensor) -> int:
    return output.shape[0] if output.dim() > 0 else 1
