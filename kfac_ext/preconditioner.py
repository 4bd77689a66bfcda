"""K-FAC preconditioner: captures layer statistics with hooks, keeps the Kronecker factors, inverts
them, and rewrites ``.grad`` with the natural-gradient direction before any optimizer steps.

Factor conventions (for a layer with ``N`` examples of ``T`` rows each, ``T`` = positions for
``[B, T, d]`` Linear inputs or output pixels for Conv2d, 1 for plain Linear):

* ``A = (1/(N·T)) Σ ā āᵀ`` with ``ā = [a, 1]`` (the 1 last; only when the layer has a bias),
* ``G = (1/N) Σ_n Σ_t g gᵀ`` with ``g = ∂ℓ_n/∂s`` the gradient of the **per-example** loss term
  ``ℓ_n`` w.r.t. the layer output, for ``reduction="mean"`` (``L = mean_n ℓ_n``); for
  ``reduction="sum"``, ``G = Σ_n Σ_t g gᵀ``. Either way ``A ⊗ G`` approximates the curvature of
  the loss as the user computes it.

Both are exponential moving averages over steps, ``F ← ρ F + (1-ρ) F_step`` (the first update
initialises). ``F_step`` averages the micro-batches of a step: every forward in train mode with
grad enabled during a factor-update step counts as one. With ``grad_accumulation_steps=k`` the
micro-batch losses are assumed divided by ``k`` (the usual recipe; it matters for "empirical").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from . import ops as native_ops
from . import reference as reference_ops
from .capture import KFACLayer, find_layers
from .losses import Loss, make_loss
from .ops import Status

__all__ = ["KFACPreconditioner"]

Schedule = float | int | Callable[[int], float]

FISHER_TYPES = ("mc", "empirical", "type-2")
INVERSIONS = ("eigen", "cholesky")
DAMPING_MODES = ("tikhonov", "pi", "eigen")


def _value(schedule: Schedule | None, step: int):
    return schedule(step) if callable(schedule) else schedule


class KFACPreconditioner:
    """Rewrites the gradients of every supported layer of ``model`` in place with the K-FAC
    natural-gradient direction ``(G ⊗ A + damping)⁻¹ ∇W̄``.

    Usage (two added lines)::

        precond = KFACPreconditioner(model, loss="cross_entropy")
        for x, y in data:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            precond.step()          # rewrites .grad
            optimizer.step()

    Args:
        model: the model. Its forward output must be a tensor (the loss input) when
            ``fisher_type`` is ``"mc"`` or ``"type-2"``.
        loss: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``, the matching ``torch.nn``
            module, or a :class:`kfac_ext.losses.Loss`; may be None only with ``"empirical"``.
        reduction: ``"mean"`` or ``"sum"`` (taken from the module when ``loss`` is one).
        fisher_type: ``"mc"`` (targets sampled from the model, ``mc_samples`` extra backward
            passes run for you right after the forward), ``"type-2"`` (the exact expectation over
            targets through the loss Hessian's square root: one extra backward per column, i.e.
            per class / output), or ``"empirical"`` (the real labels' gradients from your backward).
        inversion: ``"eigen"`` or ``"cholesky"``.
        damping_mode: ``"tikhonov"`` (``A + √γ I``, ``G + √γ I``), ``"pi"`` (π-corrected factored
            damping, Martens & Grosse 2015 §6.3) or ``"eigen"`` (exact ``λ_G λ_Aᵀ + γ``; eigen only).
        damping, factor_decay, factor_update_steps, inv_update_steps, lr, kl_clip: a number or a
            callable of the step. ``kl_clip`` (None = off) rescales the update so that
            ``lr² Σ ⟨v, g⟩ <= kl_clip``; it needs ``lr``.
        grad_accumulation_steps: micro-batches (forward + backward) per ``step()``.
        factor_dtype, inv_dtype: float32 or float64 (activations may be bf16/fp16).
        grad_scaler: the ``torch.amp.GradScaler`` scaling your backward, so that ``"empirical"``
            factors are unscaled.
        skip_layers: module names or types to leave to the base optimizer.
        backend: ``"native"`` (the C++/CUDA ops) or ``"reference"`` (pure PyTorch); same updates.
        seed: seeds the generator for Monte Carlo targets (saved in ``state_dict``); rank ``r`` of
            a process group uses ``seed + r``.
        grad_worker_fraction: with more than one rank (see :mod:`kfac_ext.distributed`): ``1.0``
            broadcasts every inverse and every rank preconditions every layer; below 1, each
            layer's owner preconditions it and broadcasts the result at every step.
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
        inversion: str = "eigen",
        damping_mode: str = "tikhonov",
        damping: Schedule = 1e-3,
        factor_decay: Schedule = 0.95,
        factor_update_steps: Schedule = 1,
        inv_update_steps: Schedule = 10,
        lr: Schedule | None = None,
        kl_clip: Schedule | None = None,
        grad_accumulation_steps: int = 1,
        factor_dtype: torch.dtype = torch.float32,
        inv_dtype: torch.dtype = torch.float32,
        grad_scaler: torch.amp.GradScaler | None = None,
        skip_layers: tuple[str | type, ...] = (),
        backend: str = "native",
        seed: int = 0,
        grad_worker_fraction: float = 1.0,
        process_group: Any = None,
    ):
        _check_choice("fisher_type", fisher_type, FISHER_TYPES)
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
        if kl_clip is not None and lr is None:
            raise ValueError("kl_clip needs lr (a number or a callable of the step)")

        self.model = model = distributed.unwrap_model(model)  # DDP: hooks and names on the inner module
        self.fisher_type, self.mc_samples = fisher_type, mc_samples
        self.inversion, self.damping_mode = inversion, damping_mode
        self.damping, self.factor_decay = damping, factor_decay
        self.factor_update_steps, self.inv_update_steps = factor_update_steps, inv_update_steps
        self.lr, self.kl_clip = lr, kl_clip
        self.grad_accumulation_steps = grad_accumulation_steps
        self.factor_dtype, self.inv_dtype = factor_dtype, inv_dtype
        self.grad_scaler = grad_scaler
        self.ops = native_ops if backend == "native" else reference_ops
        self.backend = backend

        self.layers, self.unregistered = find_layers(model, tuple(skip_layers))
        if not self.layers:
            raise ValueError("model has no layer K-FAC supports (nn.Linear, nn.Conv2d)")
        self._by_module = {layer.module: layer for layer in self.layers}
        self._registered_names = {layer.name for layer in self.layers}
        self._dist = distributed.setup(self, process_group=process_group,
                                       grad_worker_fraction=grad_worker_fraction, seed=seed)
        rank = self._dist.rank if self._dist is not None else 0
        self.generator = torch.Generator(device=self.layers[0].module.weight.device).manual_seed(seed + rank)

        self.steps = 0
        self.last_raw_gradients: list[Tensor] = []  # ∇W̄ per layer before the last step() rewrote it
        self.stats = dict(
            factor_updates=0, inverse_updates=0, skipped_factor_updates=0, nonfinite_grad_steps=0,
            failed_inversions=0, fp64_retries=0, kl_clip_scale=1.0,
        )
        self._a: dict[str, Tensor] = {}  # factors by layer name
        self._g: dict[str, Tensor] = {}
        self._inv: dict[str, tuple] = {}  # per layer: (A side, G side) inverse or (λ, Q)
        self._warned: set[str] = set()
        self._pending_step = -1
        self._pending_a: dict[str, list[Tensor]] = {}
        self._pending_g: dict[str, list[tuple[Tensor, float]]] = {}
        self._forwards = 0  # captured forwards (micro-batches) of the pending step
        self._nonfinite_capture = False  # a captured output was not finite: skip this update
        self._g_weight: float | None = None  # set while a capturing backward runs
        # Layer hooks first: when the model is itself a layer, its tensor hook must exist before
        # the model hook runs the sampled backward (hooks run in registration order).
        self._handles = [layer.module.register_forward_hook(self._layer_hook) for layer in self.layers]
        self._handles += [model.register_forward_pre_hook(self._model_pre_hook, prepend=True)]
        self._handles += [model.register_forward_hook(self._model_hook)]

    # ---- capture ---------------------------------------------------------------------------

    def _capturing(self) -> bool:
        return self.model.training and torch.is_grad_enabled() and self._is_factor_step()

    def _is_factor_step(self) -> bool:
        return self.steps % max(1, int(_value(self.factor_update_steps, self.steps))) == 0

    def _model_pre_hook(self, module, inputs):
        if self._pending_step != self.steps:  # left over from a step that never ran (e.g. skipped by a GradScaler)
            self._clear_pending()
            self._pending_step = self.steps

    def _layer_hook(self, module, inputs, output):
        if not self._capturing():
            return
        layer = self._by_module[module]
        self._pending_a.setdefault(layer.name, []).append(inputs[0].detach())
        if output.requires_grad:
            # A tensor hook registered now sees the gradient w.r.t. this value even if an
            # in-place activation modifies the output afterwards.
            output.register_hook(lambda grad, layer=layer: self._grad_hook(layer, grad))

    def _grad_hook(self, layer: KFACLayer, grad: Tensor) -> None:
        weight = self._g_weight
        if weight is None and self.fisher_type == "empirical":
            weight = self._empirical_weight(grad)
        if weight is not None:
            self._pending_g.setdefault(layer.name, []).append((layer.output_grads(grad.detach()), weight))

    def _empirical_weight(self, grad: Tensor) -> float:
        # Hooks see h = ∂L/∂s of the loss the backward ran on; per-example g = k·s·h (s = N for
        # "mean", undoing the mean; k = accumulation steps, undoing the 1/k of each micro-batch);
        # this micro-batch's G is w Σ g gᵀ, w = 1/N ("mean") or 1.
        k, n = self.grad_accumulation_steps, self._batch_size
        s = float(n) if self.reduction == "mean" else 1.0
        w = 1.0 / n if self.reduction == "mean" else 1.0
        weight = w * (k * s) ** 2
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            weight /= float(self.grad_scaler.get_scale()) ** 2
        return weight

    def _model_hook(self, module, inputs, output):
        if not self._capturing():
            return
        self._forwards += 1
        if self.fisher_type == "empirical":
            self._batch_size = _leading_dim(output)  # N of the loss's mean
            return
        if not isinstance(output, Tensor):
            raise TypeError(
                f"KFACPreconditioner: the model returned {type(output).__name__}; fisher_type="
                f"{self.fisher_type!r} samples targets from the output and needs the loss input as "
                "one tensor (wrap the model, or use fisher_type='empirical')"
            )
        if not output.requires_grad:
            return
        if not bool(torch.isfinite(output).all()):
            self._nonfinite_capture = True  # no targets can be drawn: the factor update is skipped
            return
        w = 1.0 / output.shape[0] if self.reduction == "mean" else 1.0
        if self.fisher_type == "mc":
            directions = [self.loss.sample_output_grads(output, self.generator) for _ in range(self.mc_samples)]
            weight = w / self.mc_samples
        else:
            directions = list(self.loss.hessian_sqrt(output))
            weight = w
        params = [layer.module.weight for layer in self.layers]
        self._g_weight = weight
        try:
            for v in directions:
                # Backward of the surrogate Σ_n v_nᵀ z_n: the layer hooks see per-example g = J_nᵀ v_n.
                torch.autograd.grad(output, params, grad_outputs=v, retain_graph=True, allow_unused=True)
        finally:
            self._g_weight = None

    # ---- step ------------------------------------------------------------------------------

    def step(self) -> bool:
        """Updates factors / inverses when due and rewrites ``.grad`` of every registered layer.

        Returns False when the gradients were non-finite: then the registered layers' gradients
        are zeroed (never NaN into parameters) and the step is counted in ``stats``.
        """
        self._check_model_unchanged()
        grads = self._gradients()
        self.last_raw_gradients = grads
        if self._is_factor_step():
            self._update_factors()
        self._clear_pending()
        # (inverses missing for some layers: a checkpoint saved with grad_worker_fraction < 1)
        if self._a and (self._inv.keys() != self._a.keys() or self.steps % max(1, int(_value(self.inv_update_steps, self.steps))) == 0):
            self._update_inverses()
        ok = self._precondition(grads)
        self.steps += 1
        self._pending_step = self.steps
        return ok

    def _check_model_unchanged(self) -> None:
        layers, _ = find_layers(self.model)
        for layer in layers:
            if layer.module not in self._by_module and layer.name not in dict(self.unregistered):
                raise RuntimeError(
                    f"KFACPreconditioner: layer {layer.name!r} was added to the model after the "
                    "preconditioner was built; build a new preconditioner"
                )

    def _gradients(self) -> list[Tensor]:
        grads = []
        for layer in self.layers:
            g = layer.grad_matrix()
            if g is None:
                if self._pending_a and layer.name not in self._pending_a:
                    raise self._unused_layer_error(layer)
                raise RuntimeError(
                    f"KFACPreconditioner.step(): layer {layer.name!r} has no gradient; call "
                    "loss.backward() before step()"
                )
            grads.append(g)
        return grads

    @staticmethod
    def _unused_layer_error(layer: KFACLayer) -> RuntimeError:
        return RuntimeError(
            f"KFACPreconditioner: layer {layer.name!r} did not run in this step's forward "
            "(its hooks never fired); pass it in skip_layers if it is unused"
        )

    def _update_factors(self) -> None:
        if self._nonfinite_capture:
            if self._dist is not None:  # the other ranks wait for this rank's vote
                self._dist.all_finite(False)
            self.stats["skipped_factor_updates"] += 1
            return
        for layer in self.layers:
            if layer.name not in self._pending_a:
                raise self._unused_layer_error(layer)
            if layer.name not in self._pending_g:
                raise RuntimeError(
                    f"KFACPreconditioner: no output gradient reached layer {layer.name!r} in this "
                    "step; call loss.backward() (after a forward in train mode) before step()"
                )
        xa = [_cat([layer.activations(x) for x in self._pending_a[layer.name]]) for layer in self.layers]
        xg = [_weighted_cat(self._pending_g[layer.name]) for layer in self.layers]
        finite = torch.stack([torch.isfinite(t).all() for t in xa + [g for g, _ in xg]]).all()
        if self._dist is not None:  # all ranks skip together
            finite = self._dist.all_finite(finite)
        if not bool(finite):
            self.stats["skipped_factor_updates"] += 1
            return
        first = not self._a
        if first:
            for layer, a, (g, _) in zip(self.layers, xa, xg):
                dev = a.device
                self._a[layer.name] = torch.zeros(layer.a_dim, layer.a_dim, dtype=self.factor_dtype, device=dev)
                self._g[layer.name] = torch.zeros(layer.g_dim, layer.g_dim, dtype=self.factor_dtype, device=dev)
        rho = 0.0 if first else float(_value(self.factor_decay, self.steps))
        self._factor_update([self._a[l.name] for l in self.layers], xa, rho,
                            [(1 - rho) / a.shape[0] for a in xa], [l.has_bias for l in self.layers])
        # F_step averages the micro-batches: A through its rows, G through the forward count.
        self._factor_update([self._g[l.name] for l in self.layers], [g for g, _ in xg], rho,
                            [(1 - rho) * w / self._forwards for _, w in xg], False)
        if self._dist is not None:  # mean over the ranks
            self._dist.average_factors([self._a[l.name] for l in self.layers] + [self._g[l.name] for l in self.layers])
        self.stats["factor_updates"] += 1

    def _factor_update(self, factors, xs, decay, scales, append_ones) -> None:
        # One call per dtype (bf16 activations and fp32 ones may mix across layers).
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, x in enumerate(xs):
            by_dtype.setdefault(x.dtype, []).append(i)
        ones = append_ones if isinstance(append_ones, list) else [append_ones] * len(xs)
        for idx in by_dtype.values():
            self.ops.factor_update_([factors[i] for i in idx], [xs[i] for i in idx], decay=decay,
                                    scales=[scales[i] for i in idx], append_ones=[ones[i] for i in idx])

    # ---- inversion -------------------------------------------------------------------------

    def _factor_damping(self) -> tuple[list[float], list[float]]:
        """Per-layer damping added to A and to G (zero for exact eigen damping)."""
        gamma = float(_value(self.damping, self.steps))
        if gamma <= 0 or not math.isfinite(gamma):
            raise ValueError(f"KFACPreconditioner: damping must be finite and > 0, got {gamma}")
        n = len(self.layers)
        if self.damping_mode == "eigen":
            return [0.0] * n, [0.0] * n
        root = math.sqrt(gamma)
        if self.damping_mode == "tikhonov":
            return [root] * n, [root] * n
        traces = torch.stack([torch.stack([self._a[l.name].trace() / l.a_dim, self._g[l.name].trace() / l.g_dim])
                              for l in self.layers]).tolist()
        pis = [math.sqrt(ta / tg) if ta > 0 and tg > 0 and math.isfinite(ta / tg) else 1.0 for ta, tg in traces]
        return [pi * root for pi in pis], [root / pi for pi in pis]

    def _update_inverses(self) -> None:
        factors = [self._a[l.name].to(self.inv_dtype) for l in self.layers]
        factors += [self._g[l.name].to(self.inv_dtype) for l in self.layers]
        a_damp, g_damp = self._factor_damping()
        n = len(self.layers)
        if self._dist is not None:  # each factor inverted by its owner; status (and results) shared
            results, status = self._dist.invert(factors, a_damp + g_damp)
        else:
            results, status = self._invert(factors, a_damp + g_damp)
        for i, layer in enumerate(self.layers):
            a_new = self._accept(layer, "A", status[i], results[i], self._inv.get(layer.name, (None, None))[0], layer.a_dim)
            g_new = self._accept(layer, "G", status[n + i], results[n + i], self._inv.get(layer.name, (None, None))[1], layer.g_dim)
            self._inv[layer.name] = (a_new, g_new)
        self.stats["inverse_updates"] += 1

    def _invert(self, factors: list[Tensor], damping: list[float]) -> tuple[list[tuple], list[int]]:
        """Per factor ``(inverse,)`` (cholesky) or ``(λ + damping, Q)`` (eigen), and its status."""
        if self.inversion == "cholesky":
            inverses, status = self.ops.damped_inverse(factors, damping)
            results = [(inv,) for inv in inverses]
        else:
            values, vectors, status = self.ops.eigen_decompose(factors)
            results = [(lam + d, q) for lam, q, d in zip(values, vectors, damping)]
        return results, status.tolist()

    def _accept(self, layer: KFACLayer, side: str, status: int, result: tuple, previous, dim: int):
        if status == Status.OK_AFTER_FP64_RETRY:
            self.stats["fp64_retries"] += 1
        if status in (Status.OK, Status.OK_AFTER_FP64_RETRY):
            return result
        self.stats["failed_inversions"] += 1
        key = f"{layer.name}.{side}"
        if key not in self._warned:
            self._warned.add(key)
            fallback = "the previous inverse" if previous is not None else "the identity"
            warnings.warn(
                f"KFACPreconditioner: inverting factor {side} of layer {layer.name!r} failed "
                f"({Status(status).name}) even in float64; using {fallback} (warned once per factor)",
                RuntimeWarning,
                stacklevel=3,
            )
        if previous is not None:
            return previous
        eye = torch.eye(dim, dtype=self.inv_dtype, device=layer.module.weight.device)
        return (eye,) if self.inversion == "cholesky" else (torch.ones(dim, dtype=self.inv_dtype, device=eye.device), eye)

    # ---- preconditioning -------------------------------------------------------------------

    def _precondition(self, grads: list[Tensor]) -> bool:
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        if self._dist is not None:  # all ranks skip together
            finite = self._dist.all_finite(finite)
        if not bool(finite):
            self.stats["nonfinite_grad_steps"] += 1
            for layer, g in zip(self.layers, grads):
                layer.set_grad(torch.zeros_like(g))
            return False
        if not self._inv:
            return True  # no factors yet (e.g. the first step's factor update was skipped)
        if self._dist is not None and self._dist.shares_gradients:  # owners precondition, then broadcast
            updates = self._dist.precondition(grads)
        else:
            updates = self._apply_inverses(self.layers, grads)
        nu = self._kl_clip_scale(updates, grads)
        for layer, update, grad in zip(self.layers, updates, grads):
            layer.set_grad(update * nu if nu != 1.0 else update)
        return True

    def _apply_inverses(self, layers: list[KFACLayer], grads: list[Tensor]) -> list[Tensor]:
        """The preconditioned gradient of each of ``layers`` (``grads`` in the same order)."""
        a_side = [self._inv[l.name][0] for l in layers]
        g_side = [self._inv[l.name][1] for l in layers]
        if self.inversion == "cholesky":
            return self.ops.precondition_inverse([g[0] for g in g_side], grads, [a[0] for a in a_side])
        gamma = float(_value(self.damping, self.steps)) if self.damping_mode == "eigen" else 0.0
        return self.ops.precondition_eigen([g[1] for g in g_side], [g[0] for g in g_side], grads,
                                           [a[1] for a in a_side], [a[0] for a in a_side], gamma)

    def _kl_clip_scale(self, updates: list[Tensor], grads: list[Tensor]) -> float:
        kl_clip = _value(self.kl_clip, self.steps)
        if kl_clip is None:
            self.stats["kl_clip_scale"] = 1.0
            return 1.0
        lr = float(_value(self.lr, self.steps))
        vg = float(sum((u.double() * g.double()).sum() for u, g in zip(updates, grads))) * lr**2
        nu = min(1.0, math.sqrt(kl_clip / abs(vg))) if vg != 0 else 1.0
        self.stats["kl_clip_scale"] = nu
        return nu

    # ---- inspection and checkpoints -------------------------------------------------------

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer name: (A, G)}`` as defined in the module docstring (empty before the first update)."""
        return {l.name: (self._a[l.name], self._g[l.name]) for l in self.layers if l.name in self._a}

    def registration_report(self) -> str:
        lines = [f"KFACPreconditioner(fisher_type={self.fisher_type!r}, inversion={self.inversion!r}, "
                 f"damping_mode={self.damping_mode!r}, backend={self.backend!r}, loss={self.loss!r})",
                 "  preconditioned layers:"]
        for l in self.layers:
            lines.append(f"    {l.name}: {type(l.module).__name__}, A {l.a_dim}x{l.a_dim}, G {l.g_dim}x{l.g_dim}")
        if self.unregistered:
            lines.append("  left to the base optimizer:")
            lines += [f"    {name}: {reason}" for name, reason in self.unregistered]
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
        unknown = set(state["factors"]) - self._registered_names
        if unknown:
            raise ValueError(f"state_dict has factors for layers this model does not have: {sorted(unknown)}")
        self.steps = state["steps"]
        self.stats = dict(state["stats"])
        self._a = {name: a.clone() for name, (a, _) in state["factors"].items()}
        self._g = {name: g.clone() for name, (_, g) in state["factors"].items()}
        self._inv = {name: tuple(tuple(t.clone() for t in side) for side in sides)
                     for name, sides in state["inverses"].items()}
        self.generator.set_state(state["generator"])
        if self._dist is not None:  # other ranks than the saving one start their own stream
            self._dist.load_generator(state)
        if state.get("damping") is not None and not callable(self.damping):
            self.damping = state["damping"]
        self._warned = set(state["warned"])
        self._clear_pending()
        self._pending_step = self.steps

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


    def _clear_pending(self) -> None:
        self._pending_a, self._pending_g, self._forwards = {}, {}, 0
        self._nonfinite_capture = False


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _leading_dim(output) -> int:
    """N: the leading dimension of the (first) tensor the model returned."""
    if isinstance(output, Tensor):
        return output.shape[0]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    for value in values:
        try:
            return _leading_dim(value)
        except TypeError:
            continue
    raise TypeError(f"KFACPreconditioner: the model returned {type(output).__name__} with no tensor in it")


def _cat(chunks: list[Tensor]) -> Tensor:
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _weighted_cat(chunks: list[tuple[Tensor, float]]) -> tuple[Tensor, float]:
    """Concatenates gradient rows whose factor weights agree; rows with another weight are
    rescaled by sqrt(weight ratio) first so one weight covers all."""
    weight = chunks[0][1]
    rows = [g if w == weight else g * math.sqrt(w / weight) for g, w in chunks]
    return _cat(rows), weight
