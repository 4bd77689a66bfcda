"""Mixed precision with a GradScaler (forced overflows) and checkpoints across devices.

Recipe pinned here (and in the README): ``scaler.scale(loss).backward()``, then either
``scaler.step(KFAC)`` (it unscales, then calls ``KFAC.step`` unless it found an inf) or, with a
preconditioner in front of another optimizer, ``scaler.unscale_(opt)``, ``precond.step()``,
``scaler.step(opt)``; then ``scaler.update()``.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import cpu_generators, requires_cuda
from kfac_ext import KFAC, KFACPreconditioner
from kfac_ext.inverse import tensors

pytestmark = pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler needs torch >= 2.3")
F64 = torch.float64


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)


def overflow(model: nn.Module) -> None:
    model[2].weight.grad[0, 0] = float("inf")


def test_overflow_with_a_preconditioner_is_left_to_the_scaler():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    precond = KFACPreconditioner(model, "cross_entropy", grad_scaler=scaler, factor_dtype=F64)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    overflow(model)
    scaler.unscale_(opt)
    assert not precond.step()
    assert torch.isinf(model[2].weight.grad[0, 0])  # not zeroed: the scaler must see it
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**7  # it backed off
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert precond.stats["nonfinite_grad_steps"] == 1
    assert precond.stats["factor_updates"] == 1 and precond.factors()  # the statistics were finite


def factors_after(model, data, overflow_at=None, scaler=None):
    """KFAC (type-2, float64, no EMA) through ``scaler.step`` over ``data``; the step at
    ``overflow_at`` gets an inf gradient, so the scaler skips ``KFAC.step`` altogether."""
    opt = KFAC(model, update="sgd", lr=0.1, loss="cross_entropy", fisher_type="type-2", factor_decay=0.0,
               factor_dtype=F64, inv_dtype=F64, grad_scaler=scaler)
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if i == overflow_at:
            overflow(model)
        scaler.step(opt)
        scaler.update()
    return opt.preconditioner


def test_a_step_the_scaler_skipped_goes_into_the_next_steps_factors():
    """The statistics of a step the scaler skipped (its KFAC.step never ran) are finite: they go
    into the next step's factors as one more micro-batch. After [good, overflow, good] with no
    EMA the factors are those of one step on the last two batches together, both seen at the
    same weights (the overflow moved none)."""
    data = [batch(0), batch(1), batch(2)]
    model = mlp()
    skipped = factors_after(model, data, overflow_at=1, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    assert skipped.stats["factor_updates"] == 2 and skipped.stats["skipped_factor_updates"] == 0

    both = tuple(torch.cat(parts) for parts in zip(data[1], data[2]))
    control = factors_after(mlp(), [data[0], both], scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    for name, (a, g) in control.factors().items():
        torch.testing.assert_close(skipped.factors()[name][0], a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(skipped.factors()[name][1], g, rtol=1e-12, atol=1e-14)


# ---- checkpoints ------------------------------------------------------------------------------


def trained(steps: int = 2):
    model = mlp()
    opt = KFAC(model, update="sgd", lr=0.1, loss="cross_entropy", inv_update_steps=1)
    for i in range(steps):
        x, y = batch(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def test_checkpoint_loaded_with_map_location_lands_on_the_blocks_devices():
    model, opt = trained()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu", weights_only=False)

    fresh_model = copy.deepcopy(model)
    fresh = KFAC(fresh_model, update="sgd", lr=0.1, loss="cross_entropy", inv_update_steps=1)
    fresh.load_state_dict(state)
    precond = fresh.preconditioner
    for block in precond.blocks:
        a, g = precond.factors()[block.name]
        assert a.device == g.device == block.device
        assert all(t.device == block.device for side in precond.inverses.records[block.name] for t in tensors(side))
        # copies, not views of the checkpoint: later updates cannot write into it
        assert a.data_ptr() != state["kfac"]["factors"][block.name][0].data_ptr()
    assert precond.steps == 2


def test_load_state_dict_moves_every_tensor_to_the_blocks_device():
    """load_state_dict copies every factor and inverse to the device of the blocks: a checkpoint
    saved on the CPU, loaded for a model on the meta device (a second device every machine has;
    test_cpu_checkpoint_resumes_on_cuda does the same for a GPU)."""
    _, opt = trained()
    state = opt.state_dict()
    meta = mlp().to("meta")
    with cpu_generators():
        fresh = KFAC(meta, update="sgd", lr=0.1, loss="cross_entropy", inv_update_steps=1)
    fresh.load_state_dict(state)
    precond = fresh.preconditioner
    assert precond.factors().keys() == {"0", "2"}
    inverses = precond.state_dict()["inverses"]
    for block in precond.blocks:
        a, g = precond.factors()[block.name]
        assert a.device.type == g.device.type == "meta"
        held = [t for side in inverses[block.name] for t in side if t is not None]
        assert held and all(t.device.type == "meta" for t in held)
    assert all(s["momentum_buffer"].device.type == "meta" for s in fresh.state.values())


@pytest.mark.cuda
@requires_cuda
def test_cpu_checkpoint_resumes_on_cuda():
    """A checkpoint saved on the CPU resumes on a GPU: factors and inverses land on the blocks'
    device, the Monte Carlo stream restarts (a CPU generator state does not fit a CUDA generator),
    and the next steps train."""
    model, opt = trained()
    state = copy.deepcopy(opt.state_dict())
    gpu_model = copy.deepcopy(model).cuda()
    fresh = KFAC(gpu_model, update="sgd", lr=0.1, loss="cross_entropy", inv_update_steps=1)
    with pytest.warns(RuntimeWarning, match="another device type"):
        fresh.load_state_dict(state)
    precond = fresh.preconditioner
    inverses = precond.state_dict()["inverses"]
    for block in precond.blocks:
        assert all(f.device == block.device for f in precond.factors()[block.name])
        assert all(t.device == block.device for side in inverses[block.name] for t in side if t is not None)
    for i in range(2, 4):
        x, y = batch(i)
        fresh.zero_grad()
        F.cross_entropy(gpu_model(x.cuda()), y.cuda()).backward()
        fresh.step()
    assert precond.steps == 4 and precond.stats["factor_updates"] == 4
    assert all(torch.isfinite(p).all() for p in gpu_model.parameters())


def test_a_copied_model_runs_unobserved():
    """``copy.deepcopy`` of a model with a preconditioner attached works, and the copy's
    forwards are not captured by (nor attached to) the original's preconditioner."""
    model, opt = trained(0)
    twin = copy.deepcopy(model)
    x, y = batch(5)
    F.cross_entropy(twin(x), y).backward()
    assert opt.preconditioner.capture.pending_a == {}
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


def test_generator_state_of_another_device_restarts_the_stream_with_a_warning():
    """A CUDA generator's state (16 bytes) cannot be loaded into a CPU generator (and vice
    versa): the Monte Carlo stream restarts from a seed derived from the saved state."""
    _, opt = trained()
    state = opt.state_dict()
    state["kfac"]["generator"] = torch.arange(16, dtype=torch.uint8)  # the shape of a CUDA state
    draws = []
    for _ in range(2):
        _, other = trained(0)
        with pytest.warns(RuntimeWarning, match="another device type"):
            other.load_state_dict(copy.deepcopy(state))
        draws.append(torch.rand(4, generator=other.preconditioner.generator))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)  # deterministic
