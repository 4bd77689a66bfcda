"""K-FAC preconditioner: the façade over its parts. A step reads as the algorithm:

gradients (:mod:`~kfac_ext.topology`: whole where they are preconditioned, their finiteness agreed)
→ on a factor step, the curvature's moving averages (:mod:`~kfac_ext.curvature`) from the
statistics captured by the hooks (:mod:`~kfac_ext.capture`) → on an inverse step, the damped
inverses (:mod:`~kfac_ext.inverse`, by their owners) → the preconditioned directions, clipped →
written into ``.grad`` before any optimizer steps. The factor conventions are in
:mod:`kfac_ext.capture`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import ops as native_ops
from . import reference as reference_ops
from .capture import Capture, CaptureSettings, default_loss_mask, default_output_fn, make_fisher
from .curvature import Curvature
from .inverse import Inverses, kl_clip_scale
from .layers import Block, find_blocks
from .losses import Loss
from .settings import check_choice, make_checked_loss, resolve_kl_clip, validate
from .statistics import Statistics
from .topology import choose, unwrap_model
from .util import (LONGEST_REFRESH, REFRESH_BUDGET, Counters, Schedule, budgeted_period, doubling, flush_denormals,
                   sparse_refresh_due, value, warn,
                   warn_once)

__all__ = ["KFACPreconditioner", "default_output_fn", "default_loss_mask"]

COUNTERS = ("factor_updates", "inverse_updates", "skipped_factor_updates", "nonfinite_grad_steps",
            "failed_inversions", "fp64_retries", "kl_clip_scale")


#: flops of one decomposition of an n x n factor, per n³ (Golub & Van Loan: a symmetric
#: eigendecomposition with vectors about 9n³; a Cholesky factorization and inverse about n³)
DECOMPOSITION_FLOPS = {"eigen": 9.0, "cholesky": 1.0}


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

    The parts, for inspection and benchmarks: :attr:`capture` (hooks, the pending micro-batch,
    :class:`~kfac_ext.capture.Statistics`), :attr:`curvature` (the factors), :attr:`inverses`
    (``inverses.records``: per block the A- and G-side :class:`~kfac_ext.inverse.Inverse` /
    :class:`~kfac_ext.inverse.EigenPair`), :attr:`topology` (the distribution mode,
    :mod:`kfac_ext.topology`).

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
            ``inv_update_steps="auto"`` (the default of ``KFAC(update="eigen-adam")``):
            ``doubling(P)``, ``P`` set at the first factor update (:attr:`refresh_period`, saved in
            ``state_dict``) so that the decompositions take about 1/40 of the flops of the blocks'
            layers (9n³ per eigendecomposition, n³ per Cholesky inverse; from the rows each
            layer computed over), between 10 and 50 steps, a multiple of the factor period:
            a transformer over many tokens refreshes often, a small batch of wide layers rarely.
            A block whose decompositions alone cost more than its layer's work over 40 steps (a
            wide classifier head over a small batch) is refreshed at steps 0, 4, 16, 64, ... up
            to its own budgeted period, then at that period (:attr:`sparse_refresh`).
        debias_factors: the factors as the moving average normalized by the weight each has
            gathered (Adam's bias correction, :class:`~kfac_ext.curvature.Curvature`): the
            first steps' statistics, from the initial weights, do not outweigh later ones (False:
            the first update sets a factor and later ones keep ``ρ`` of it; the default of
            ``KFAC(update="eigen-adam")`` is True).
        grad_accumulation_steps: micro-batches (forward + backward) per ``step()``. With ``k > 1``
            each micro-batch goes into the factors as the next begins (no factor-sized sums are
            held): its mean weighs ``(1-ρ)/k``, the old factor ``ρ``, and ``step()`` divides by
            what the micro-batches that ran a block with finite statistics add up to. With all
            ``k`` run, equally sized, that is one step on their concatenation; fewer are averaged;
            a micro-batch with a non-finite activation or output gradient is left out.
        factor_rows: at most about this many rows (tokens, pixels, examples) of each block's
            micro-batch enter its factor sums: every ``k``-th row, from an offset that moves on
            with every factor update, the sum rescaled to all rows (unbiased); ``k`` shares no
            divisor with the row count, so that every position of an example is taken alike.
            The factor GEMMs' cost falls by ``k``. ``"auto"``: about ``4d`` rows for a factor
            ``d`` wide, at least 1024 (the default of ``KFAC(update="eigen-adam")``); None
            (default) takes every row.
        factor_dtype, inv_dtype: float32 or float64 (activations may be bf16/fp16).
        grad_scaler: the ``torch.amp.GradScaler`` scaling your backward: ``"empirical"`` factors
            are unscaled, overflowing steps are left to it, and the statistics of a step it
            skipped (its ``step()`` never came) go into the next step's factors, as more
            micro-batches of it (if finite, as always).
        skip_layers: module types, or regular expressions matched against whole module names,
            to leave to the base optimizer.
        max_factor_dim: blocks with a dense factor side larger than this (a vocabulary-sized
            output layer) are left to the base optimizer.
        backend: ``"native"`` (the C++/CUDA ops) or ``"reference"`` (pure PyTorch); same updates.
        seed: seeds the generator for Monte Carlo targets (saved in ``state_dict``); rank ``r`` of
            a process group uses ``seed + r``.
        grad_worker_fraction: with more than one rank (see :mod:`kfac_ext.topology`): ``1.0``
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
        debias_factors: bool = False,
        factor_update_steps: Schedule = 1,
        inv_update_steps: Schedule = 10,
        lr: Schedule | None = None,
        kl_clip: Schedule | str | None = "auto",
        grad_accumulation_steps: int = 1,
        factor_rows: int | str | None = None,
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
        validate(fisher_type, kfac_approx, inversion, damping_mode, backend, factor_dtype, inv_dtype, mc_samples,
                  grad_accumulation_steps, factor_rows, inv_update_steps)
        self.loss = make_checked_loss(loss, reduction, fisher_type)
        self.reduction = self.loss.reduction if self.loss is not None else reduction
        check_choice("reduction", self.reduction, ("mean", "sum"))
        kl_clip = resolve_kl_clip(kl_clip, lr)

        self.model = model = unwrap_model(model)  # DDP / compile: hooks and names on the inner module
        self.fisher_type, self.mc_samples, self.kfac_approx = fisher_type, mc_samples, kfac_approx
        self.output_fn, self.loss_mask_fn = output_fn, loss_mask_fn
        self.inversion, self.damping_mode = inversion, damping_mode
        self.damping, self.factor_decay = damping, factor_decay
        self.factor_update_steps, self.inv_update_steps = factor_update_steps, inv_update_steps
        #: ``inv_update_steps="auto"``'s period once set (None before the first factor update)
        self.refresh_period: int | None = None
        #: ``inv_update_steps="auto"``: ``{block name: period}`` of the blocks refreshed on their
        #: own sparse schedule (:func:`~kfac_ext.util.sparse_refresh_due`)
        self.sparse_refresh: dict[str, int] = {}
        self.lr, self.kl_clip = lr, kl_clip
        self.grad_accumulation_steps, self.factor_rows = grad_accumulation_steps, factor_rows
        self.factor_dtype, self.inv_dtype = factor_dtype, inv_dtype
        self.grad_scaler = grad_scaler
        self.backend, self.seed = backend, seed

        self.max_factor_dim = max_factor_dim
        self.registration = find_blocks(model, tuple(skip_layers), kfac_approx, max_factor_dim)
        self.registration.require_blocks()
        self.blocks: list[Block] = self.registration.blocks
        self.unregistered: list[tuple[str, str]] = self.registration.others
        self.topology = choose(self.blocks, process_group, grad_worker_fraction)
        self.generator = torch.Generator(device=self.blocks[0].device).manual_seed(seed + self.topology.rank)

        self.steps = 0
        #: ∇W̄ per block before the last step() rewrote it (in the owner modes of FSDP2, None for
        #: the blocks another rank preconditions), until the next forward that is not paused: a
        #: copy of every block's gradient, not held through the next forward and backward
        self.last_raw_gradients: list[Tensor | None] = []
        self._stats = Counters()
        self.stats = dict(dict.fromkeys(COUNTERS, 0), kl_clip_scale=1.0)
        self._warned: set[str] = set()
        ops = native_ops if backend == "native" else reference_ops
        self.curvature = Curvature(debias=debias_factors)
        self.inverses = Inverses(ops, inversion, inversion == "cholesky" or damping_mode != "eigen", inv_dtype)
        settings = CaptureSettings(make_fisher(fisher_type, mc_samples), self.loss, self.reduction, output_fn,
                                   loss_mask_fn, grad_accumulation_steps, factor_dtype, grad_scaler, factor_rows)
        self.capture = Capture(model, self.blocks, self.registration.installs, settings, factor_step=self.is_factor_step,
                               ops=ops, generator=self.generator, counters=self._stats, warned=self._warned,
                               fold=self._fold_statistics, fold_gradient_parts=self.topology.world_size == 1,
                               on_forward=self._release_raw_gradients)
        #: ``(blocks, grads, finite) -> directions`` in place of the K-FAC direction, or None (the
        #: Adam-in-eigenbasis rule of :class:`~kfac_ext.KFAC` sets one)
        self.direction_rule: Callable[[list[Block], list[Tensor], Tensor], list[Tensor]] | None = None

    @property
    def ops(self):
        """The op module the parts call (native or reference); replaceable (tests inject failures)."""
        return self.inverses.ops

    @ops.setter
    def ops(self, module) -> None:
        self.inverses.ops = self.capture.ops = module

    @property
    def stats(self) -> dict[str, Any]:
        """Counters (factor/inverse updates, skipped and non-finite steps, failed inversions,
        float64 retries) and the last KL-clip scale. Steps keep the
        non-finite count and the clip scale on the device, so that they need not synchronize;
        reading ``stats`` brings them to the host."""
        return self._stats.synced()

    @stats.setter
    def stats(self, counters: dict[str, Any]) -> None:
        self._stats.reset(counters)

    def count_nonfinite(self, skipped: Tensor) -> None:
        """Adds ``skipped`` (a 0-d bool on the device) to the non-finite step count, on the device."""
        self._stats.count_nonfinite(skipped)

    @contextlib.contextmanager
    def pause(self):
        """Forwards inside ``with precond.pause():`` are not captured (an evaluation or logging
        forward in train mode, a second loss on the same model)."""
        with self.capture.pause():
            yield self

    def _release_raw_gradients(self) -> None:
        self.last_raw_gradients = []

    def is_factor_step(self) -> bool:
        return self.steps % max(1, int(value(self.factor_update_steps, self.steps))) == 0

    def is_inverse_step(self) -> bool:
        """Some factor's inverse (or basis) is refreshed in this step."""
        return self.is_shared_inverse_step() or any(sparse_refresh_due(self.steps, p)
                                                    for p in self.sparse_refresh.values())

    def is_shared_inverse_step(self) -> bool:
        """The blocks not on a sparse schedule of their own (:attr:`sparse_refresh`) are
        refreshed in this step."""
        return self.steps % max(1, int(value(self._inverse_schedule(), self.steps))) == 0

    def _due_factors(self, blocks: list[Block]) -> list[bool]:
        """Which factors of ``blocks`` (every A, then every G) are refreshed in this step."""
        shared = self.is_shared_inverse_step()
        due = [sparse_refresh_due(self.steps, self.sparse_refresh[b.name]) if b.name in self.sparse_refresh else shared
               for b in blocks]
        return due + due

    def _inverse_schedule(self) -> Schedule:
        if not isinstance(self.inv_update_steps, str):
            return self.inv_update_steps
        return doubling(self.refresh_period or LONGEST_REFRESH)

    def _scaled(self) -> bool:
        return self.grad_scaler is not None and self.grad_scaler.is_enabled()

    # ---- the step --------------------------------------------------------------------------

    def step(self) -> Tensor:
        """Updates factors / inverses when due and rewrites ``.grad`` of every block that has
        inverses and a gradient (a block that did not run this step keeps ``.grad`` None).

        Returns a 0-d bool tensor on the blocks' device: False when the gradients were not finite.
        Then the blocks' gradients are zeroed (never NaN into parameters) — or, with a
        ``grad_scaler``, left for the scaler to see — and the step is counted in ``stats``. The
        step's statistics go into the factors if they are finite, whether or not the gradients
        are (they say what the curvature was, not whether this step's update can be trusted). A
        step that updates no factors and no inverses decides all of this on the device and never
        synchronizes with it; reading the flag does.
        """
        ran = [b for b in self.blocks if b.weight.grad is not None]
        if not ran:
            raise RuntimeError("KFACPreconditioner.step(): no block has a gradient; call loss.backward() before step()")
        with flush_denormals():  # subnormals from low-rank factors' eigenvectors slow every CPU op on them
            for block in ran:
                block.ensure_bias_grad()
            grads, finite = self.topology.gradients(self.blocks, ran)
            self.last_raw_gradients = grads
            if self.is_factor_step():
                self.registration.check_unchanged(self.model)
                if not self.update_curvature(finite):
                    return self._skip_nonfinite_step(ran, finite)
            if self.curvature and (self.inverses.records.keys() != self.curvature.a.keys() or self.is_inverse_step()):
                self.update_inverses(due_only=True)
            self.write_directions(grads, finite)
            self.count_nonfinite(~finite)
            self._finish_step()
            return finite

    # The phases of step(), in its order; public for benchmarks and for tests that time or
    # inspect one phase (e.g. update_inverses() right after load_state_dict).

    def update_curvature(self, grads_finite: Tensor) -> bool:
        """The moving averages from this step's captured statistics (those that are finite);
        False iff the gradients were not finite."""
        stats = self.capture.collect()
        if isinstance(self.inv_update_steps, str) and self.refresh_period is None:
            self._budget_refreshes(stats.layer_rows)
        done = self.curvature.update(self.blocks, stats, grads_finite,
                                     lambda: float(value(self.factor_decay, self.steps)), self.topology, self._stats)
        if done is False:  # known on the host already: this step's gradients are not finite
            self._warn_nonfinite(self._stats.get("nonfinite_grad_steps", 0) + 1)
        if done is None:
            self._no_statistics()
            return True
        return done

    def _budget_refreshes(self, layer_rows: dict[str, int]) -> None:
        """``inv_update_steps="auto"``: :attr:`refresh_period` and :attr:`sparse_refresh` from the
        factor widths and the rows each layer computed over this step (its forward and backward
        GEMMs: 6 flops per row and weight), averaged over the ranks so that every rank refreshes
        the same factors at the same steps (every rank asks, at the same factor steps, until some
        layer computed anything). A block whose decompositions cost more than its own layer's
        work over :data:`~kfac_ext.util.REFRESH_BUDGET` steps (a 513-wide A of a classifier
        head over 128 examples: ~300 steps' worth) is refreshed sparsely, up to its own
        budgeted period; the others share the period budgeted over every block (the sparse
        ones' decompositions included: on a small convnet with such a head its convolutions'
        bases refreshed every 50 steps reach the target in 5 % fewer steps than every 20)."""
        per_decomposition = DECOMPOSITION_FLOPS[self.inversion]
        work = self.topology.mean_values(torch.tensor(
            [0.0 if b.a_diagonal else 6.0 * layer_rows.get(b.name, 0) * b.a_dim * b.g_dim for b in self.blocks],
            dtype=torch.float64))
        if sum(work) == 0:
            return
        granularity = int(value(self.factor_update_steps, LONGEST_REFRESH))
        costs = [per_decomposition * ((0 if b.a_diagonal else b.a_dim) ** 3 + b.g_dim ** 3) for b in self.blocks]
        self.refresh_period = budgeted_period(sum(costs), sum(work), granularity)
        self.sparse_refresh = {b.name: budgeted_period(cost, layer, granularity, longest=None)
                               for b, cost, layer in zip(self.blocks, costs, work)
                               if layer > 0 and cost > REFRESH_BUDGET * layer}

    def _fold_statistics(self, stats: Statistics, kinds: tuple[str, ...]) -> None:
        self.curvature.fold(self.blocks, stats, float(value(self.factor_decay, self.steps)), self.grad_accumulation_steps,
                            self.topology, kinds)

    def _warn_nonfinite(self, count: int) -> None:
        """Once per run: ``count`` steps so far were skipped for non-finite gradients. Said where
        the host knows it anyway (a factor step whose own gradients are not finite, an inverse
        step, which synchronizes): a steady-state step never reads it back. Not with a grad
        scaler, whose overflow steps are expected and its own business."""
        if count and not self._scaled():
            warn_once(self._warned, "non-finite gradients",
                      f"KFACPreconditioner: {count} step(s) up to step {self.steps} had non-finite gradients "
                      "(a NaN or inf loss or gradient) and were skipped: no parameter moved (counted in "
                      "stats['nonfinite_grad_steps']; warned once)")

    def update_inverses(self, due_only: bool = False) -> None:
        """The damped inverses of every block's factors (by their owners); ``due_only``: only of
        the factors this step's schedule refreshes (and those without one yet)."""
        blocks = [b for b in self.blocks if b.name in self.curvature.a]
        factors, damping = self.curvature.damped(blocks, float(value(self.damping, self.steps)), self.damping_mode,
                                                 self.inv_dtype)
        inverse_form = self.inverses.inverse_form
        self.inverses.update(blocks, factors, damping,
                             lambda f, invert, fresh: self.topology.invert(f, invert, inverse_form, fresh),
                             self._stats, self._warned, self._due_factors(blocks) if due_only else None)
        self._stats["inverse_updates"] += 1
        if "non-finite gradients" not in self._warned:
            self._warn_nonfinite(self.stats["nonfinite_grad_steps"])  # the inversion synchronized already

    def write_directions(self, grads: list[Tensor | None], finite: Tensor) -> None:
        """Rewrites ``.grad`` of every block with a gradient: the clipped natural-gradient
        direction where inverses exist, the raw gradient elsewhere; zeros (or, with a grad scaler,
        the raw gradient) when ``finite`` is False. Decided on the device: no synchronization."""
        ran = [b.weight.grad is not None for b in self.blocks]
        ready = [i for i, b in enumerate(self.blocks) if ran[i] and b.name in self.inverses]
        if ready:
            here = [i for i in ready if grads[i] is not None]  # all but, in the owner modes, other ranks' blocks
            directions = self._directions([self.blocks[i] for i in here], [grads[i] for i in here], finite)
            self.topology.write(self.blocks, ready, dict(zip(here, directions)))
        if not self._scaled():
            ready_set = set(ready)
            for i, block in enumerate(self.blocks):
                if ran[i] and i not in ready_set:  # no inverses yet: the raw gradient, if finite
                    block.mask_grad_(finite)

    def _directions(self, blocks: list[Block], grads: list[Tensor], finite: Tensor) -> list[Tensor]:
        """The clipped preconditioned gradients of ``blocks`` where ``finite``; zeros (the raw
        gradients with a grad scaler) where not."""
        if self.direction_rule is not None:
            rule = self.direction_rule
            updates = self.topology.precondition(blocks, grads, lambda b, g: rule(b, g, finite))
        else:
            gamma = float(value(self.damping, self.steps)) if self.damping_mode == "eigen" else 0.0
            updates = self.topology.precondition(blocks, grads, lambda b, g: self.inverses.apply(b, g, gamma))
        nu = self._kl_clip_scale(updates, grads)
        return [torch.where(finite, u.mul_(nu) if nu is not None else u, g if self._scaled() else 0.0)
                for u, g in zip(updates, grads)]

    def _kl_clip_scale(self, updates: list[Tensor], grads: list[Tensor]) -> Tensor | None:
        kl_clip = value(self.kl_clip, self.steps)
        nu = None if kl_clip is None else kl_clip_scale(updates, grads, kl_clip, float(value(self.lr, self.steps)),
                                                        self.topology.clip_total, self.blocks[0].device)
        self._stats.set_kl_scale(nu)
        return nu

    def _skip_nonfinite_step(self, ran: list[Block], finite: Tensor) -> Tensor:
        self.count_nonfinite(~finite)  # every rank got the same flag: all skip alike
        if not self._scaled():
            for block in ran:
                block.mask_grad_(finite)  # finite is False: zeros
        self._finish_step()
        return finite

    def _finish_step(self) -> None:
        self.capture.clear()
        self.steps += 1

    def _no_statistics(self) -> None:
        """A factor-update step that captured nothing: fine once factors exist (they stay as they
        are); before that K-FAC has no curvature at all, which is an error worth explaining."""
        self._stats["skipped_factor_updates"] += 1
        why = ("the model is in eval mode" if not self.model.training else
               "its forwards ran under torch.no_grad() or precond.pause(), or no backward followed them")
        if self.curvature:
            warn_once(self._warned, "no statistics",
                      f"KFACPreconditioner.step(): no layer statistics were captured in step {self.steps} ({why}); "
                      "the factors stay as they are (warned once)")
            return
        raise RuntimeError(
            "KFACPreconditioner.step(): no layer statistics were captured in this factor-update step "
            f"and no factors exist yet: {why}. Run the training forward with model.train() and "
            "gradients enabled, then loss.backward(), before step()"
        )

    # ---- inspection and checkpoints -------------------------------------------------------

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{block name: (A, G)}`` as defined in :mod:`kfac_ext.capture` (A of an embedding is
        its diagonal); empty before the first update."""
        return self.curvature.factors(self.blocks)

    def memory_usage(self) -> dict[str, int]:
        """Bytes held for the factors, the inverses (or eigendecompositions), and their total."""
        factors, inverses = _bytes(self.curvature.tensors()), _bytes(self.inverses.tensors())
        return dict(factors=factors, inverses=inverses, total=factors + inverses)

    def registration_report(self) -> str:
        head = (f"KFACPreconditioner(fisher_type={self.fisher_type!r}, kfac_approx={self.kfac_approx!r}, "
                f"inversion={self.inversion!r}, damping_mode={self.damping_mode!r}, backend={self.backend!r}, "
                f"loss={self.loss!r})")
        return "\n".join([head] + self.registration.report())

    __repr__ = registration_report

    def state_dict(self) -> dict[str, Any]:
        """Steps, counters, factors, the inverses held here (as ``(inverse,)`` / ``(values,
        vectors)`` tuples), the Monte Carlo generator, the damping and the warnings given."""
        state = dict(
            steps=self.steps,
            stats=dict(self.stats),
            factors=self.curvature.state(),
            factor_weights=dict(self.curvature.weights),
            inverses=self.inverses.state(),
            generator=self.generator.get_state(),
            damping=self.damping if not callable(self.damping) else None,
            warned=sorted(self._warned),
            refresh_period=self.refresh_period,
            sparse_refresh=dict(self.sparse_refresh),
        )
        state.update(self.topology.checkpoint_entries())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict`; every tensor moves to its block's device (a checkpoint
        saved on CPU resumes on CUDA). A generator state of another device type restarts the Monte
        Carlo stream from a seed derived from it (with a warning)."""
        devices = {b.name: b.device for b in self.blocks}
        unknown = set(state["factors"]) - devices.keys()
        if unknown:
            raise ValueError(f"state_dict has factors for blocks this model does not have: {sorted(unknown)}")

        def move(name, t):
            return t.to(devices[name], copy=True) if isinstance(t, Tensor) else t

        self.steps = state["steps"]
        self.stats = {name: state["stats"].get(name, count) for name, count in self.stats.items()}  # not retired ones
        self.curvature.load(state["factors"], move, state.get("factor_weights"))
        self.inverses.load(state["inverses"], move)
        _load_generator(self.generator, state["generator"])
        self.topology.after_generator_load(self.generator, state, self.seed)
        if state.get("damping") is not None and not callable(self.damping):
            self.damping = state["damping"]
        self._warned.clear()
        self._warned.update(state["warned"])
        if state.get("refresh_period") is not None:
            self.refresh_period = state["refresh_period"]
            self.sparse_refresh = dict(state.get("sparse_refresh") or {})
        self.capture.clear()

    def remove_hooks(self) -> None:
        self.capture.remove_hooks()


def _bytes(tensors: list[Tensor]) -> int:
    seen = {}
    for t in tensors:
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _load_generator(generator: torch.Generator, generator_state: Tensor) -> None:
    generator_state = generator_state.cpu()
    if generator_state.numel() == generator.get_state().numel():
        generator.set_state(generator_state)
        return
    seed = int(torch.frombuffer(bytearray(generator_state.numpy().tobytes()[:8].ljust(8, b"\0")), dtype=torch.int64)[0])
    generator.manual_seed(seed & (2**63 - 1))
    warn("KFACPreconditioner.load_state_dict: the Monte Carlo generator state was saved on "
         "another device type; the sampling stream restarts from a seed derived from it")
