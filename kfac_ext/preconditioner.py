"""K-FAC preconditioner: captures layer statistics with hooks, keeps the Kronecker factors, inverts
them, and rewrites ``.grad`` with the natural-gradient direction before any optimizer steps.

Factor conventions, per block (:mod:`kfac_ext.layers`), for a step with ``N`` examples of ``T``
positions each (``T`` = positions of ``[B, T, d]`` Linear inputs, output pixels of a convolution,
1 for a plain Linear; ``kfac_approx`` picks how positions enter, see :mod:`kfac_ext.layers.base`):

* ``A = (1/rows) Σ ā āᵀ`` over the activation rows, ``ā = [a, 1]`` (the 1 last; only when the
  block has a trainable bias);
* ``G = w Σ g gᵀ`` over the output-gradient rows, with ``g = ∂ℓ_n/∂s`` the gradient of the
  **per-term** loss ``ℓ_n`` w.r.t. the block's output and ``w = 1/M`` for ``reduction="mean"``
  (``L = (1/M) Σ_n ℓ_n``), ``w = 1`` for ``"sum"``. ``M`` is the number of terms the loss
  averages: the batch size for ``[N, C]`` outputs, and for cross-entropy on ``[B, T, C]``
  logits the number of **counted tokens** (labels other than ``ignore_index``, positions the
  ``loss_mask_fn`` keeps). Either way ``A ⊗ G`` approximates the curvature of the loss as the
  user computes it.

Both are exponential moving averages over steps, ``F ← ρ F + (1-ρ) F_step`` (a block's first
update initialises). ``F_step`` averages the micro-batches of a step: every forward in train mode,
with grad enabled, outside :meth:`KFACPreconditioner.pause`, during a factor-update step counts
as one. Each micro-batch is reduced to per-block sums when the next one starts (or at
``step()``), so gradient accumulation holds one micro-batch of activations, not ``k``. With
``grad_accumulation_steps=k`` the micro-batch losses are assumed divided by ``k`` (the usual
recipe; it matters for "empirical").
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from . import distributed
from . import ops as native_ops
from . import reference as reference_ops
from .layers import KFAC_APPROXIMATIONS, Block, find_blocks
from .layers.base import Hook
from .losses import CrossEntropy, Loss, make_loss
from .ops import Status

__all__ = ["KFACPreconditioner", "default_output_fn", "default_loss_mask"]

Schedule = float | int | Callable[[int], float]

FISHER_TYPES = ("mc", "empirical", "type-2")
INVERSIONS = ("eigen", "cholesky")
DAMPING_MODES = ("tikhonov", "pi", "eigen")
DEFAULT_KL_CLIP = 1e-3
FLUSH_BYTES = 256 * 2**20  # activation rows materialised at once when reducing a micro-batch


def _value(schedule: Schedule | None, step: int):
    return schedule(step) if callable(schedule) else schedule


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



class KFACPreconditioner:
    """Rewrites the gradients of every K-FAC block of ``model`` in place with the natural-gradient
    direction ``(G ⊗ A + damping)⁻¹ ∇W̄``.

    Usage (two added lines)::

        precond = KFACPreconditioner(model, loss="cross_entropy")
        for x, y in data:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            precond.step()          # rewrites .grad
            optimizer.step()

    With a ``torch.amp.GradScaler``: ``scaler.scale(loss).backward()``, ``scaler.unscale_(opt)``,
    ``precond.step()``, ``scaler.step(opt)``, ``scaler.update()`` — unscale first, so the KL clip
    sees true gradients; on an overflow the gradients are left non-finite for the scaler to skip.

    Args:
        model: the model (a Hugging Face model, a ``DistributedDataParallel`` wrapper, ...).
        loss: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``, the matching ``torch.nn``
            module, or a :class:`kfac_ext.losses.Loss`; may be None only with ``"empirical"``.
        reduction: ``"mean"`` or ``"sum"`` (taken from the module when ``loss`` is one).
        fisher_type: ``"mc"`` (targets sampled from the model, ``mc_samples`` extra backward
            passes run for you right after the forward), ``"type-2"`` (the exact expectation over
            targets through the loss Hessian's square root: one extra backward per column, i.e.
            per class / output), or ``"empirical"`` (the real labels' gradients from your backward).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing blocks (see
            :mod:`kfac_ext.layers.base`).
        output_fn: picks the loss input (logits) out of the model's output; default
            :func:`default_output_fn` (a tensor, ``.logits``, or the first non-scalar tensor).
        loss_mask_fn: ``(model, args, kwargs, logits, loss) -> bool [...] | None``: which
            cross-entropy terms count; default :func:`default_loss_mask` (``labels`` /
            ``attention_mask`` keyword arguments, as Hugging Face models take them).
        inversion: ``"eigen"`` or ``"cholesky"``.
        damping_mode: ``"tikhonov"`` (``A + √γ I``, ``G + √γ I``), ``"pi"`` (π-corrected factored
            damping, Martens & Grosse 2015 §6.3) or ``"eigen"`` (exact ``λ_G λ_Aᵀ + γ``; eigen only).
        damping, factor_decay, factor_update_steps, inv_update_steps, lr, kl_clip: a number or a
            callable of the step. ``kl_clip`` rescales the update so that ``lr² Σ ⟨v, g⟩ <=
            kl_clip``; ``"auto"`` (default) is 1e-3 when ``lr`` is known, else off; None is off.
        grad_accumulation_steps: micro-batches (forward + backward) per ``step()``.
        factor_dtype, inv_dtype: float32 or float64 (activations may be bf16/fp16).
        grad_scaler: the ``torch.amp.GradScaler`` scaling your backward: ``"empirical"`` factors
            are unscaled, overflowing steps are left to it, and a step it skipped (a micro-batch
            beyond ``grad_accumulation_steps`` arrives before ``step()``) drops its statistics.
        skip_layers: module types, or regular expressions matched against whole module names,
            to leave to the base optimizer.
        max_factor_dim: blocks with a dense factor side larger than this (a vocabulary-sized
            output layer) are left to the base optimizer.
        backend: ``"native"`` (the C++/CUDA ops) or ``"reference"`` (pure PyTorch); same updates.
        seed: seeds the generator for Monte Carlo targets (saved in ``state_dict``); rank ``r`` of
            a process group uses ``seed + r``.
        grad_worker_fraction: with more than one rank (see :mod:`kfac_ext.distributed`): ``1.0``
            broadcasts every inverse and every rank preconditions every block; below 1, each
            block's owner preconditions it and broadcasts (under FSDP2: scatters) the result at
            every step. Default: 1, or 0 when the parameters are FSDP2 shards.
        process_group: the ranks to work with; default: the world when ``torch.distributed`` is
            initialised. With more than one rank, factors are averaged and inversions spread
            over the ranks; ``model`` may be wrapped in ``DistributedDataParallel``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | nn.Module | Loss | None = None,
        *,
        reduction: str = "mean",
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        output_fn: Callable[[Any], Tensor] = default_output_fn,
        loss_mask_fn: Callable[..., Tensor | None] | None = default_loss_mask,
        inversion: str = "eigen",
        damping_mode: str = "tikhonov",
        damping: Schedule = 1e-3,
        factor_decay: Schedule = 0.95,
        factor_update_steps: Schedule = 1,
        inv_update_steps: Schedule = 10,
        lr: Schedule | None = None,
        kl_clip: Schedule | str | None = "auto",
        grad_accumulation_steps: int = 1,
        factor_dtype: torch.dtype = torch.float32,
        inv_dtype: torch.dtype = torch.float32,
        grad_scaler: torch.amp.GradScaler | None = None,
        skip_layers: tuple[str | type, ...] = (),
        max_factor_dim: int = 8192,
        backend: str = "native",
        seed: int = 0,
        grad_worker_fraction: float | None = None,
        process_group: Any = None,
    ):
        _check_choice("fisher_type", fisher_type, FISHER_TYPES)
        _check_choice("kfac_approx", kfac_approx, KFAC_APPROXIMATIONS)
        _check_choice("inversion", inversion, INVERSIONS)
        _check_choice("damping_mode", damping_mode, DAMPING_MODES)
        _check_choice("backend", backend, ("native", "reference"))
        if damping_mode == "eigen" and inversion != "eigen":
            raise ValueError("damping_mode='eigen' (exact λ_G λ_Aᵀ + γ) needs inversion='eigen'")
        for name, dtype in (("factor_dtype", factor_dtype), ("inv_dtype", inv_dtype)):
            if dtype not in (torch.float32, torch.float64):
                raise ValueError(f"{name} must be torch.float32 or torch.float64, got {dtype}")
        if mc_samples < 1 or grad_accumulation_steps < 1:
            raise ValueError("mc_samples and grad_accumulation_steps must be >= 1")
        self.loss = make_loss(loss, reduction)
        if self.loss is None and fisher_type != "empirical":
            raise ValueError(
                f"fisher_type={fisher_type!r} samples targets from the model's predictive "
                "distribution and needs loss='cross_entropy', 'mse' or 'bce_with_logits'; "
                "use fisher_type='empirical' for other losses"
            )
        self.reduction = self.loss.reduction if self.loss is not None else reduction
        _check_choice("reduction", self.reduction, ("mean", "sum"))
        if kl_clip == "auto":
            kl_clip = DEFAULT_KL_CLIP if lr is not None else None
        if kl_clip is not None and lr is None:
            raise ValueError("kl_clip needs lr (a number or a callable of the step)")

        self.model = model = distributed.unwrap_model(model)  # DDP: hooks and names on the inner module
        self.fisher_type, self.mc_samples, self.kfac_approx = fisher_type, mc_samples, kfac_approx
        self.output_fn, self.loss_mask_fn = output_fn, loss_mask_fn
        self.inversion, self.damping_mode = inversion, damping_mode
        self.damping, self.factor_decay = damping, factor_decay
        self.factor_update_steps, self.inv_update_steps = factor_update_steps, inv_update_steps
        self.lr, self.kl_clip = lr, kl_clip
        self.grad_accumulation_steps = grad_accumulation_steps
        self.factor_dtype, self.inv_dtype = factor_dtype, inv_dtype
        self.grad_scaler = grad_scaler
        self.ops = native_ops if backend == "native" else reference_ops
        self.backend = backend

        registration = find_blocks(model, tuple(skip_layers), kfac_approx, max_factor_dim)
        self.blocks: list[Block] = registration.blocks
        self.unregistered: list[tuple[str, str]] = registration.others
        if not self.blocks:
            raise ValueError(
                "model has no layer K-FAC preconditions (Linear, Conv1d/2d, Hugging Face Conv1D, "
                "MultiheadAttention, Embedding); left to the base optimizer: "
                + "; ".join(f"{n or '<model>'}: {r}" for n, r in self.unregistered)
            )
        self._module_count = sum(1 for _ in model.modules())
        self._dist = distributed.setup(self, process_group=process_group,
                                       grad_worker_fraction=grad_worker_fraction, seed=seed)
        rank = self._dist.rank if self._dist is not None else 0
        self.generator = torch.Generator(device=self.blocks[0].device).manual_seed(seed + rank)

        self.steps = 0
        # ∇W̄ per block before the last step() rewrote it (under FSDP2 with owners, None for the
        # blocks another rank preconditions)
        self.last_raw_gradients: list[Tensor | None] = []
        self.stats = dict(
            factor_updates=0, inverse_updates=0, skipped_factor_updates=0, nonfinite_grad_steps=0,
            failed_inversions=0, fp64_retries=0, kl_clip_scale=1.0, discarded_micro_batches=0,
        )
        self._inverse_form = inversion == "cholesky" or damping_mode != "eigen"
        self._groups: dict[tuple, list] = {}  # shape groups of blocks with stacked inverses (see _grouped)
        self._a: dict[str, Tensor] = {}  # factors by block name (A of an embedding: its diagonal)
        self._g: dict[str, Tensor] = {}
        self._inv: dict[str, tuple] = {}  # per block: (A side, G side) inverse or (λ, Q)
        self._warned: set[str] = set()
        self._paused = 0
        self._g_weight: float | Tensor | None = None  # set while a sampling backward runs
        self._terms: int | Tensor = 1  # M of the last captured forward (the empirical weight needs it)
        self._empirical_w: float | Tensor | None = None  # the empirical weight of this forward
        self._clear_pending()
        # Block hooks first: when the model is itself a layer, its output hook must exist before
        # the model hook runs the sampled backward (hooks run in registration order).
        self._handles = []
        for kind, module, blocks in registration.installs:
            self._handles += kind.install(module, blocks, self._record)
        self._handles += [model.register_forward_pre_hook(Hook(self._model_pre_hook), prepend=True)]
        self._handles += [model.register_forward_hook(Hook(self._model_hook), with_kwargs=True)]

    @property
    def stats(self) -> dict[str, Any]:
        """Counters (factor/inverse updates, skipped and non-finite steps, failed inversions,
        float64 retries, discarded micro-batches) and the last KL-clip scale. Steps keep the
        non-finite count and the clip scale on the device, so that they need not synchronize;
        reading ``stats`` brings them to the host."""
        if self._nonfinite_pending is not None:
            self._stats["nonfinite_grad_steps"] += int(self._nonfinite_pending)
            self._nonfinite_pending = None
        if self._kl_scale is not None:
            self._stats["kl_clip_scale"] = float(self._kl_scale)
            self._kl_scale = None
        return self._stats

    @stats.setter
    def stats(self, value: dict[str, Any]) -> None:
        self._stats = dict(value)
        self._nonfinite_pending: Tensor | None = None  # non-finite steps not yet added to _stats
        self._kl_scale: Tensor | None = None  # the last step's clip scale, not yet read

    def _count_nonfinite(self, skipped: Tensor) -> None:
        """Adds ``skipped`` (a 0-d bool on the device) to the non-finite step count, on the device."""
        skipped = skipped.to(torch.int64)
        self._nonfinite_pending = skipped if self._nonfinite_pending is None else self._nonfinite_pending + skipped

    # ---- capture ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def pause(self):
        """Forwards inside ``with precond.pause():`` are not captured (an evaluation or logging
        forward in train mode, a second loss on the same model)."""
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    def _capturing(self) -> bool:
        return (not self._paused and self.model.training and torch.is_grad_enabled()
                and self._is_factor_step())

    def _is_factor_step(self) -> bool:
        return self.steps % max(1, int(_value(self.factor_update_steps, self.steps))) == 0

    def _model_pre_hook(self, module, inputs):
        self._taps, self._batch_rows = [], []  # a forward that raised may have left some
        if not self._capturing():
            return
        if self.grad_scaler is not None and self._forwards >= self.grad_accumulation_steps:
            # A full step's micro-batches and no step(): the scaler skipped it (an overflow).
            self._stats["discarded_micro_batches"] += self._forwards
            self._clear_pending()
        self._flush()

    def _record(self, pairs: list[tuple[Block, slice | None]], x: Tensor, output: Tensor, layout=None) -> None:
        """Capture callback of the layer kinds: ``x`` went into ``pairs``' blocks, ``output`` came out."""
        if not self._capturing():
            return
        x = (layout(x) if layout is not None else x).detach()
        for block, _ in pairs:
            self._pending_a.setdefault(block.name, []).append(x)
        if self.fisher_type != "mc":  # batch-broadcast outputs only bias the other Fisher types
            rows = _leading_dim(layout(output) if layout is not None else output)  # examples, or 1
            self._batch_rows.append((rows, [block.name for block, _ in pairs]))
        if output.requires_grad:
            # A tensor hook registered now sees the gradient w.r.t. this value even if an
            # in-place activation modifies the output afterwards.
            output.register_hook(lambda grad: self._grad_hook(pairs, grad, layout))
            if self.fisher_type != "empirical":
                self._taps.append(get_gradient_edge(output))

    def _grad_hook(self, pairs, grad: Tensor, layout) -> None:
        weight = self._g_weight
        if weight is None and self.fisher_type == "empirical":
            if self._empirical_w is None:  # once per forward: every hook then shares one weight
                self._empirical_w = self._empirical_weight()
            weight = self._empirical_w
        if weight is None:
            return
        grad = (layout(grad) if layout is not None else grad).detach()
        for block, cols in pairs:
            rows = block.output_grad_rows(grad[..., cols] if cols is not None else grad)
            self._pending_g.setdefault(block.name, []).append((rows, weight))

    def _empirical_weight(self) -> float | Tensor:
        # Hooks see h = ∂L/∂s of the loss the backward ran on; per-term g = k·s·h (s = M for
        # "mean", undoing the mean; k = accumulation steps, undoing the 1/k of each micro-batch);
        # this micro-batch's G is w Σ g gᵀ, w = 1/M ("mean") or 1: w (k s)² = k² M or k².
        k = self.grad_accumulation_steps
        weight = k**2 * self._terms if self.reduction == "mean" else float(k**2)
        if self._scaled():  # the scale as a device tensor: get_scale() would synchronize
            scale = self.grad_scaler._get_scale_async()
            scale = scale.double() if scale is not None else self.grad_scaler.get_scale()
            weight = weight / scale**2
        return weight

    def _model_hook(self, module, args, kwargs, output):
        if not self._capturing():
            return
        self._forwards += 1
        self._empirical_w = None
        if self.loss is None:  # "empirical" without a loss: one term per example
            self._terms = _leading_dim(self.output_fn(output))
            return
        logits = self.output_fn(output)
        self._warn_batch_shared()
        mask = None
        if isinstance(self.loss, CrossEntropy) and self.loss_mask_fn is not None:
            mask = self.loss_mask_fn(self.model, args, kwargs, logits, self.loss)
        terms = self.loss.num_terms(logits, mask)  # a tensor when counted on the device
        self._terms = terms.clamp_min(1).double() if isinstance(terms, Tensor) else max(1, terms)
        taps, self._taps = self._taps, []  # the model's own backward frees what they hold
        if self.fisher_type == "empirical" or not logits.requires_grad:
            return
        # Non-finite logits give non-finite sampled gradients, hence statistics: the factor
        # update's finite check drops them (no read back here).
        w = 1.0 / self._terms if self.reduction == "mean" else 1.0
        if self.fisher_type == "mc":
            directions = [self.loss.sample_output_grads(logits, self.generator, mask) for _ in range(self.mc_samples)]
            weight = w / self.mc_samples
        else:
            directions = list(self.loss.hessian_sqrt(logits, mask))
            weight = w
        self._g_weight = weight
        inputs = _sampling_inputs(taps)
        try:
            for v in directions:
                # Backward of the surrogate Σ_n v_nᵀ z_n: the block hooks see per-term g = J_nᵀ v_n.
                torch.autograd.grad(logits, inputs, grad_outputs=v, retain_graph=True, allow_unused=True)
        finally:
            self._g_weight = None

    def _warn_batch_shared(self) -> None:
        """Blocks whose output had one row in a forward where other blocks' had ``N > 1`` (GPT-2's
        position embedding of ``position_ids`` ``[1, T]``) are broadcast over the batch: their
        output gradient arrives summed over the examples, so G is built from batch sums.
        Unbiased under "mc" (the examples' sampled terms are independent with mean 0), so
        ``_record`` notes the rows under the other Fisher types only."""
        seen, self._batch_rows = self._batch_rows, []
        batch = max((rows for rows, _ in seen), default=1)
        if batch <= 1:
            return
        for name in sorted({name for rows, names in seen if rows == 1 for name in names}):
            if f"batch-shared {name}" in self._warned:
                continue
            self._warned.add(f"batch-shared {name}")
            warnings.warn(
                f"KFACPreconditioner: block {name!r} produced one row where other blocks produced {batch} "
                "(an input broadcast over the batch, e.g. position_ids of shape [1, T]): its output "
                f"gradient arrives summed over the batch, so under fisher_type={self.fisher_type!r} its G "
                "is built from batch sums (biased, and dependent on how the batch is split over ranks); "
                "pass per-example inputs (position_ids of shape [B, T]) or use fisher_type='mc' (warned "
                "once per block)", RuntimeWarning, stacklevel=2)

    def _flush(self) -> None:
        """Reduces the pending micro-batch to per-block sums: ``Σ ā āᵀ`` (and its row count)
        and ``Σ w g gᵀ``, so that its activations and gradients can be freed."""
        if self.fisher_type == "empirical" and self._pending_a and not self._pending_g:
            self._pending_a = {}  # a forward no backward followed (e.g. for logging): no statistics
            self._forwards = max(0, self._forwards - 1)
            return
        by_name = {b.name: b for b in self.blocks}
        a_items = [(by_name[name], xs) for name, xs in self._pending_a.items()]
        g_items = [(by_name[name], chunks) for name, chunks in self._pending_g.items()]
        self._pending_a, self._pending_g = {}, {}
        self._reduce_activations(a_items)
        self._reduce_gradients(g_items)

    def _reduce_activations(self, items) -> None:
        dense, same_rows = [], []  # blocks with rows of their own / rows another block has too
        firsts: dict[tuple, tuple[Block, int]] = {}
        for block, xs in items:
            # Blocks that saw the same inputs and read them alike (q, k, v of self-attention)
            # have the same rows: they are built, and Σ ā āᵀ reduced, once.
            key = (tuple(id(x) for x in xs), type(block).activation_rows, block.approx, block.has_bias, block.a_dim)
            if key in firsts:
                first, count = firsts[key]
                if count:
                    self._a_rows[block.name] = self._a_rows.get(block.name, 0) + count
                    same_rows.append((block, first))
                continue
            rows = _cat([block.activation_rows(x) for x in xs])
            firsts[key] = (block, rows.shape[0])
            if rows.shape[0] == 0:  # e.g. an expert no token was routed to
                continue
            self._a_rows[block.name] = self._a_rows.get(block.name, 0) + rows.shape[0]
            if block.a_diagonal:
                # index_add_, not bincount: bincount reads the largest index back to the host
                counts = torch.zeros(block.a_dim, dtype=self.factor_dtype, device=rows.device)
                counts.index_add_(0, rows, torch.ones(rows.shape, dtype=self.factor_dtype, device=rows.device))
                _accumulate(self._a_sum, block.name, counts)
            else:
                dense.append((block, rows))
        sums: dict[str, Tensor] = {}
        for batch in _by_budget(dense, lambda item: item[1]):
            totals = [torch.empty(b.a_dim, b.a_dim, dtype=self.factor_dtype, device=r.device) for b, r in batch]
            self._factor_update(totals, [r for _, r in batch], [1.0] * len(batch), [b.has_bias for b, _ in batch])
            sums.update((b.name, t) for (b, _), t in zip(batch, totals))
        for block, _ in dense:
            _accumulate(self._a_sum, block.name, sums[block.name])
        for block, first in same_rows:
            _accumulate(self._a_sum, block.name, sums[first.name])

    def _reduce_gradients(self, items) -> None:
        work = [(block, _weighted_cat(chunks)) for block, chunks in items]
        work = [(block, (g, w)) for block, (g, w) in work if g.shape[0] > 0]
        for batch in _by_budget(work, lambda item: item[1][0]):
            sums = [torch.empty(b.g_dim, b.g_dim, dtype=self.factor_dtype, device=g.device) for b, (g, _) in batch]
            scales = [1.0 if isinstance(w, Tensor) else w for _, (_, w) in batch]  # the op takes host numbers
            self._factor_update(sums, [g for _, (g, _) in batch], scales, [False] * len(batch))
            for (block, (_, w)), total in zip(batch, sums):
                _accumulate(self._g_sum, block.name, total.mul_(w) if isinstance(w, Tensor) else total)

    def _factor_update(self, factors, xs, scales, append_ones) -> None:
        """``factors[i] = scales[i] · x̄ᵀx̄``, one native call per activation dtype."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, x in enumerate(xs):
            by_dtype.setdefault(x.dtype, []).append(i)
        for idx in by_dtype.values():
            self.ops.factor_update_([factors[i] for i in idx], [xs[i] for i in idx], decay=0.0,
                                    scales=[scales[i] for i in idx], append_ones=[append_ones[i] for i in idx])

    # ---- step ------------------------------------------------------------------------------

    def step(self) -> Tensor:
        """Updates factors / inverses when due and rewrites ``.grad`` of every block that has
        inverses and a gradient (a block that did not run this step keeps ``.grad`` None).

        Returns a 0-d bool tensor on the blocks' device: False when the gradients were not finite.
        Then the blocks' gradients are zeroed (never NaN into parameters) — or, with a
        ``grad_scaler``, left for the scaler to see — the step's statistics are dropped, and the
        step is counted in ``stats``. A step that updates no factors and no inverses decides all
        of this on the device and never synchronizes with it; reading the flag does.
        """
        ran = [b for b in self.blocks if b.weight.grad is not None]
        if not ran:
            raise RuntimeError("KFACPreconditioner.step(): no block has a gradient; call loss.backward() before step()")
        for block in ran:
            block.ensure_bias_grad()
        if self._sharded():  # whole on the ranks that precondition them, None elsewhere
            finite = _all_finite([g.to_local() for b in ran for g in b.grads()])
            grads = self._dist.gather_gradients(self.blocks)
        else:  # one check per block
            grads = [b.grad_matrix() for b in self.blocks]
            finite = _all_finite([g for g in grads if g is not None])
        self.last_raw_gradients = grads
        if self._dist is not None:  # all ranks skip together
            finite = self._dist.all_finite(finite)
        if self._is_factor_step():
            self._check_model_unchanged()
            self._flush()
            if not self._update_factors(finite):
                return self._nonfinite_step(ran, finite)
        if self._a and (self._inv.keys() != self._a.keys() or self.steps % max(1, int(_value(self.inv_update_steps, self.steps))) == 0):
            self._update_inverses()
        self._precondition(grads, finite)
        self._count_nonfinite(~finite)
        self._finish_step()
        return finite

    def _nonfinite_step(self, ran: list[Block], finite: Tensor) -> Tensor:
        self._count_nonfinite(~finite)  # every rank got the same flag: all skip alike
        self._stats["skipped_factor_updates"] += 1
        if not self._scaled():
            for block in ran:
                block.mask_grad_(finite)  # finite is False: zeros
        self._finish_step()
        return finite

    def _scaled(self) -> bool:
        return self.grad_scaler is not None and self.grad_scaler.is_enabled()

    def _sharded(self) -> bool:
        """FSDP2 row-sharded parameters: gradients are gathered to the ranks that precondition."""
        return self._dist is not None and self._dist.sharded

    def _finish_step(self) -> None:
        self._clear_pending()
        self.steps += 1

    def _check_model_unchanged(self) -> None:
        count = sum(1 for _ in self.model.modules())
        if count == self._module_count:
            return
        known = {b.name for b in self.blocks} | {name for name, _ in self.unregistered}
        for block in find_blocks(self.model).blocks:
            if block.name not in known:
                raise RuntimeError(
                    f"KFACPreconditioner: layer {block.name!r} was added to the model after the "
                    "preconditioner was built; build a new preconditioner"
                )
        self._module_count = count

    def _update_factors(self, grads_finite: Tensor) -> bool:
        """The moving average of the step's statistics. Returns False iff the gradients were not
        finite (then nothing is updated). The gradients' and the statistics' finite flags are read
        back together: one synchronization per factor step."""
        have = [b for b in self.blocks if b.name in self._a_sum and b.name in self._g_sum]
        if self._dist is not None and len(have) != len(self.blocks):
            missing = [b.name for b in self.blocks if b not in have]
            raise RuntimeError(
                f"KFACPreconditioner: blocks {missing} captured no statistics in this step; with "
                "more than one rank every block must run in every factor-update step (pass the "
                "others in skip_layers)"
            )
        if not have:
            if not bool(grads_finite):
                return False
            self._no_statistics()
            return True
        # This step's A = Σāāᵀ / rows and G = Σ w g gᵀ / forwards: the sums with their weights,
        # so the EMA scales each sum once (no separate division pass).
        a_steps = [(self._a_sum[b.name], 1.0 / self._a_rows[b.name]) for b in have]
        g_steps = [(self._g_sum[b.name], 1.0 / self._forwards) for b in have]
        stats_finite = _all_finite([t for t, _ in a_steps + g_steps])
        if self._dist is not None:  # all ranks skip together
            stats_finite = self._dist.all_finite(stats_finite)
        grads_ok, stats_ok = torch.stack([grads_finite, stats_finite]).tolist()
        if not grads_ok:
            return False
        if not stats_ok:
            self._stats["skipped_factor_updates"] += 1
            return True
        rho = float(_value(self.factor_decay, self.steps))
        for block, a, g in zip(have, a_steps, g_steps):
            for store, (total, weight) in ((self._a, a), (self._g, g)):
                if block.name in store:
                    store[block.name].mul_(rho).add_(total, alpha=(1 - rho) * weight)
                else:  # out of place: blocks sharing their inputs share one sum
                    store[block.name] = total * weight
        if self._dist is not None:  # mean over the ranks
            self._dist.average_factors([self._a[b.name] for b in have] + [self._g[b.name] for b in have])
        self._stats["factor_updates"] += 1
        return True

    def _no_statistics(self) -> None:
        """A factor-update step that captured nothing: fine once factors exist (they stay as they
        are); before that K-FAC has no curvature at all, which is an error worth explaining."""
        self._stats["skipped_factor_updates"] += 1
        why = ("the model is in eval mode" if not self.model.training else
               "its forwards ran under torch.no_grad() or precond.pause(), or no backward followed them")
        if self._a:
            if "no statistics" not in self._warned:
                self._warned.add("no statistics")
                warnings.warn(f"KFACPreconditioner.step(): no layer statistics were captured in step "
                              f"{self.steps} ({why}); the factors stay as they are (warned once)",
                              RuntimeWarning, stacklevel=3)
            return
        raise RuntimeError(
            "KFACPreconditioner.step(): no layer statistics were captured in this factor-update step "
            f"and no factors exist yet: {why}. Run the training forward with model.train() and "
            "gradients enabled, then loss.backward(), before step()"
        )

    # ---- inversion -------------------------------------------------------------------------

    def _factor_damping(self, blocks: list[Block]) -> tuple[list[float], list[float]]:
        """Per-block damping added to A and to G (zero for exact eigen damping)."""
        gamma = float(_value(self.damping, self.steps))
        if gamma <= 0 or not math.isfinite(gamma):
            raise ValueError(f"KFACPreconditioner: damping must be finite and > 0, got {gamma}")
        n = len(blocks)
        if self.damping_mode == "eigen":
            return [0.0] * n, [0.0] * n
        root = math.sqrt(gamma)
        if self.damping_mode == "tikhonov":
            return [root] * n, [root] * n
        traces = torch.stack([torch.stack([_trace(self._a[b.name]) / b.a_dim, self._g[b.name].trace() / b.g_dim])
                              for b in blocks]).tolist()
        pis = [math.sqrt(ta / tg) if ta > 0 and tg > 0 and math.isfinite(ta / tg) else 1.0 for ta, tg in traces]
        return [pi * root for pi in pis], [root / pi for pi in pis]

    def _update_inverses(self) -> None:
        blocks = [b for b in self.blocks if b.name in self._a]
        factors = [self._a[b.name].to(self.inv_dtype) for b in blocks]
        factors += [self._g[b.name].to(self.inv_dtype) for b in blocks]
        a_damp, g_damp = self._factor_damping(blocks)
        n = len(blocks)
        if self._dist is not None:  # each factor inverted by its owner; status (and results) shared
            results, status = self._dist.invert(factors, a_damp + g_damp)
        else:
            results, status = self._invert(factors, a_damp + g_damp)
        for i, block in enumerate(blocks):
            previous = self._inv.get(block.name, (None, None))
            a_new = self._accept(block, "A", status[i], results[i], previous[0], self._a[block.name])
            g_new = self._accept(block, "G", status[n + i], results[n + i], previous[1], self._g[block.name])
            self._inv[block.name] = (a_new, g_new)
        self._groups = {}
        self._stats["inverse_updates"] += 1

    def _invert(self, factors: list[Tensor], damping: list[float]) -> tuple[list[tuple], list[int]]:
        """Per factor ``(inverse,)`` (cholesky) or ``(λ + damping, Q)`` (eigen), and its status;
        a diagonal factor (a vector) gives ``(1 / (a + damping),)`` or ``(a + damping, None)``."""
        dense = [i for i, f in enumerate(factors) if f.dim() == 2]
        results: list[tuple] = [()] * len(factors)
        status = [int(Status.OK)] * len(factors)
        if dense:
            got, codes = self._invert_dense([factors[i] for i in dense], [damping[i] for i in dense])
            for i, r, c in zip(dense, got, codes):
                results[i], status[i] = r, c
        for i, f in enumerate(factors):
            if f.dim() == 1:
                results[i], status[i] = _invert_diagonal(f, damping[i], self._inverse_form)
        return results, status

    def _invert_dense(self, factors: list[Tensor], damping: list[float]) -> tuple[list[tuple], list[int]]:
        """Per factor ``(inverse,)`` in the inverse form (cholesky, or eigen with factored
        damping: ``Q diag(1 / (λ + d)) Qᵀ``, so that preconditioning takes 2 GEMMs per block,
        not 4), else ``(λ + d, Q)``. Identical factors with identical damping (the A factors of
        self-attention's q, k and v) are inverted once and share the result."""
        firsts, source = _distinct(factors, damping)
        results, status = self._invert_distinct([factors[i] for i in firsts], [damping[i] for i in firsts])
        return [results[j] for j in source], [status[j] for j in source]

    def _invert_distinct(self, factors: list[Tensor], damping: list[float]) -> tuple[list[tuple], list[int]]:
        if self.inversion == "cholesky":
            inverses, status = self.ops.damped_inverse(factors, damping)
            results = [(inv,) for inv in inverses]
        else:
            values, vectors, status = self.ops.eigen_decompose(factors)
            if self._inverse_form:
                results = [((q * (1.0 / (lam + d))) @ q.mT,) for lam, q, d in zip(values, vectors, damping)]
            else:
                results = [(lam + d, q) for lam, q, d in zip(values, vectors, damping)]
        return results, status.tolist()

    def _accept(self, block: Block, side: str, status: int, result: tuple, previous, factor: Tensor):
        if status == Status.OK_AFTER_FP64_RETRY:
            self._stats["fp64_retries"] += 1
        if status in (Status.OK, Status.OK_AFTER_FP64_RETRY):
            return result
        self._stats["failed_inversions"] += 1
        key = f"{block.name}.{side}"
        if key not in self._warned:
            self._warned.add(key)
            fallback = "the previous inverse" if previous is not None else "the identity"
            warnings.warn(
                f"KFACPreconditioner: inverting factor {side} of block {block.name!r} failed "
                f"({Status(status).name}) even in float64; using {fallback} (warned once per factor)",
                RuntimeWarning,
                stacklevel=3,
            )
        if previous is not None:
            return previous
        return _identity_inverse(factor.shape[0], factor.dim() == 1, self._inverse_form, self.inv_dtype, factor.device)

    # ---- preconditioning -------------------------------------------------------------------

    def _precondition(self, grads: list[Tensor | None], finite: Tensor) -> None:
        """Rewrites ``.grad`` of every block with a gradient: the clipped natural-gradient
        direction where inverses exist, the raw gradient elsewhere; zeros (or, with a grad scaler,
        the raw gradient) when ``finite`` is False. Decided on the device: no synchronization.
        ``grads`` is None for a block that did not run (and, under FSDP2 with owners, for a
        block another rank preconditions)."""
        ran = [b.weight.grad is not None for b in self.blocks]
        ready = [i for i, b in enumerate(self.blocks) if ran[i] and b.name in self._inv]
        if ready and self._sharded() and self._dist.shares_gradients:  # owners precondition, then scatter
            here = [i for i in ready if grads[i] is not None]
            results = self._directions([self.blocks[i] for i in here], [grads[i] for i in here], finite)
            self._dist.scatter_gradients(self.blocks, ready, dict(zip(here, results)))
        elif ready:
            blocks = [self.blocks[i] for i in ready]
            for block, direction in zip(blocks, self._directions(blocks, [grads[i] for i in ready], finite)):
                block.set_grad(direction)
        if not self._scaled():
            ready_set = set(ready)
            for i, block in enumerate(self.blocks):
                if ran[i] and i not in ready_set:  # no inverses yet: the raw gradient, if finite
                    block.mask_grad_(finite)

    def _directions(self, blocks: list[Block], grads: list[Tensor], finite: Tensor) -> list[Tensor]:
        """The clipped preconditioned gradients of ``blocks`` where ``finite``; zeros (the raw
        gradients with a grad scaler) where not."""
        if self._dist is not None and self._dist.shares_gradients and not self._sharded():
            updates = self._dist.precondition(blocks, grads)  # owners precondition, then broadcast
        else:
            updates = self._apply_inverses(blocks, grads)
        nu = self._kl_clip_scale(updates, grads)
        return [torch.where(finite, u.mul_(nu) if nu is not None else u, g if self._scaled() else 0.0)
                for u, g in zip(updates, grads)]

    def _apply_inverses(self, blocks: list[Block], grads: list[Tensor]) -> list[Tensor]:
        """The preconditioned gradient of each of ``blocks`` (``grads`` in the same order); blocks
        of one shape go through one batched GEMM per side (:meth:`_grouped`)."""
        gamma = float(_value(self.damping, self.steps)) if self.damping_mode == "eigen" else 0.0
        updates: list[Tensor] = [None] * len(blocks)  # type: ignore[list-item]
        for indices, a_side, g_side in self._grouped(blocks, grads):
            batch = [grads[i] for i in indices]
            stacked = batch[0] if len(batch) == 1 else torch.stack(batch)
            if blocks[indices[0]].a_diagonal:  # an embedding's diagonal A: a group of its own
                got = _precondition_diagonal_a(stacked, a_side, g_side, self._inverse_form, gamma)
            elif self._inverse_form:
                got = self.ops.precondition_inverse([g_side[0]], [stacked], [a_side[0]])[0]
            else:
                got = self.ops.precondition_eigen([g_side[1]], [g_side[0]], [stacked], [a_side[1]], [a_side[0]], gamma)[0]
            if len(indices) == 1:
                updates[indices[0]] = got
            else:
                for i, u in zip(indices, got.unbind(0)):
                    updates[i] = u
        return updates

    def _grouped(self, blocks: list[Block], grads: list[Tensor]) -> list[tuple[list[int], tuple, tuple]]:
        """``blocks`` (indices into it) in groups of one gradient shape and dtype, each with its
        inverses stacked ``[k, n, n]`` (a group of one keeps its own tensors). Built once per
        inversion and cached: stacking at every step would copy every inverse every step."""
        key = tuple((b.name, g.dtype) for b, g in zip(blocks, grads))
        if key not in self._groups:
            members: dict[tuple, list[int]] = {}
            for i, (block, g) in enumerate(zip(blocks, grads)):
                shape = ("diagonal", i) if block.a_diagonal else (tuple(g.shape), g.dtype)
                members.setdefault(shape, []).append(i)
            groups = []
            for indices in members.values():
                sides = [self._inv[blocks[i].name] for i in indices]
                a_side, g_side = (tuple(_stack([s[k][j] for s in sides]) for j in range(len(sides[0][k])))
                                  for k in (0, 1))
                groups.append((indices, a_side, g_side))
                if len(indices) > 1:  # the blocks' inverses become views of the stacks: no second copy
                    for m, i in enumerate(indices):
                        self._inv[blocks[i].name] = tuple(tuple(t[m] for t in side) for side in (a_side, g_side))
            self._groups[key] = groups
        return self._groups[key]

    def _kl_clip_scale(self, updates: list[Tensor], grads: list[Tensor]) -> Tensor | None:
        """``ν = min(1, sqrt(kl_clip / (lr² Σ ⟨v, g⟩)))`` as a 0-d tensor on the device (None
        when clipping is off)."""
        kl_clip = _value(self.kl_clip, self.steps)
        if kl_clip is None:
            self._kl_scale = None
            self._stats["kl_clip_scale"] = 1.0
            return None
        lr = float(_value(self.lr, self.steps))
        dots = [_dot(u, g) for u, g in zip(updates, grads)]
        vg = torch.stack(dots).sum() if dots else torch.zeros((), dtype=torch.float64, device=self.blocks[0].device)
        if self._sharded() and self._dist.shares_gradients:  # each rank holds its blocks' terms
            vg = self._dist.all_sum(vg)
        vg = vg * lr**2
        nu = torch.where(vg != 0, (kl_clip / vg.abs()).sqrt().clamp(max=1.0), 1.0)
        self._kl_scale = nu
        return nu

    # ---- inspection and checkpoints -------------------------------------------------------

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{block name: (A, G)}`` as defined in the module docstring (A of an embedding is its
        diagonal); empty before the first update."""
        return {b.name: (self._a[b.name], self._g[b.name]) for b in self.blocks if b.name in self._a}

    def memory_usage(self) -> dict[str, int]:
        """Bytes held for the factors, the inverses (or eigendecompositions), and their total."""
        factors = _bytes(list(self._a.values()) + list(self._g.values()))
        inverses = _bytes([t for sides in self._inv.values() for side in sides for t in side if isinstance(t, Tensor)])
        return dict(factors=factors, inverses=inverses, total=factors + inverses)

    def registration_report(self) -> str:
        lines = [f"KFACPreconditioner(fisher_type={self.fisher_type!r}, kfac_approx={self.kfac_approx!r}, "
                 f"inversion={self.inversion!r}, damping_mode={self.damping_mode!r}, backend={self.backend!r}, "
                 f"loss={self.loss!r})",
                 "  preconditioned blocks:"]
        for b in self.blocks:
            a = f"A {b.a_dim} (diagonal)" if b.a_diagonal else f"A {b.a_dim}x{b.a_dim}"
            lines.append(f"    {b.name}: {type(b.module).__name__}, {a}, G {b.g_dim}x{b.g_dim}")
        if self.unregistered:
            lines.append("  left to the base optimizer:")
            lines += [f"    {name or '<model>'}: {reason}" for name, reason in self.unregistered]
        return "\n".join(lines)

    __repr__ = registration_report

    def state_dict(self) -> dict[str, Any]:
        state = dict(
            steps=self.steps,
            stats=dict(self.stats),
            factors={name: (self._a[name], self._g[name]) for name in self._a},
            inverses=dict(self._inv),
            generator=self.generator.get_state(),
            damping=self.damping if not callable(self.damping) else None,
            warned=sorted(self._warned),
        )
        if self._dist is not None:  # only the inverses held here; whose generator state this is
            self._dist.adjust_state_dict(state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict`; every tensor moves to its block's device (a checkpoint
        saved on CPU resumes on CUDA). A generator state of another device type restarts the Monte
        Carlo stream from a seed derived from it (with a warning)."""
        devices = {b.name: b.device for b in self.blocks}
        unknown = set(state["factors"]) - devices.keys()
        if unknown:
            raise ValueError(f"state_dict has factors for blocks this model does not have: {sorted(unknown)}")

        def to(name, t):
            return t.to(devices[name], copy=True) if isinstance(t, Tensor) else t

        self.steps = state["steps"]
        self.stats = dict(state["stats"])
        self._a = {name: to(name, a) for name, (a, _) in state["factors"].items()}
        self._g = {name: to(name, g) for name, (_, g) in state["factors"].items()}
        self._inv = {name: tuple(tuple(to(name, t) for t in side) for side in sides)
                     for name, sides in state["inverses"].items()}
        self._groups = {}
        self._load_generator(state["generator"])
        if self._dist is not None:  # other ranks than the saving one start their own stream
            self._dist.load_generator(state)
        if state.get("damping") is not None and not callable(self.damping):
            self.damping = state["damping"]
        self._warned = set(state["warned"])
        self._clear_pending()

    def _load_generator(self, generator_state: Tensor) -> None:
        generator_state = generator_state.cpu()
        if generator_state.numel() == self.generator.get_state().numel():
            self.generator.set_state(generator_state)
            return
        seed = int(torch.frombuffer(bytearray(generator_state.numpy().tobytes()[:8].ljust(8, b"\0")), dtype=torch.int64)[0])
        self.generator.manual_seed(seed & (2**63 - 1))
        warnings.warn("KFACPreconditioner.load_state_dict: the Monte Carlo generator state was saved on "
                      "another device type; the sampling stream restarts from a seed derived from it",
                      RuntimeWarning, stacklevel=3)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _clear_pending(self) -> None:
        self._pending_a: dict[str, list[Tensor]] = {}  # this micro-batch's inputs, by block
        self._pending_g: dict[str, list[tuple[Tensor, float]]] = {}  # its gradient rows and weights
        self._a_sum: dict[str, Tensor] = {}  # this step's reduced micro-batches
        self._a_rows: dict[str, int] = {}
        self._g_sum: dict[str, Tensor] = {}
        self._forwards = 0  # captured forwards (micro-batches) of this step
        self._taps: list[GradientEdge] = []  # this forward's block outputs, for the sampled backward
        self._batch_rows: list[tuple[int, list[str]]] = []  # this forward's output rows, by blocks


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _leading_dim(output: Tensor) -> int:
    return output.shape[0] if output.dim() > 0 else 1


def _cat(chunks: list[Tensor]) -> Tensor:
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _sampling_inputs(taps: list[GradientEdge]) -> list[GradientEdge]:
    """What the sampled backward differentiates with respect to, so that every block's output
    hook fires: the gradient edges of the block outputs as they were recorded. No weight-gradient
    GEMMs are computed, parameters sharded by FSDP2 need not be in the graph, and an output an
    inplace activation modified since is still reached (its edge is the node that produced it,
    where its hook sits; a gradient w.r.t. the modified tensor would stop above it)."""
    return list({(id(edge.node), edge.output_nr): edge for edge in taps}.values())


def _weighted_cat(chunks: list[tuple[Tensor, float | Tensor]]) -> tuple[Tensor, float | Tensor]:
    """Concatenates gradient rows whose factor weights agree (the same number, or the same
    device tensor); rows with another weight are rescaled by sqrt(weight ratio) first so one
    weight covers all."""
    weight = chunks[0][1]
    same = [w is weight or not isinstance(w, Tensor) and not isinstance(weight, Tensor) and w == weight
            for _, w in chunks]
    rows = [g if keep else g * (w / weight) ** 0.5 for (g, w), keep in zip(chunks, same)]
    return _cat(rows), weight


def _accumulate(store: dict[str, Tensor], name: str, value: Tensor) -> None:
    store[name] = store[name] + value if name in store else value


def _by_budget(items: list, rows_of) -> list[list]:
    """``items`` in consecutive batches whose row matrices total at most :data:`FLUSH_BYTES`
    (at least one item each), so that one native call never materialises every layer's rows."""
    batches, batch, size = [], [], 0
    for item in items:
        rows = rows_of(item)
        nbytes = rows.numel() * rows.element_size()
        if batch and size + nbytes > FLUSH_BYTES:
            batches.append(batch)
            batch, size = [], 0
        batch.append(item)
        size += nbytes
    return batches + ([batch] if batch else [])


def _trace(factor: Tensor) -> Tensor:
    return factor.sum() if factor.dim() == 1 else factor.trace()


def _bytes(tensors: list[Tensor]) -> int:
    seen = {}
    for t in tensors:
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _all_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-d bool on the device: every element of every tensor is finite. A tensor's smallest and
    largest elements are NaN or ±inf iff it holds one: one pass per tensor (``isfinite().all()``
    takes four) and, unlike a sum, no overflow."""
    extremes = [torch.stack(torch.aminmax(t)).double() for t in tensors if t.numel()]
    if not extremes:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device)
    return torch.cat(extremes).isfinite().all()


def _dot(u: Tensor, g: Tensor) -> Tensor:
    """``⟨u, g⟩`` as a float64 0-d tensor (accumulated in at least float32)."""
    if u.dtype in (torch.float16, torch.bfloat16):
        u, g = u.float(), g.float()
    return torch.vdot(u.reshape(-1), g.reshape(-1)).double()


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


def _stack(tensors: list) -> Any:
    return tensors[0] if len(tensors) == 1 else None if tensors[0] is None else torch.stack(tensors)


def _invert_diagonal(a: Tensor, damping: float, inverse_form: bool) -> tuple[tuple, int]:
    """A diagonal factor's damped inverse ``(1 / (a + d),)`` or eigen pair ``(a + d, None)``."""
    if not bool(torch.isfinite(a).all()):
        return (), int(Status.NON_FINITE_INPUT)
    damped = a + damping
    if inverse_form:
        if not bool((damped > 0).all()):
            return (), int(Status.FAILED)
        return (1.0 / damped,), int(Status.OK)
    return (damped, None), int(Status.OK)


def _identity_inverse(dim: int, diagonal: bool, inverse_form: bool, dtype, device) -> tuple:
    ones = torch.ones(dim, dtype=dtype, device=device)
    if diagonal:
        return (ones,) if inverse_form else (ones, None)
    eye = torch.eye(dim, dtype=dtype, device=device)
    return (eye,) if inverse_form else (ones, eye)


def _precondition_diagonal_a(grad: Tensor, a_side: tuple, g_side: tuple, inverse_form: bool, gamma: float) -> Tensor:
    """``G⁻¹ ∇W̄ A⁻¹`` with a diagonal A (``∇W̄`` is ``[g_dim, a_dim]``): the A side scales
    columns. Eigen form: ``Q_G ((Q_Gᵀ ∇W̄) / (λ_G λ_Aᵀ + γ))``."""
    g = grad.to(a_side[0].dtype)
    if inverse_form:
        out = (g_side[0] @ g) * a_side[0]
    else:
        lam_g, q_g = g_side
        out = q_g @ ((q_g.T @ g) / (torch.outer(lam_g, a_side[0]) + gamma))
    return out.to(grad.dtype)
