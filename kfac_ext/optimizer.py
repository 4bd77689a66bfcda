"""``KFAC``: a ``torch.optim`` optimizer that preconditions with K-FAC, then takes an SGD step."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .damping import AdaptiveDamping
from .fsdp import local, rows_of_rank, whole
from .preconditioner import KFACPreconditioner
from .util import Schedule, value

__all__ = ["KFAC"]


class KFAC(torch.optim.SGD):
    """K-FAC preconditioning followed by SGD with momentum / weight decay (``torch.optim.SGD``
    semantics, so ``param_groups``, ``lr_scheduler`` and ``state_dict`` behave as usual).

    Parameters of layers K-FAC does not precondition (norms, tied or frozen weights, …; see the
    preconditioner's report) get plain SGD. Usage (two changed lines)::

        optimizer = kfac_ext.KFAC(model, lr=0.05, loss="cross_entropy")
        for x, y in data:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    or, with parameter groups (e.g. no weight decay on biases and norms)::

        optimizer = kfac_ext.KFAC([{"params": decay, "weight_decay": 1e-4},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  model=model, lr=0.05, loss="cross_entropy")

    Defaults: momentum 0.9, and (through the preconditioner) KL clipping at 1e-3 — the update is
    rescaled so that ``lr² Σ ⟨v, ∇⟩ <= 1e-3`` — with damping 1e-3: the combination that trains
    ResNets and transformers at the learning rates people use for SGD with momentum (0.01-0.1)
    without diverging (K-FAC without the clip takes steps ``1/damping`` times larger along
    low-curvature directions; see the README's "Defaults").

    Args:
        params_or_model: the model (all its trainable parameters, one group), or parameters /
            parameter groups as for any ``torch.optim`` optimizer (then pass ``model=``).
        lr: a number (schedulable by ``torch.optim.lr_scheduler``) or a callable of the step
            (then it overrides ``param_groups[*]["lr"]`` each step). KL clipping uses the lr
            of the group holding the first K-FAC block's weight.
        momentum, weight_decay, nesterov: as in ``torch.optim.SGD``; weight decay is added to the
            preconditioned direction.
        adaptive_damping: Levenberg-Marquardt adaptation of the damping γ (Martens & Grosse 2015
            §6.5) every ``adaptive_damping_interval`` steps from the reduction ratio
            ρ = (L(θ+δ) − L(θ)) / M(δ) of the K-FAC quadratic model; needs ``step(closure)``.
        model: the model, when ``params_or_model`` are parameters.
        **preconditioner_kwargs: forwarded to :class:`KFACPreconditioner` (``loss``,
            ``fisher_type``, ``damping``, ``kl_clip``, ...). ``lr`` is shared with it (KL clipping).
    """

    def __init__(
        self,
        params_or_model: nn.Module | Iterable,
        lr: Schedule = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        adaptive_damping: bool = False,
        adaptive_damping_interval: int = 5,
        *,
        model: nn.Module | None = None,
        **preconditioner_kwargs: Any,
    ):
        if isinstance(params_or_model, nn.Module):
            if model is not None and model is not params_or_model:
                raise ValueError("KFAC: pass the model once (as the first argument or as model=)")
            model = params_or_model
            params = [p for p in model.parameters() if p.requires_grad]
        elif model is None:
            raise TypeError("KFAC(params, ...) needs model= (the module whose layers K-FAC preconditions)")
        else:
            params = params_or_model
        self._lr_schedule = lr if callable(lr) else None
        super().__init__(params, lr=float(value(lr, 0)), momentum=momentum,
                         weight_decay=weight_decay, nesterov=nesterov)
        for group in self.param_groups:  # _sgd_step implements SGD's plain update only
            unsupported = [k for k in ("maximize", "fused", "differentiable") if group.get(k)]
            if unsupported:
                raise ValueError(f"KFAC: parameter group option(s) {unsupported} are not supported")
        if adaptive_damping and callable(preconditioner_kwargs.get("damping")):
            raise ValueError("adaptive_damping adapts a number: pass damping as a float")
        self.preconditioner = KFACPreconditioner(model, lr=self._kfac_lr, **preconditioner_kwargs)
        self._check_params_cover_blocks()
        self._block_params = {id(p) for b in self.preconditioner.blocks for p in b.params()}
        self.adaptive_damping = adaptive_damping
        self.adaptive_damping_interval = adaptive_damping_interval
        self._damping = AdaptiveDamping(self.preconditioner, adaptive_damping_interval) if adaptive_damping else None

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Preconditions the gradients and takes the SGD step. A step whose gradients are not
        finite changes no parameter and no momentum buffer (and is counted in
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
        finite = self.preconditioner.step()
        others = [p.grad for p in self._params() if p.grad is not None and id(p) not in self._block_params]
        ok = finite & self.preconditioner.topology.finite(others) if others else finite
        if others:
            self.preconditioner.count_nonfinite(finite & ~ok)  # the preconditioner counted ~finite
        before = [p.detach().clone() for p in self._params()] if adapt else None
        self._sgd_step(ok)
        if adapt and bool(ok):
            self._damping.adapt(self._params(), loss.detach(), before, closure, rng)
        return loss

    def _sgd_step(self, ok: torch.Tensor) -> None:
        """``torch.optim.SGD``'s update, with its momentum buffers, taken only where the 0-d
        ``ok`` is True: with ``ok`` False no parameter and no buffer changes. The gradient is
        zeroed on the device, the buffer scaled by ``where(ok, μ, 1)``, and the step by ``ok``,
        so skipping needs no host read. FSDP2 parameters (DTensors) are updated through their
        local shards, which is exactly the sharded update."""
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            if not with_grad:
                continue
            momentum, dampening = group["momentum"], group["dampening"]
            params = [local(p) for p in with_grad]
            grads = [local(p.grad) for p in with_grad]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            grads = [torch.where(ok, g, 0.0) for g in grads]
            if momentum:
                bufs, new_grads = [], []
                for p, g in zip(with_grad, grads):
                    state = self.state[p]
                    if state.get("momentum_buffer") is None:
                        # shaped (and sharded) like the gradient; zero if this step is skipped
                        state["momentum_buffer"] = p.grad.detach().clone()
                        local(state["momentum_buffer"]).copy_(g)
                    else:
                        bufs.append(local(state["momentum_buffer"]))
                        new_grads.append(g)
                if bufs:
                    keep = torch.full((), momentum, dtype=torch.float64, device=ok.device)
                    torch._foreach_mul_(bufs, torch.where(ok, keep, 1.0))
                    torch._foreach_add_(bufs, new_grads, alpha=1 - dampening)
                momenta = [local(self.state[p]["momentum_buffer"]) for p in with_grad]
                grads = torch._foreach_add(grads, momenta, alpha=momentum) if group["nesterov"] else momenta
            # the direction times 0 or 1 (exact), then torch's own `p += -lr * d`: bit for bit SGD
            torch._foreach_add_(params, torch._foreach_mul(grads, ok.to(grads[0].dtype)), alpha=-group["lr"])

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
        """SGD's state (momentum buffers) and the preconditioner's under ``"kfac"``. Buffers of
        FSDP2-sharded parameters are gathered whole (every rank must call this), so the
        checkpoint loads on any world size, sharded or not."""
        state = super().state_dict()
        state["state"] = {k: {name: whole(v) for name, v in s.items()} for k, s in state["state"].items()}
        state["kfac"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict` saved on any world size, sharded or not: into FSDP2-sharded
        parameters, each rank keeps its rows of the (whole) momentum buffers."""
        state_dict = dict(state_dict)
        self.preconditioner.load_state_dict(state_dict.pop("kfac"))
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            buffer = state.get("momentum_buffer")
            if isinstance(p, DTensor) and buffer is not None and not isinstance(buffer, DTensor):
                rows = rows_of_rank(buffer, p).clone()
                state["momentum_buffer"] = DTensor.from_local(rows, p.device_mesh, p.placements, run_check=False,
                                                              shape=p.shape, stride=p.stride())

