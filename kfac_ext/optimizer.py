"""``KFAC``: a ``torch.optim`` optimizer that preconditions with K-FAC, then moves the parameters
by one of the update rules of :mod:`kfac_ext.update`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .damping import AdaptiveDamping
from .fsdp import rows_of_rank, whole
from .preconditioner import KFACPreconditioner
from .update import RULES, EigenbasisAdam, GradientBasisAdam, masked_adamw, masked_move, masked_sgd
from .util import Schedule, doubling, flush_denormals, value

__all__ = ["KFAC"]

#: Learning rate per rule when none is given: AdamW's for the Adam-based rules.
DEFAULT_LR = {"eigen-adam": 1e-3, "adamw": 1e-3, "sgd": 0.01}


class KFAC(torch.optim.Optimizer):
    """K-FAC preconditioning followed by a parameter update (``param_groups``, ``lr_scheduler``
    and ``state_dict`` behave as for any ``torch.optim`` optimizer).

    Usage (two changed lines; start from the learning rate you use with AdamW)::

        optimizer = kfac_ext.KFAC(model, lr=1e-3, loss="cross_entropy")
        for x, y in data:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    or, with parameter groups (e.g. no weight decay on biases and norms)::

        optimizer = kfac_ext.KFAC([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  model=model, lr=1e-3, loss="cross_entropy")

    Update rules (``update=``, :mod:`kfac_ext.update`):

    * ``"eigen-adam"`` (default): Adam in the eigenbasis of each K-FAC block's factors (SOAP's idea
      with K-FAC's factors); a float32 / float64 matrix that no block covers (a tied input /
      output embedding, a bare ``nn.Parameter``) by Adam in the eigenbasis of its own gradient's
      ``E[∇∇ᵀ]`` and ``E[∇ᵀ∇]`` (SOAP's factors, on the same schedules); every other parameter
      (norms, biases, ...) by AdamW. AdamW's learning rates and ``betas`` / ``eps`` / decoupled
      ``weight_decay``.
      Its factors are the empirical ones (``fisher_type="empirical"``: the training backward's
      own gradients, no extra backward), updated at steps 0, 1, 2, 4, 8, then every 10
      (``factor_update_steps``) with ``factor_decay=0.9`` (a memory of about 100 steps), the
      basis at 0, 1, 2, 4, 8, 16, then every 10 to 50 steps (``inv_update_steps="auto"``: as
      often as the eigendecompositions stay a small share of the layers' work; every 20 on a
      small transformer over 2048 tokens, 50 on a small batch of wide layers): the moments keep
      the step fresh in between. A factor ``d`` wide takes at most about ``4d`` rows (tokens,
      pixels) of a micro-batch, at least 1024 (``factor_rows="auto"``); the factors' moving
      average is debiased (``debias_factors``).
    * ``"adamw"``: the K-FAC direction ``(G ⊗ A + damping)⁻¹ ∇W̄`` fed to AdamW with every other
      parameter's gradient (Monte Carlo factors at 0, 1, 2, 4, 8, then every 10 steps, inverses
      at 0, 1, 2, ..., 64, then every 100).
    * ``"sgd"``: SGD with momentum on the K-FAC direction with KL clipping at 1e-3 (damping 1e-3,
      factors every step, inverses every 10), every other parameter by SGD with momentum: the rule
      before 2026-12, at SGD's learning rates (0.01-0.1).

    Args:
        params_or_model: the model (all its trainable parameters, one group), or parameters /
            parameter groups as for any ``torch.optim`` optimizer (then pass ``model=``).
        lr: a number (schedulable by ``torch.optim.lr_scheduler``) or a callable of the step
            (then it overrides ``param_groups[*]["lr"]`` each step); default per rule
            (:data:`DEFAULT_LR`). The KL clip (``"sgd"``) uses the lr of the group holding the
            first K-FAC block's weight.
        momentum, nesterov: SGD's (``"sgd"`` only).
        weight_decay: AdamW's decoupled decay for the Adam-based rules; SGD's (added to the
            preconditioned direction) for ``"sgd"``.
        adaptive_damping: Levenberg-Marquardt adaptation of the damping γ (Martens & Grosse 2015
            §6.5) every ``adaptive_damping_interval`` steps from the reduction ratio
            ρ = (L(θ+δ) − L(θ)) / M(δ) of the K-FAC quadratic model; needs ``step(closure)``;
            rules with a damped K-FAC direction only (``"adamw"``, ``"sgd"``).
        update: the rule, above.
        betas, eps: Adam's (the Adam-based rules).
        model: the model, when ``params_or_model`` are parameters.
        **preconditioner_kwargs: forwarded to :class:`KFACPreconditioner` (``loss``,
            ``fisher_type``, ``damping``, ``kl_clip``, schedules, ...) over the rule's defaults.
    """

    def __init__(
        self,
        params_or_model: nn.Module | Iterable,
        lr: Schedule | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        adaptive_damping: bool = False,
        adaptive_damping_interval: int = 5,
        *,
        update: str = "eigen-adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        model: nn.Module | None = None,
        **preconditioner_kwargs: Any,
    ):
        if update not in RULES:
            raise ValueError(f"update must be one of {list(RULES)}, got {update!r}")
        model, params = _model_and_params(params_or_model, model)
        lr = DEFAULT_LR[update] if lr is None else lr
        self._lr_schedule = lr if callable(lr) else None
        defaults = dict(lr=float(value(lr, 0)), momentum=momentum, dampening=0.0, weight_decay=weight_decay,
                        nesterov=nesterov, betas=betas, eps=eps)
        super().__init__(params, defaults)
        for group in self.param_groups:  # the rules implement the plain updates only
            unsupported = [k for k in ("maximize", "fused", "differentiable", "amsgrad") if group.get(k)]
            if unsupported:
                raise ValueError(f"KFAC: parameter group option(s) {unsupported} are not supported")
        if adaptive_damping and (update == "eigen-adam" or callable(preconditioner_kwargs.get("damping"))):
            raise ValueError("adaptive_damping adapts the damping (a number) of a damped K-FAC direction: "
                             "pass damping as a float, with update='adamw' or 'sgd'")
        self.update = update
        self.preconditioner = KFACPreconditioner(model, lr=self._kfac_lr,
                                                 **{**_preconditioner_defaults(update), **preconditioner_kwargs})
        self._eigen_adam = None
        if update == "eigen-adam":
            if (self.preconditioner.inversion, self.preconditioner.damping_mode) != ("eigen", "eigen"):
                raise ValueError("update='eigen-adam' runs Adam in the factors' eigenbases: it needs "
                                 "inversion='eigen' and damping_mode='eigen' (the defaults for this rule)")
            self._eigen_adam = EigenbasisAdam(self.preconditioner.inverses, betas, eps)
            self.preconditioner.direction_rule = self._eigen_adam
        self._check_params_cover_blocks()
        self._block_params = {id(p) for b in self.preconditioner.blocks for p in b.params()}
        self._matrix_adam = None
        if update == "eigen-adam":
            self._matrix_adam = GradientBasisAdam(self.preconditioner.inverses.ops, betas, eps,
                                                  self.preconditioner.max_factor_dim,
                                                  self.preconditioner.curvature.debias)
        self.adaptive_damping = adaptive_damping
        self.adaptive_damping_interval = adaptive_damping_interval
        self._damping = AdaptiveDamping(self.preconditioner, adaptive_damping_interval) if adaptive_damping else None

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Preconditions the gradients and moves the parameters. A step whose gradients are not
        finite changes no parameter and no optimizer state (and is counted in
        ``preconditioner.stats``); that is decided on the device, so a step that updates no
        factors and no inverses does not synchronize with it."""
        loss = None
        if self._lr_schedule is not None:
            for group in self.param_groups:
                group["lr"] = float(self._lr_schedule(self.preconditioner.steps))
        adapt = self._damping is not None and self._damping.due()
        if adapt and closure is None:
            raise ValueError("KFAC(adaptive_damping=True) needs step(closure) to evaluate the loss after the update")
        rng = self._damping.rng_state() if adapt else None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        precond = self.preconditioner
        # a blockless matrix's basis goes with the blocks on the shared schedule
        schedule = dict(factor_due=precond.is_factor_step(), basis_due=precond.is_shared_inverse_step(),
                        decay=float(value(precond.factor_decay, precond.steps)))
        finite = self.preconditioner.step()
        others = [p.grad for p in self._params() if p.grad is not None and id(p) not in self._block_params]
        ok = finite & self.preconditioner.topology.finite(others) if others else finite
        if others:
            self.preconditioner.count_nonfinite(finite & ~ok)  # the preconditioner counted ~finite
        before = [p.detach().clone() for p in self._params()] if adapt else None
        self._move(ok, schedule)
        if adapt and bool(ok):
            self._damping.adapt(self._params(), loss.detach(), before, closure, rng)
        return loss

    def _move(self, ok: torch.Tensor, schedule: dict) -> None:
        """The rule's parameter update of every group, only where the 0-d ``ok`` is True
        (``schedule``: this step's factor and basis updates, for :class:`GradientBasisAdam`)."""
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            if not with_grad:
                continue
            lr, wd = group["lr"], group["weight_decay"]
            if self.update == "sgd":
                masked_sgd(with_grad, [self.state[p] for p in with_grad], ok, lr=lr, momentum=group["momentum"],
                           dampening=group["dampening"], weight_decay=wd, nesterov=group["nesterov"])
                continue
            adam = dict(lr=lr, betas=group.get("betas", self.defaults["betas"]),
                        eps=group.get("eps", self.defaults["eps"]), weight_decay=wd)
            if self.update == "adamw":
                masked_adamw(with_grad, [self.state[p] for p in with_grad], ok, **adam)
                continue
            directed = [p for p in with_grad if id(p) in self._block_params]
            others = [p for p in with_grad if id(p) not in self._block_params]
            matrices = [p for p in others if self._matrix_adam.takes(p)]
            plain = [p for p in others if not self._matrix_adam.takes(p)]
            if matrices:
                with flush_denormals():
                    self._matrix_adam(matrices, [self.state[p] for p in matrices], ok, **schedule)
            if directed or matrices:  # eigen-adam: their gradients hold Adam's normalized directions
                masked_move(directed + matrices, ok, lr=lr, weight_decay=wd)
            if plain:
                masked_adamw(plain, [self.state[p] for p in plain], ok, **adam)

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _kfac_lr(self, step: int) -> float:
        """The lr of the group holding the first K-FAC block's weight (for the KL clip)."""
        weight = self.preconditioner.blocks[0].weight
        for group in self.param_groups:
            if any(p is weight for p in group["params"]):
                return group["lr"]
        return self.param_groups[0]["lr"]

    def _check_params_cover_blocks(self) -> None:
        mine = {id(p) for p in self._params()}
        missing = [b.name for b in self.preconditioner.blocks if any(id(p) not in mine for p in b.params())]
        if missing:
            raise ValueError(f"KFAC: the parameters of K-FAC blocks {missing} are not in params; "
                             "pass all of the model's trainable parameters (or skip_layers those blocks)")

    def state_dict(self) -> dict[str, Any]:
        """The base state (momentum buffers or Adam moments) and the preconditioner's under
        ``"kfac"`` (with the eigenbasis moments of ``"eigen-adam"``). State of FSDP2-sharded
        parameters is gathered whole (every rank must call this), so the checkpoint loads on any
        world size, sharded or not."""
        state = super().state_dict()
        state["state"] = {k: {name: whole(v) for name, v in s.items()} for k, s in state["state"].items()}
        state["kfac"] = self.preconditioner.state_dict()
        if self._eigen_adam is not None:
            state["kfac"]["eigen_adam"] = self._eigen_adam.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict` saved on any world size, sharded or not: into FSDP2-sharded
        parameters, each rank keeps its rows of the (whole) state tensors."""
        state_dict = dict(state_dict)
        kfac = dict(state_dict.pop("kfac"))
        eigen_adam = kfac.pop("eigen_adam", None)
        self.preconditioner.load_state_dict(kfac)
        if self._eigen_adam is not None and eigen_adam is not None:
            self._eigen_adam.load_state_dict(eigen_adam, {b.name: b.device for b in self.preconditioner.blocks})
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            if not isinstance(p, DTensor):
                continue
            for name, t in state.items():
                if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and t.shape == p.shape:
                    rows = rows_of_rank(t, p).clone()
                    state[name] = DTensor.from_local(rows, p.device_mesh, p.placements, run_check=False,
                                                     shape=p.shape, stride=p.stride())


def _model_and_params(params_or_model, model):
    if isinstance(params_or_model, nn.Module):
        if model is not None and model is not params_or_model:
            raise ValueError("KFAC: pass the model once (as the first argument or as model=)")
        return params_or_model, [p for p in params_or_model.parameters() if p.requires_grad]
    if model is None:
        raise TypeError("KFAC(params, ...) needs model= (the module whose layers K-FAC preconditions)")
    return model, params_or_model


def _preconditioner_defaults(update: str) -> dict[str, Any]:
    """What each rule asks of the preconditioner unless the caller says otherwise."""
    if update == "sgd":
        return {}
    if update == "eigen-adam":
        # The eigenbases, undamped (Adam's eps plays the damping's part), of the empirical
        # factors: the gradients of the training backward itself (no sampled backward), as SOAP
        # uses; Adam's moments correct the scale a basis from them gets wrong.
        # A factor d wide takes at most ~4d rows of a micro-batch (at least 1024): more rows of
        # the same sequences or images sharpen it little and cost GEMM time on every factor step.
        # Debiased factors: the bases of the first ~100 steps are not held to the statistics of
        # the initial weights. Fresher bases help transformers (a refresh every 20 steps instead
        # of 50: 7 % fewer steps) and not small convnets or MLPs, whose refreshes cost several
        # steps' time: the period follows what a refresh costs ("auto"; a classifier head whose
        # decompositions outweigh its layer's work is refreshed at 0, 4, 16, 64, ...: the
        # convnet with its 513-wide head reaches its target in the same steps, 9 % sooner).
        # Factors every 10 steps with ρ = 0.9 (the memory of every 5 with 0.95): the same steps
        # on the transformers and the convnet at half the factor work, and a third fewer on the
        # autoencoder.
        return dict(kl_clip=None, fisher_type="empirical", factor_update_steps=doubling(10), factor_decay=0.9,
                    inv_update_steps="auto", inversion="eigen", damping_mode="eigen", factor_rows="auto",
                    debias_factors=True)
    return dict(kl_clip=None, factor_update_steps=doubling(10), inv_update_steps=doubling(100))
