"""A compact pure-PyTorch K-FAC built the way the established hook-based implementations build it
(KAISA / kfac-pytorch, the K-FAC of the PyTorch tutorials): each ``nn.Linear``'s factors are
reduced inside its own hooks as they fire (``ā āᵀ`` in the forward hook, ``g gᵀ`` in a
tensor hook on its output), so no activation or gradient rows are kept; every ``inv_update_steps`` the
factors are eigendecomposed; the gradient is preconditioned in the eigenbasis and handed to the
user's optimizer. Empirical Fisher (the loss's own output gradients) or, with ``fisher="mc"``,
the Monte Carlo Fisher: :meth:`sampled_backward` runs a backward of the loss on labels sampled
from the model's own predictions (``torch.autograd.grad`` to the weights, graph retained for the
training backward, no ``.grad`` written), and only that backward's output gradients enter G.
Tikhonov damping on the Kronecker eigenvalues, a running average of the factors.

The baseline of the memory benchmark (``bench_memory.py``): what a careful user writes without
native ops. Not part of the package; the tests' references live in ``kfac_ext.reference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class HookKFAC:
    def __init__(self, model: nn.Module, *, damping: float = 1e-3, factor_decay: float = 0.95,
                 inv_update_steps: int = 10, fisher: str = "empirical"):
        self.damping, self.decay, self.inv_update_steps = damping, factor_decay, inv_update_steps
        self.fisher, self._sampling = fisher, False
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.factors: dict[nn.Linear, list[Tensor | None]] = {m: [None, None] for m in self.layers}
        self.eigen: dict[nn.Linear, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self.steps = 0
        for m in self.layers:
            m.register_forward_pre_hook(self._save_a)
            m.register_forward_hook(self._hook_output)

    def _running_average(self, m: nn.Linear, which: int, new: Tensor) -> None:
        old = self.factors[m][which]
        self.factors[m][which] = new if old is None else old.mul_(self.decay).add_(new, alpha=1 - self.decay)

    def _save_a(self, m: nn.Linear, inputs) -> None:
        if m.training and torch.is_grad_enabled():
            with torch.no_grad():
                self._reduce_a(m, inputs[0])

    def _reduce_a(self, m: nn.Linear, x: Tensor) -> None:
        a = x.reshape(-1, m.in_features).float()
        if m.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        self._running_average(m, 0, a.T @ a / a.shape[0])

    def _hook_output(self, m: nn.Linear, inputs, output: Tensor) -> None:
        # a tensor hook, not a module backward hook: the latter skips the first layer (no input
        # gradient) in some torch versions
        if m.training and output.requires_grad:
            output.register_hook(lambda grad: self._save_g(m, grad))

    @torch.no_grad()
    def _save_g(self, m: nn.Linear, grad: Tensor) -> None:
        if (self.fisher == "mc") != self._sampling:  # mc: only the sampled backward's gradients
            return
        g = grad.reshape(-1, m.out_features).float()
        batch = grad.shape[0]  # G = (1/B) Σ (B g)(B g)ᵀ: the loss's mean over the batch undone
        self._running_average(m, 1, (g.T @ g) * batch)

    def sampled_backward(self, logits: Tensor) -> None:
        """``fisher="mc"``: before the training backward, a backward of the cross-entropy on labels
        drawn from ``softmax(logits)``, which feeds G; the graph is kept for the training backward."""
        with torch.no_grad():
            probs = logits.detach().float().softmax(-1).reshape(-1, logits.shape[-1])
            labels = torch.multinomial(probs, 1).view(logits.shape[:-1])
        self._sampling = True
        try:
            torch.autograd.grad(F.cross_entropy(logits, labels), [m.weight for m in self.layers], retain_graph=True)
        finally:
            self._sampling = False

    @torch.no_grad()
    def step(self) -> None:
        """Replaces every layer's ``[∇W | ∇b]`` by ``Q_G ((Q_Gᵀ ∇ Q_A) / (λ_G λ_Aᵀ + γ)) Q_Aᵀ``."""
        if self.steps % self.inv_update_steps == 0:
            for m in self.layers:
                (la, qa), (lg, qg) = (torch.linalg.eigh(f) for f in self.factors[m])
                self.eigen[m] = (la.clamp_min_(0), qa, lg.clamp_min_(0), qg)
        self.steps += 1
        for m in self.layers:
            la, qa, lg, qg = self.eigen[m]
            grad = m.weight.grad if m.bias is None else torch.cat([m.weight.grad, m.bias.grad[:, None]], dim=1)
            rotated = qg.T @ grad.float() @ qa
            rotated /= lg[:, None] * la[None, :] + self.damping
            update = qg @ rotated @ qa.T
            m.weight.grad.copy_(update[:, : m.in_features])
            if m.bias is not None:
                m.bias.grad.copy_(update[:, -1])
