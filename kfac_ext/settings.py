"""The preconditioner's settings checked at construction: one clear ``ValueError`` naming the
argument for every unsupported choice or combination."""

from __future__ import annotations

import torch

from .capture import FISHER_TYPES
from .layers import KFAC_APPROXIMATIONS
from .losses import Loss, make_loss

INVERSIONS = ("eigen", "cholesky")
DAMPING_MODES = ("tikhonov", "pi", "eigen")
DEFAULT_KL_CLIP = 1e-3


def validate(fisher_type, kfac_approx, inversion, damping_mode, backend, factor_dtype, inv_dtype, mc_samples,
              grad_accumulation_steps, factor_rows=None, inv_update_steps=None) -> None:
    check_choice("fisher_type", fisher_type, FISHER_TYPES)
    check_choice("kfac_approx", kfac_approx, KFAC_APPROXIMATIONS)
    check_choice("inversion", inversion, INVERSIONS)
    check_choice("damping_mode", damping_mode, DAMPING_MODES)
    check_choice("backend", backend, ("native", "reference"))
    if damping_mode == "eigen" and inversion != "eigen":
        raise ValueError("damping_mode='eigen' (exact λ_G λ_Aᵀ + γ) needs inversion='eigen'")
    for name, dtype in (("factor_dtype", factor_dtype), ("inv_dtype", inv_dtype)):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name} must be torch.float32 or torch.float64, got {dtype}")
    if mc_samples < 1 or grad_accumulation_steps < 1:
        raise ValueError("mc_samples and grad_accumulation_steps must be >= 1")
    if factor_rows not in (None, "auto") and (not isinstance(factor_rows, int) or factor_rows < 1):
        raise ValueError(f"factor_rows must be None, 'auto' or an int >= 1, got {factor_rows!r}")
    if isinstance(inv_update_steps, str) and inv_update_steps != "auto":
        raise ValueError(f"inv_update_steps must be a number, a callable of the step or 'auto', "
                         f"got {inv_update_steps!r}")


def make_checked_loss(loss, reduction: str, fisher_type: str) -> Loss | None:
    made = make_loss(loss, reduction)
    if made is None and fisher_type != "empirical":
        raise ValueError(
            f"fisher_type={fisher_type!r} samples targets from the model's predictive "
            "distribution and needs loss='cross_entropy', 'mse' or 'bce_with_logits'; "
            "use fisher_type='empirical' for other losses"
        )
    return made


def resolve_kl_clip(kl_clip, lr):
    if kl_clip == "auto":
        kl_clip = DEFAULT_KL_CLIP if lr is not None else None
    if kl_clip is not None and lr is None:
        raise ValueError("kl_clip needs lr (a number or a callable of the step)")
    return kl_clip


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
