"""The update rules of :class:`~kfac_ext.KFAC`: how a step moves the parameters once the
preconditioner has rewritten the K-FAC blocks' gradients.

* ``"eigen-adam"`` (the default): Adam run in the eigenbasis of each block's factors — the
  gradient ``∇W̄`` is rotated to ``Q_Gᵀ ∇W̄ Q_A``, Adam's moments are kept per coordinate there and
  updated every step, and the step is rotated back (SOAP's idea, Vyas et al. 2024, with K-FAC's
  Kronecker factors; EKFAC, George et al. 2018, is its per-example relative). Adam's second moment
  takes the place of the eigenvalues, so a stale basis (refreshed rarely) costs little.
  :class:`EigenbasisAdam` computes these directions inside the preconditioner (by each block's
  owner, under the distribution modes); the parameters then move by ``lr`` times them. A matrix
  parameter no block covers (a tied input / output embedding) gets Adam in the eigenbasis of its
  own gradient's factors (:class:`GradientBasisAdam`, SOAP's), every other parameter AdamW.
* ``"adamw"``: the K-FAC direction ``(G ⊗ A + damping)⁻¹ ∇W̄`` fed to AdamW, with every other
  parameter's raw gradient.
* ``"sgd"``: SGD with momentum on the K-FAC direction clipped by the KL clip, every other
  parameter by plain SGD with momentum (the rule of kfac_ext before 2026-12).

Every rule skips a step whose gradients are not finite on the device: no parameter and no
state changes, and nothing is read back (:func:`masked_sgd`, :func:`masked_adamw`,
:func:`masked_move`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from .curvature import debiased_decay
from .fsdp import local
from .inverse import EigenPair
from .ops import Status
from .util import group_by

if TYPE_CHECKING:
    from .inverse import Inverses
    from .layers import Block

RULES = ("eigen-adam", "adamw", "sgd")


def masked_sgd(params: list[Tensor], states: list[dict], ok: Tensor, *, lr: float, momentum: float,
               dampening: float, weight_decay: float, nesterov: bool) -> None:
    """``torch.optim.SGD``'s update of ``params`` (with gradients; ``states`` their optimizer
    state dicts), momentum buffers included, taken only where the 0-d ``ok`` is True: with ``ok``
    False no parameter and no buffer changes. The gradient is zeroed on the device, the buffer
    scaled by ``where(ok, μ, 1)``, and the step by ``ok``, so skipping needs no host read. FSDP2
    parameters (DTensors) are updated through their local shards, which is exactly the sharded
    update."""
    local_params = [local(p) for p in params]
    grads = [local(p.grad) for p in params]
    if weight_decay:
        grads = torch._foreach_add(grads, local_params, alpha=weight_decay)
    grads = [torch.where(ok, g, 0.0) for g in grads]
    if momentum:
        bufs, new_grads = [], []
        for p, state, g in zip(params, states, grads):
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
        momenta = [local(s["momentum_buffer"]) for s in states]
        grads = torch._foreach_add(grads, momenta, alpha=momentum) if nesterov else momenta
    # the direction times 0 or 1 (exact), then torch's own `p += -lr * d`: bit for bit SGD
    torch._foreach_add_(local_params, torch._foreach_mul(grads, ok.to(grads[0].dtype)), alpha=-lr)


def masked_adamw(params: list[Tensor], states: list[dict], ok: Tensor, *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float) -> None:
    """``torch.optim.AdamW`` (decoupled weight decay, bias-corrected moments) of ``params``, taken
    only where the 0-d ``ok`` is True, decided on the device: the step count advances by ``ok``,
    and torch's fused AdamW kernel (``fused=True``'s) is told ``found_inf = not ok``, on which it
    leaves every parameter and moment as it was without reading the gradients (NaNs included).
    One kernel per device and dtype: a loop of ~10 foreach ops cost more than the arithmetic on
    small models (0.9 ms a step for a transformer's 10 LayerNorm vectors). ``states`` hold
    ``step``, ``exp_avg``, ``exp_avg_sq`` (made on first use, sharded like the parameter under
    FSDP2)."""
    for p, s in zip(params, states):
        if "exp_avg" not in s:
            s["step"] = torch.zeros((), dtype=torch.float32, device=local(p).device)
            s["exp_avg"], s["exp_avg_sq"] = torch.zeros_like(p.detach()), torch.zeros_like(p.detach())
    for members, advance in _by_device_and_dtype(params, ok):
        steps = [states[i]["step"] for i in members]
        torch._foreach_add_(steps, advance)
        torch._fused_adamw_(
            [local(params[i]) for i in members], [local(params[i].grad) for i in members],
            [local(states[i]["exp_avg"]) for i in members], [local(states[i]["exp_avg_sq"]) for i in members], [],
            steps, lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps, amsgrad=False,
            maximize=False, grad_scale=None, found_inf=1.0 - advance)


def masked_move(params: list[Tensor], ok: Tensor, *, lr: float, weight_decay: float) -> None:
    """``p ← p − lr (d + wd·p)`` with ``d`` the parameter's gradient (a direction already
    normalized, as :class:`EigenbasisAdam` writes it; weight decay decoupled), only where ``ok``:
    torch's fused SGD kernel without momentum, whose weight decay ``d + wd·p`` is this same
    update, told ``found_inf = not ok`` (then it neither moves nor reads the gradients)."""
    for members, advance in _by_device_and_dtype(params, ok):
        torch._fused_sgd_([local(params[i]) for i in members], [local(params[i].grad) for i in members], [],
                          weight_decay=weight_decay, momentum=0.0, lr=lr, dampening=0.0, nesterov=False,
                          maximize=False, is_first_step=False, grad_scale=None, found_inf=1.0 - advance)


def _by_device_and_dtype(params: list[Tensor], ok: Tensor) -> list[tuple[list[int], Tensor]]:
    """Indices of ``params`` per (device, dtype) of their local tensors — what one fused kernel
    takes — each with ``ok`` as a float32 0-d tensor on that device (a model split over devices)."""
    kinds = group_by(range(len(params)), lambda i: (local(params[i]).device, local(params[i]).dtype))
    groups = []
    for members in kinds.values():
        device = local(params[members[0]]).device
        groups.append((members, on_device(ok, device).to(torch.float32)))
    return groups


def on_device(flag: Tensor, device: torch.device) -> Tensor:
    """The 0-d ``flag`` on ``device`` (a model split over devices), moved only if it is elsewhere."""
    return flag if flag.device == device else flag.to(device)


class EigenbasisAdam:
    """Adam directions in each block's factor eigenbasis: for ``∇W̄`` of a block whose records
    are eigenpairs ``(λ_A, Q_A)``, ``(λ_G, Q_G)`` (an embedding's diagonal A: no ``Q_A``),
    ``ĝ = Q_Gᵀ ∇W̄ Q_A``; ``m ← β₁m + (1-β₁)ĝ``, ``v ← β₂v + (1-β₂)ĝ²``; the direction is
    ``Q_G (m̂ / (√v̂ + ε)) Q_Aᵀ``. When an inversion refreshed the basis, the moments are carried
    into the new one with ``R_G = Q_G'ᵀ Q_G`` and ``R_A = Q_Aᵀ Q_A'``: ``m ← R_G m R_A`` exactly,
    and ``v ← (R_G∘R_G) v (R_A∘R_A)``, the second moments of independent coordinates rotated.
    Keeping ``v`` as it was (SOAP's choice) made early training spike: the first bases, from a
    batch or two, change a lot, and a coordinate with a tiny old ``v`` that now carries a large
    gradient gets a huge step (MobileNetV3-small: 2.3 → 2600 in 10 steps at lr 1e-2; rotated, it
    trains). Only the rank that preconditions a block keeps its state."""

    def __init__(self, inverses: Inverses, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.inverses, self.betas, self.eps = inverses, betas, eps
        self.state: dict[str, dict[str, Any]] = {}

    def __call__(self, blocks: list[Block], grads: list[Tensor], finite: Tensor) -> list[Tensor]:
        """The directions of ``blocks``; where ``finite`` is False no state changes (and the
        preconditioner, which masks every rule's directions, writes zeros). All blocks go
        through one native call (:func:`kfac_ext.ops.eigen_adam_`) per gradient dtype, basis
        dtype and device (a model split over devices): on small models the per-op cost of a
        Python loop of rotations and moment updates, not their arithmetic, would set a step's
        time."""
        directions: list[Tensor | None] = [None] * len(blocks)
        by_kind = group_by(range(len(blocks)),
                           lambda i: (grads[i].dtype, self._basis_dtype(blocks[i]), grads[i].device))
        for members in by_kind.values():
            states = [self._state_in_current_basis(blocks[i], grads[i]) for i in members]
            device = grads[members[0]].device
            keep = on_device(finite, device)
            out = self.inverses.ops.eigen_adam_(
                [s["q_g"] for s in states], [grads[i].contiguous() for i in members], [s["q_a"] for s in states],
                [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                keep, *self.betas, self.eps)
            for i, d in zip(members, out):
                directions[i] = d
        return directions

    def _basis_dtype(self, block: Block) -> torch.dtype:
        rec_a, rec_g = self.inverses.records[block.name]
        assert isinstance(rec_a, EigenPair) and isinstance(rec_g, EigenPair), "eigen-adam needs eigenpairs"
        return rec_g.vectors.dtype

    def _state_in_current_basis(self, block: Block, grad: Tensor) -> dict[str, Any]:
        """The block's moments, created (zeros) on first use, carried into the current basis
        when an inversion refreshed it."""
        rec_a, rec_g = self.inverses.records[block.name]
        q_a, q_g = rec_a.vectors, rec_g.vectors
        state = self.state.get(block.name)
        if state is None:
            zeros = torch.zeros(grad.shape, dtype=q_g.dtype, device=grad.device)
            state = self.state[block.name] = dict(step=torch.zeros((), dtype=torch.float32, device=grad.device),
                                                  exp_avg=zeros, exp_avg_sq=zeros.clone(), q_a=q_a, q_g=q_g)
        elif state["q_g"] is not q_g or state["q_a"] is not q_a:
            carry_moments(state, q_g, q_a)
        return state

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        # clones: the op updates the moments in place at every later step
        return {name: {k: v.clone() for k, v in s.items() if k in ("step", "exp_avg", "exp_avg_sq")}
                for name, s in self.state.items()}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]], devices: dict[str, torch.device]) -> None:
        """Moments saved in the basis of the saved records (which load with them)."""
        self.state = {}
        for name, s in state.items():
            rec_a, rec_g = self.inverses.records.get(name, (None, None))
            if not isinstance(rec_g, EigenPair):
                continue  # no basis to go with the moments: they restart
            self.state[name] = {k: t.to(devices[name], copy=True) for k, t in s.items()}
            self.state[name].update(q_a=rec_a.vectors, q_g=rec_g.vectors)


class GradientBasisAdam:
    """Adam in the eigenbasis of a matrix parameter's own gradient statistics, for the 2-D
    parameters no K-FAC block covers (a tied input / output embedding, whose gradient mixes two
    layers' Kronecker structures; a bare ``nn.Parameter`` matrix): ``L = E[∇∇ᵀ]`` and
    ``R = E[∇ᵀ∇]``, Shampoo's factors as SOAP uses them, moving averages updated on K-FAC's factor
    steps, their eigenbases refreshed on its shared inverse steps (those of the blocks not
    refreshed on a sparse schedule of their own), and Adam's moments kept and carried
    between bases as in :class:`EigenbasisAdam` (the same native op). A side wider than
    ``max_dim`` is not rotated (Adam's own coordinates there); such a parameter is handled
    transposed, so that the rotated side is the op's first. Float32 and float64 parameters (the
    dtype of their factors and moments) that FSDP2 does not shard: :meth:`takes`."""

    def __init__(self, ops, betas: tuple[float, float], eps: float, max_dim: int, debias: bool = False):
        self.ops, self.betas, self.eps, self.max_dim, self.debias = ops, betas, eps, max_dim, debias

    def takes(self, p: Tensor) -> bool:
        return (p.dim() == 2 and not isinstance(p, DTensor) and p.dtype in (torch.float32, torch.float64)
                and min(p.shape) <= self.max_dim)

    def __call__(self, params: list[Tensor], states: list[dict], ok: Tensor, *, factor_due: bool, basis_due: bool,
                 decay: float) -> None:
        """Replaces each parameter's ``.grad`` by its Adam direction where the 0-d ``ok`` (on the
        device) is True; where not, no state changes and ``.grad`` stays as it was. Decided on the
        device, except on basis steps (which read the eigendecompositions' statuses anyway)."""
        oks = {p.device: on_device(ok, p.device) for p in params}
        grads = [self._oriented(p) for p in params]
        if factor_due:
            for p, g, s in zip(params, grads, states):
                self._update_factors(g, s, oks[p.device], decay)
        refresh = basis_due and bool(ok)
        for p, g, s in zip(params, grads, states):
            if "q_g" not in s:
                self._start(p, g, s)
            elif refresh and "left" in s:  # factors exist (every factor update sets "left")
                self._refresh_basis(s)
        for members in group_by(range(len(params)), lambda i: (params[i].dtype, params[i].device)).values():
            keep = oks[params[members[0]].device]
            st = [states[i] for i in members]
            out = self.ops.eigen_adam_([s["q_g"] for s in st], [grads[i].contiguous() for i in members],
                                       [s["q_a"] for s in st], [s["exp_avg"] for s in st],
                                       [s["exp_avg_sq"] for s in st], [s["step"] for s in st], keep, *self.betas,
                                       self.eps)
            for i, d in zip(members, out):
                grad = params[i].grad
                grad.copy_(torch.where(keep, d.mT if self._transposed(params[i]) else d, grad))

    def _transposed(self, p: Tensor) -> bool:
        return p.shape[0] > self.max_dim

    def _oriented(self, p: Tensor) -> Tensor:
        return p.grad.mT if self._transposed(p) else p.grad

    def _rotates_right(self, oriented: Tensor) -> bool:
        return oriented.shape[1] <= self.max_dim

    def _update_factors(self, grad: Tensor, state: dict, ok: Tensor, decay: float) -> None:
        """``L ← ρL + (1-ρ)∇∇ᵀ`` (and ``R``) where ``ok``; the first update sets them. With
        ``debias``, ``ρ`` is the blocks' debiased one for the weight the factors gathered (a
        device scalar: deciding it needs no host read); factors from a checkpoint that has no
        such weight count as settled (plain ``ρ``), as the blocks' do."""
        g = torch.where(ok, grad, 0.0)
        sides = {"left": g @ g.mT}
        if self._rotates_right(g):
            sides["right"] = g.mT @ g
        advance = ok.to(g.dtype)
        keep = decay
        if self.debias and ("factor_weight" in state or "left" not in state):
            gathered = state.get("factor_weight", torch.zeros((), dtype=g.dtype, device=g.device))
            keep = debiased_decay(decay, gathered)
            state["factor_weight"] = torch.where(ok, decay * gathered + 1.0, gathered)
        weight = advance * (1.0 - keep)
        for key, stat in sides.items():
            if key in state:
                state[key].lerp_(stat, weight)
            else:
                state[key] = stat

    def _start(self, p: Tensor, grad: Tensor, state: dict) -> None:
        """Moments in the identity basis: zeros, or AdamW's (a checkpoint saved when AdamW took
        this parameter: the same coordinates). Not the factors' basis yet: a basis from the
        factors of this one gradient would be its singular vectors, in which its off-diagonal
        coordinates are rounding noise that Adam's ``m̂ / (√v̂ + ε)`` blows up to ±1 (SOAP skips
        its first step for this)."""
        if "exp_avg" in state:  # parameter-shaped
            moments = [state[k].mT if self._transposed(p) else state[k] for k in ("exp_avg", "exp_avg_sq")]
            state["exp_avg"], state["exp_avg_sq"] = (m.contiguous() for m in moments)
        else:
            zeros = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)  # contiguous: grad may be a transpose
            state.update(step=torch.zeros((), dtype=torch.float32, device=grad.device), exp_avg=zeros,
                         exp_avg_sq=zeros.clone())
        state["q_g"] = _eye(grad.shape[0], grad)
        state["q_a"] = _eye(grad.shape[1], grad) if self._rotates_right(grad) else None

    def _refresh_basis(self, state: dict) -> None:
        """The factors' eigenbases, the moments carried into them; a failed eigendecomposition
        keeps the previous basis of that side. One call per parameter: the bases are refreshed
        rarely, and these are few parameters."""
        sides = [key for key in ("left", "right") if key in state]
        _, vectors, status = self.ops.eigen_decompose([state[key] for key in sides])
        new = dict(zip(("q_g", "q_a"), (state["q_g"], state["q_a"])))
        for key, q, code in zip(sides, vectors, status.tolist()):
            if code in (Status.OK, Status.OK_AFTER_FP64_RETRY):
                new["q_g" if key == "left" else "q_a"] = q
        carry_moments(state, new["q_g"], new["q_a"])


def _eye(n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def carry_moments(state: dict[str, Any], q_g: Tensor, q_a: Tensor | None) -> None:
    """Adam's moments ``state["exp_avg"]`` / ``["exp_avg_sq"]``, kept in the basis
    ``state["q_g"]``, ``state["q_a"]``, carried into the basis ``q_g``, ``q_a`` (which the state
    then records): ``m`` rotated exactly, ``v`` as the second moments of independent coordinates."""
    r_g = q_g.mT @ state["q_g"]  # old coordinates -> new
    r_a = None if q_a is None else state["q_a"].mT @ q_a
    state["exp_avg"] = _rotate(state["exp_avg"], r_g.mT, r_a)
    # v of independent coordinates: E[(R x)_i²] = Σ_j R_ij² v_j on each side
    state["exp_avg_sq"] = _rotate(state["exp_avg_sq"], (r_g * r_g).mT, None if r_a is None else r_a * r_a)
    state["q_a"], state["q_g"] = q_a, q_g


def _rotate(matrix: Tensor, q_g: Tensor, q_a: Tensor | None) -> Tensor:
    out = q_g.mT @ matrix
    return out @ q_a if q_a is not None else out
