"""``KFAC``: a ``torch.optim`` optimizer that preconditions with K-FAC, then takes an SGD step."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .layers.base import _local, _whole, rows_of_rank
from .preconditioner import KFACPreconditioner, Schedule, _all_finite, _value

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
        super().__init__(params, lr=float(_value(lr, 0)), momentum=momentum,
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
        adapt = self.adaptive_damping and self.preconditioner.steps % self.adaptive_damping_interval == 0
        if adapt and closure is None:
            raise ValueError("KFAC(adaptive_damping=True) needs step(closure) to evaluate the loss after the update")
        rng = _rng_state(self.preconditioner.blocks[0].device) if adapt else None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        finite = self.preconditioner.step()
        others = [p.grad for p in self._params() if p.grad is not None and id(p) not in self._block_params]
        ok = finite & self._all_finite(others) if others else finite
        if others:
            self.preconditioner._count_nonfinite(finite & ~ok)  # the preconditioner counted ~finite
        before = [p.detach().clone() for p in self._params()] if adapt else None
        self._sgd_step(ok)
        if adapt and bool(ok):
            self._adapt_damping(self._mean_over_ranks(loss.detach()), before, closure, rng)
        return loss

    def _all_finite(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Every element of ``grads`` finite, on every rank: FSDP2 shards (DTensors) are checked
        locally and the flag all-reduced; other gradients are the same on every rank."""
        flag = _all_finite([_local(g) for g in grads])
        dist_ctx = self.preconditioner._dist
        if dist_ctx is not None and any(isinstance(g, DTensor) for g in grads):
            flag = dist_ctx.all_finite(flag)
        return flag

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
            params = [_local(p) for p in with_grad]
            grads = [_local(p.grad) for p in with_grad]
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
                        _local(state["momentum_buffer"]).copy_(g)
                    else:
                        bufs.append(_local(state["momentum_buffer"]))
                        new_grads.append(g)
                if bufs:
                    keep = torch.full((), momentum, dtype=torch.float64, device=ok.device)
                    torch._foreach_mul_(bufs, torch.where(ok, keep, 1.0))
                    torch._foreach_add_(bufs, new_grads, alpha=1 - dampening)
                momenta = [_local(self.state[p]["momentum_buffer"]) for p in with_grad]
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

    def _adapt_damping(self, loss_before: float, before: list[torch.Tensor], closure, rng) -> None:
        """γ ← γ·ω if ρ > 3/4, γ / ω if ρ < 1/4, with ω = (19/20)^interval (Martens & Grosse)."""
        precond = self.preconditioner
        loss_after = self._mean_over_ranks(self._loss_as_before(closure, rng))
        deltas = {id(p): p.detach() - b for p, b in zip(self._params(), before)}
        gamma = float(precond.damping)
        model_change = self._quadratic_model(deltas, precond.last_raw_gradients, gamma)
        rho = (loss_after - loss_before) / model_change if model_change < 0 else -math.inf
        omega = (19 / 20) ** self.adaptive_damping_interval
        if rho > 0.75:
            gamma *= omega
        elif rho < 0.25:
            gamma /= omega
        precond.damping = gamma
        precond.stats["reduction_ratio"] = rho

    def _mean_over_ranks(self, loss: torch.Tensor) -> float:
        """The loss averaged over the ranks (each saw its own batch): every rank then adapts the
        damping alike."""
        dist_ctx = self.preconditioner._dist
        if dist_ctx is None:
            return float(loss)
        return float(dist_ctx.all_sum(loss.double().to(dist_ctx.device))) / dist_ctx.world_size

    def _loss_as_before(self, closure, rng) -> torch.Tensor:
        """L(θ + δ) computed as L(θ) was: same mode, same random numbers (dropout masks), no
        statistics captured, and buffers (BatchNorm running stats) and RNG left as they were."""
        precond = self.preconditioner
        buffers = [b.detach().clone() for b in precond.model.buffers()]
        after = _rng_state(precond.blocks[0].device)
        _set_rng_state(rng)
        try:
            with torch.enable_grad(), precond.pause():
                return closure().detach()
        finally:
            _set_rng_state(after)
            for b, saved in zip(precond.model.buffers(), buffers):
                b.copy_(saved)

    def _quadratic_model(self, deltas: dict[int, torch.Tensor], raw_grads, gamma: float) -> float:
        """M(δ) − M(0) = ∇ᵀδ + ½ δᵀ(F + γI)δ, F ≈ blockdiag(G ⊗ A) on the K-FAC blocks and 0 on
        the parameters the base optimizer moves alone (their ∇ᵀδ and γ‖δ‖² still count: L(θ+δ)
        sees their change too). Under FSDP2 each block's terms come from the rank that
        preconditioned it (it holds the raw gradient whole, and gets the parameter changes whole
        by the gradients' exchange), the other parameters' from the local shards, and the sum
        from an all-reduce."""
        precond = self.preconditioner
        dist_ctx = precond._dist
        sharded = dist_ctx is not None and dist_ctx.sharded
        terms = torch.zeros(2, dtype=torch.float64, device=precond.blocks[0].device)  # linear, quadratic
        factors = precond.factors()
        blocks = precond.blocks
        modelled_blocks = {i: [deltas[id(p)] for p in b.params()] for i, b in enumerate(blocks)
                           if b.weight.grad is not None and b.name in factors}
        modelled = {id(p) for i in modelled_blocks for p in blocks[i].params()}
        if sharded:  # whole on each block's owner (every rank with grad_worker_fraction 1)
            modelled_blocks = dict(enumerate(dist_ctx.gather_whole(blocks, modelled_blocks)))
        else:  # (FSDP2 on one rank: DTensors, whole already)
            modelled_blocks = {i: [_whole(d) for d in ds] for i, ds in modelled_blocks.items()}
        for i, block_deltas in modelled_blocks.items():
            block, grad = blocks[i], raw_grads[i]
            if block_deltas is None or (sharded and dist_ctx.grad_owner(block) != dist_ctx.rank):
                continue
            dw = block.matrix(block_deltas[0], block_deltas[1] if block.bias is not None else None)
            a, g = factors[block.name]
            dw = dw.to(a.dtype)
            if block.a_diagonal:
                curvature = (g @ dw) * a
            else:
                curvature = precond.ops.kron_matmul([g], [dw], [a])[0]
            terms[0] += (grad.double() * dw.double()).sum()
            terms[1] += (dw.double() * (curvature.double() + gamma * dw.double())).sum()
        for p in self._params():
            if id(p) in modelled or p.grad is None or (sharded and not isinstance(p, DTensor) and dist_ctx.rank):
                continue  # (a replicated parameter counts once)
            d = _local(deltas[id(p)]).double()
            terms[0] += (_local(p.grad).double() * d).sum()
            terms[1] += gamma * (d * d).sum()
        if sharded:
            terms = dist_ctx.all_sum(terms)
        linear, quad = terms.tolist()
        return linear + 0.5 * quad

    def state_dict(self) -> dict[str, Any]:
        """SGD's state (momentum buffers) and the preconditioner's under ``"kfac"``. Buffers of
        FSDP2-sharded parameters are gathered whole (every rank must call this), so the
        checkpoint loads on any world size, sharded or not."""
        state = super().state_dict()
        state["state"] = {k: {name: _whole(v) for name, v in s.items()} for k, s in state["state"].items()}
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


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, device


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, device = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)

