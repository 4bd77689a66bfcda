"""Shampoo-style grafting with K-FAC's direction: candidate (c) of the update rules, measured by
``bench/time_to_target.py --optimizers "AdamW,K-FAC graft"`` (bench/RESULTS.md). Every parameter
of a K-FAC block moves along the K-FAC direction with the length of the step Adam would take for
that parameter (Adam run on the raw gradients: ``p -= lr · ‖a‖/‖d‖ · d``); every other parameter
by Adam. A benchmark candidate, not one of the library's rules: measured 2026-12-05 (steps /
time to target vs tuned AdamW) it never reached the char transformer's target at any lr of the
grid, took 0.96× / 1.23× on the GPT-2 config (eigen-adam: 0.50× / 0.69×), 0.36× / 0.75× on the
convnet (``update="adamw"``: 0.24× / 0.59×) and 0.17× / 0.77× on the autoencoder (eigen-adam
0.21× / 0.90× in its own run: a tie within this machine's run-to-run spread). It wins nowhere
clearly, so it is kept here, where it is measured, only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import kfac_ext
from kfac_ext.util import doubling


class GraftedKFAC(torch.optim.Optimizer):
    """K-FAC direction (Monte Carlo factors at doubling(10), inverses at doubling(100), as the
    ``"adamw"`` rule uses) grafted onto Adam's per-parameter step length; no weight decay."""

    def __init__(self, model: nn.Module, lr: float, loss: str, betas=(0.9, 0.999), eps: float = 1e-8):
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.preconditioner = kfac_ext.KFACPreconditioner(model, loss, kl_clip=None, factor_update_steps=doubling(10),
                                                          inv_update_steps=doubling(100))
        self.in_blocks = {id(p) for b in self.preconditioner.blocks for p in b.params()}

    def _adam_direction(self, p: Tensor, grad: Tensor) -> Tensor:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
        state["step"] += 1
        state["m"].lerp_(grad, 1 - beta1)
        state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        return (state["m"] / (1 - beta1 ** state["step"])) / (
            (state["v"] / (1 - beta2 ** state["step"])).sqrt() + group["eps"])

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for p in self.param_groups[0]["params"] if p.grad is not None]
        raw = {id(p): p.grad.clone() for p in params if id(p) in self.in_blocks}
        self.preconditioner.step()  # block gradients now hold the K-FAC direction
        lr = self.param_groups[0]["lr"]
        for p in params:
            adam = self._adam_direction(p, raw.get(id(p), p.grad))
            if id(p) in self.in_blocks:
                length = torch.linalg.vector_norm(adam) / torch.linalg.vector_norm(p.grad).clamp_min(1e-30)
                p.add_(p.grad * length, alpha=-lr)
            else:
                p.add_(adam, alpha=-lr)
