"""KFAC and KFACPreconditioner end to end: the native backend against the pure-PyTorch reference,
schedules (callables of the step), ``torch.optim.lr_scheduler``, gradient accumulation,
checkpoint resume, the registration report, the "two added lines" usage with plain SGD, adaptive
damping, and a real-data comparison with SGD.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

from kfac_ext import KFAC, KFACPreconditioner

F64 = torch.float64


# ---- small models and data -----------------------------------------------------------------


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    """6 -> 9 -> 7 -> 4, one layer without bias."""
    return nn.Sequential(
        nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7, bias=False), nn.ReLU(), nn.Linear(7, 4)
    ).to(dtype)


def cnn(dtype: torch.dtype = torch.float32) -> nn.Module:
    """[N, 2, 6, 6] -> conv(pad 1) -> conv(stride 2, no bias) -> [N, 4, 2, 2] -> Linear -> 4."""
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(),
        nn.Conv2d(5, 4, 3, stride=2, bias=False), nn.Tanh(),
        nn.Flatten(), nn.Linear(16, 4),
    ).to(dtype)


ARCHS = {"mlp": (mlp, (6,)), "cnn": (cnn, (2, 6, 6))}


def batch(arch: str = "mlp", n: int = 16, dtype: torch.dtype = torch.float32):
    shape = ARCHS[arch][1]
    return torch.randn(n, *shape, dtype=dtype), torch.randint(0, 4, (n,))


def train_step(model: nn.Module, opt, x, y) -> float:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def updates(precond: KFACPreconditioner) -> list[torch.Tensor]:
    """``[∇W | ∇b]`` of every registered layer as ``.grad`` holds it now."""
    return [layer.grad_matrix() for layer in precond.layers]


# ---- native backend == reference backend ---------------------------------------------------

CONFIGS = [
    ("eigen", "tikhonov"),
    ("eigen", "pi"),
    ("eigen", "eigen"),
    ("cholesky", "tikhonov"),
    ("cholesky", "pi"),
]


def _kfac_run(init, data, dtype, backend, **kwargs):
    """Parameters after each KFAC step (momentum, inversions every other step) and the
    preconditioner, for a copy of ``init`` in ``dtype`` trained on ``data``."""
    model = copy.deepcopy(init).to(dtype)
    opt = KFAC(model, lr=0.1, momentum=0.9, loss="cross_entropy", damping=1e-2, inv_update_steps=2,
               factor_dtype=dtype, inv_dtype=dtype, backend=backend, **kwargs)
    history = []
    for x, y in data:
        train_step(model, opt, x.to(dtype), y)
        history.append(params(model))
    return history, opt.preconditioner


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("inversion,damping_mode", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_native_matches_reference(arch, inversion, damping_mode, dtype):
    """5 KFAC steps with each backend from the same init on the same data: parameters and
    factors agree. float64 runs use Monte Carlo targets (the same seeded samples in both) and
    agree to 1e-10. float32 runs use the deterministic type-2 Fisher (a sample could flip on a
    1-ulp difference of the probabilities); they agree to 1e-5 after the first step, and after
    5 steps, where training with small damping amplifies rounding (by ~100x with exact eigen
    damping), the native run is no further from a float64 run than 2x the reference's float32
    run (the STYLE.md rule for low precision).
    """
    make, _ = ARCHS[arch]
    init = make(torch.float32)
    data = [batch(arch) for _ in range(5)]
    kwargs = dict(inversion=inversion, damping_mode=damping_mode,
                  fisher_type="mc" if dtype == F64 else "type-2")
    native, pn = _kfac_run(init, data, dtype, "native", **kwargs)
    reference, pr = _kfac_run(init, data, dtype, "reference", **kwargs)
    assert pn.stats["factor_updates"] == pr.stats["factor_updates"] == 5
    assert pn.stats["inverse_updates"] == pr.stats["inverse_updates"] == 3
    assert all(a.dtype == g.dtype == dtype for a, g in pn.factors().values())
    names = [name for name, _ in init.named_parameters()]
    for name, p, p0 in zip(names, native[-1], init.parameters()):
        assert rel_err(p, p0) > 1e-3, f"{name} did not train"
    if dtype == F64:
        for name, p, q in zip(names, native[-1], reference[-1]):
            assert rel_err(p, q) <= 1e-10, f"{name}: native vs reference {rel_err(p, q):.2e}"
        for name, (a, g) in pn.factors().items():
            ra, rg = pr.factors()[name]
            assert rel_err(a, ra) <= 1e-10 and rel_err(g, rg) <= 1e-10, name
        return
    for name, p, q in zip(names, native[0], reference[0]):
        assert rel_err(p, q) <= 1e-5, f"{name} after one step: native vs reference {rel_err(p, q):.2e}"
    oracle, _ = _kfac_run(init, data, F64, "reference", **kwargs)
    for name, p, q, o in zip(names, native[-1], reference[-1], oracle[-1]):
        assert rel_err(p, o) <= 2 * rel_err(q, o) + 1e-6, (
            f"{name}: native {rel_err(p, o):.2e} vs reference {rel_err(q, o):.2e} from float64")


# ---- schedules -----------------------------------------------------------------------------


def _precond_run(steps: int, **kwargs):
    """Runs ``steps`` steps of KFACPreconditioner + SGD on an MLP, yielding after each step."""
    model = mlp()
    precond = KFACPreconditioner(model, loss="cross_entropy", **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        x, y = batch()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()
        yield precond, x
        opt.step()


@pytest.mark.parametrize(
    "period,expected",
    [
        (lambda s: 2, [1, 1, 2, 2, 3, 3, 4, 4]),  # factor steps 0, 2, 4, 6
        (lambda s: 1 if s < 3 else 3, [1, 2, 3, 4, 4, 4, 5, 5]),  # 0, 1, 2, 3, 6
    ],
    ids=["every-other", "changing"],
)
def test_factor_update_steps_schedule(period, expected):
    counts, changed = [], []
    previous = None
    for precond, _ in _precond_run(8, factor_update_steps=period, inv_update_steps=1):
        counts.append(precond.stats["factor_updates"])
        a = precond.factors()["0"][0].clone()
        changed.append(previous is None or not torch.equal(a, previous))
        previous = a
    assert counts == expected
    # The factors change exactly on the factor steps.
    assert changed == [True] + [expected[i] != expected[i - 1] for i in range(1, len(expected))]


@pytest.mark.parametrize("period", [3, lambda s: 3], ids=["int", "callable"])
def test_inv_update_steps_schedule(period):
    counts, changed = [], []
    previous = None
    for precond, _ in _precond_run(7, inv_update_steps=period):
        counts.append(precond.stats["inverse_updates"])
        q = precond._inv["0"][0][1].clone()  # (A side, G side); A side = (λ, Q): Q of A
        changed.append(previous is None or not torch.equal(q, previous))
        previous = q
    assert counts == [1, 1, 1, 2, 2, 2, 3]  # inversions at steps 0, 3, 6
    assert changed == [True, False, False, True, False, False, True]


def test_damping_schedule_is_used_at_each_step():
    """Cholesky + Tikhonov, inverses every step: ``.grad`` becomes
    ``(G + √γ_s I)⁻¹ ∇W̄ (A + √γ_s I)⁻¹`` with ``γ_s = damping(s)``."""
    gammas = [1e-1, 1e-2, 1e-3]
    for step, (precond, _) in enumerate(
        _precond_run(3, inversion="cholesky", damping=lambda s: gammas[s], inv_update_steps=1)
    ):
        root = math.sqrt(gammas[step])
        for layer, raw, update in zip(precond.layers, precond.last_raw_gradients, updates(precond)):
            a, g = (f.to(F64) for f in precond.factors()[layer.name])
            ga = g + root * torch.eye(len(g), dtype=F64)
            aa = a + root * torch.eye(len(a), dtype=F64)
            expected = torch.linalg.solve(ga, raw.to(F64)) @ torch.linalg.inv(aa)
            assert rel_err(update, expected) < 1e-4, (step, layer.name)


def test_factor_decay_schedule():
    """A of the first layer (input features only): ``A_s = ρ_s A_{s-1} + (1-ρ_s) X̄ᵀX̄/N``
    with ``ρ_s = factor_decay(s)``; the first update initialises (ρ ignored)."""
    decays = [0.3, 0.5, 0.9, 0.0]
    expected = None
    for step, (precond, x) in enumerate(_precond_run(4, factor_decay=lambda s: decays[s])):
        xbar = torch.cat([x, torch.ones(len(x), 1)], 1).to(F64)
        fresh = xbar.T @ xbar / len(x)
        rho = 0.0 if step == 0 else decays[step]
        expected = fresh if expected is None else rho * expected + (1 - rho) * fresh
        assert rel_err(precond.factors()["0"][0], expected) < 1e-6, step


def test_lr_callable_sets_param_groups_and_step_size():
    model = mlp()
    lrs = [0.2 / (1 + s) for s in range(4)]
    opt = KFAC(model, lr=lambda s: lrs[s], momentum=0.0, loss="cross_entropy")
    for step in range(4):
        x, y = batch()
        before = params(model)
        train_step(model, opt, x, y)
        assert opt.param_groups[0]["lr"] == pytest.approx(lrs[step])
        for p0, p in zip(before, model.parameters()):  # plain SGD on the rewritten .grad
            torch.testing.assert_close(p, p0.add(p.grad, alpha=-lrs[step]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kl_clip", [1e-6, lambda s: 1e-6], ids=["float", "callable"])
def test_kl_clip_rescales_the_update(kl_clip):
    """A small ``kl_clip`` shrinks the K-FAC direction v by ν < 1 so that
    ``lr² ν² Σ⟨v, ∇⟩ = kl_clip``; a twin run without clipping gets v itself, and each run steps
    by ``lr`` times its direction."""
    init, (x, y), lr = mlp(), batch(), 0.1
    directions, models, opts = {}, {}, {}
    for clip in (kl_clip, None):
        model = copy.deepcopy(init)
        opt = KFAC(model, lr=lr, momentum=0.0, loss="cross_entropy", fisher_type="type-2", kl_clip=clip)
        train_step(model, opt, x, y)
        directions[clip] = [p.grad.clone() for p in model.parameters()]
        models[clip], opts[clip] = model, opt
    precond = opts[kl_clip].preconditioner
    nu = precond.stats["kl_clip_scale"]
    assert 0 < nu < 0.5
    assert opts[None].preconditioner.stats["kl_clip_scale"] == 1.0
    for clipped, full in zip(directions[kl_clip], directions[None]):
        assert rel_err(clipped, nu * full) < 1e-6
    for clip in (kl_clip, None):
        for p0, p in zip(init.parameters(), models[clip].parameters()):
            torch.testing.assert_close(p, p0.add(p.grad, alpha=-lr), rtol=1e-6, atol=1e-7)
    vg = sum(float((u.double() * g.double()).sum()) for u, g in zip(updates(precond), precond.last_raw_gradients))
    assert lr**2 * nu * vg == pytest.approx(1e-6, rel=1e-4)  # lr² Σ⟨νv, ∇⟩ ν


def test_kl_clip_large_does_not_clip():
    model = mlp()
    opt = KFAC(model, lr=0.1, loss="cross_entropy", kl_clip=1e6)
    train_step(model, opt, *batch())
    assert opt.preconditioner.stats["kl_clip_scale"] == 1.0


def test_step_lr_scheduler():
    """StepLR halves the lr every 2 steps: param_groups follow, the step is ``lr · .grad``, and
    the preconditioner's KL clipping uses the scheduled lr."""
    model = mlp()
    kl_clip = 1e-7
    opt = KFAC(model, lr=0.2, momentum=0.0, loss="cross_entropy", kl_clip=kl_clip)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    precond = opt.preconditioner
    for step, lr in enumerate([0.2, 0.2, 0.1, 0.1, 0.05, 0.05]):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        x, y = batch()
        before = params(model)
        train_step(model, opt, x, y)
        scheduler.step()
        for p0, p in zip(before, model.parameters()):
            torch.testing.assert_close(p, p0.add(p.grad, alpha=-lr), rtol=1e-6, atol=1e-7)
        nu = precond.stats["kl_clip_scale"]
        assert nu < 1, step
        vg = sum(float((u.double() * g.double()).sum()) for u, g in zip(updates(precond), precond.last_raw_gradients))
        assert lr**2 * nu * vg == pytest.approx(kl_clip, rel=1e-4), step


# ---- gradient accumulation -----------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_grad_accumulation_matches_concatenated_batch(arch, fisher_type):
    """Two micro-batches (loss / 2 each, one step()) == one step on the concatenated batch:
    same factors and same preconditioned gradients, over two steps (EMA included)."""
    make, _ = ARCHS[arch]
    init = make(F64)
    runs = {}
    data = [batch(arch, n=12, dtype=F64) for _ in range(2)]
    for k in (1, 2):
        model = copy.deepcopy(init)
        precond = KFACPreconditioner(model, loss="cross_entropy", fisher_type=fisher_type,
                                     grad_accumulation_steps=k, factor_dtype=F64, inv_dtype=F64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in data:
            opt.zero_grad()
            for xm, ym in zip(x.chunk(k), y.chunk(k)):
                (F.cross_entropy(model(xm), ym) / k).backward()
            precond.step()
            opt.step()
        runs[k] = (model, precond)
    (m1, p1), (m2, p2) = runs[1], runs[2]
    assert p2.stats["factor_updates"] == 2
    for name, (a1, g1) in p1.factors().items():
        a2, g2 = p2.factors()[name]
        assert rel_err(a2, a1) < 1e-12, name
        assert rel_err(g2, g1) < 1e-12, name
    for u1, u2 in zip(updates(p1), updates(p2)):
        assert rel_err(u2, u1) < 1e-10
    for q1, q2 in zip(m1.parameters(), m2.parameters()):
        assert rel_err(q2, q1) < 1e-12


# ---- checkpoints ---------------------------------------------------------------------------


def _kfac_for_resume(model: nn.Module, seed: int, inversion: str) -> KFAC:
    return KFAC(model, lr=0.05, momentum=0.9, loss="cross_entropy", fisher_type="mc",
                inversion=inversion, damping=1e-2, inv_update_steps=2, seed=seed)


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("inversion", ["eigen", "cholesky"])
def test_checkpoint_resume_is_bit_identical(inversion):
    """6 steps straight == 3 steps, save, FRESH model and optimizer (other init, other MC seed:
    the generator state must come from the checkpoint), load, 3 steps. Step 3 is not an
    inversion step, so the restored inverses are used as they are."""
    init = mlp()
    data = [batch() for _ in range(6)]

    straight = copy.deepcopy(init)
    opt = _kfac_for_resume(straight, seed=1, inversion=inversion)
    for x, y in data:
        train_step(straight, opt, x, y)

    first = copy.deepcopy(init)
    opt = _kfac_for_resume(first, seed=1, inversion=inversion)
    for x, y in data[:3]:
        train_step(first, opt, x, y)
    model_state, opt_state = _roundtrip(first.state_dict()), _roundtrip(opt.state_dict())
    del first, opt

    resumed = mlp()
    assert not torch.equal(resumed[0].weight, init[0].weight)
    opt = _kfac_for_resume(resumed, seed=12345, inversion=inversion)
    resumed.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    assert opt.preconditioner.steps == 3
    for x, y in data[3:]:
        train_step(resumed, opt, x, y)

    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert opt.preconditioner.stats["inverse_updates"] == 3  # steps 0, 2, 4


# ---- registration report -------------------------------------------------------------------


class Mixed(nn.Module):
    """Modules of every kind; only ``conv`` and ``head`` are preconditioned."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)
        self.conv = nn.Conv2d(4, 8, 3)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.weight.requires_grad_(False)
        self.skipped = nn.Linear(3, 3)
        self.act = nn.ReLU()  # no parameters: not listed at all


def test_registration_report(capsys):
    precond = KFACPreconditioner(Mixed(), loss="cross_entropy", skip_layers=("skipped",))
    print(precond)
    text = capsys.readouterr().out
    assert text.strip() == precond.registration_report().strip()
    assert "preconditioned layers:" in text
    registered, _, left = text.partition("left to the base optimizer:")
    registered_lines = [l.strip() for l in registered.splitlines()]
    left_lines = [l.strip() for l in left.splitlines() if l.strip()]

    assert [l.name for l in precond.layers] == ["conv", "head"]
    assert "conv: Conv2d, A 37x37, G 8x8" in registered_lines  # 4·3·3 + 1 bias
    assert "head: Linear, A 9x9, G 3x3" in registered_lines

    reasons = {"embed": "Embedding", "grouped": "groups=2", "norm": "BatchNorm1d",
               "frozen": "frozen", "skipped": "skip_layers"}
    assert len(left_lines) == len(reasons)
    for name, reason in reasons.items():
        line = next((l for l in left_lines if l.startswith(f"{name}:")), None)
        assert line is not None, f"{name} missing from the report:\n{text}"
        assert reason in line, line
        assert not any(l.startswith(f"{name}:") for l in registered_lines)
    assert "act" not in text


def test_unsupported_modules_get_plain_sgd():
    """BatchNorm1d parameters step by ``lr · ∇`` untouched; the Linear gradients are rewritten."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4))
    opt = KFAC(model, lr=0.1, momentum=0.0, loss="cross_entropy")
    assert [name for name, _ in opt.preconditioner.unregistered] == ["1"]
    x, y = batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    bn_grads = [p.grad.clone() for p in model[1].parameters()]
    linear_grad = model[0].weight.grad.clone()
    before = params(model)
    opt.step()
    for p0, p, g in zip(before[2:4], model[1].parameters(), bn_grads):
        assert torch.equal(p.grad, g)
        torch.testing.assert_close(p, p0.add(g, alpha=-0.1), rtol=1e-6, atol=1e-7)
    assert rel_err(model[0].weight.grad, linear_grad) > 1e-2


# ---- the "two added lines" usage -----------------------------------------------------------


def test_preconditioner_with_plain_sgd_reduces_loss():
    torch.manual_seed(0)
    teacher = torch.randn(6, 4)
    x = torch.randn(128, 6)
    y = (x @ teacher).argmax(1)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = KFACPreconditioner(model, loss="cross_entropy", damping=1e-2, inv_update_steps=5)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert precond.step()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(l) for l in losses)
    assert losses[-1] < 0.3 * losses[0], losses
    # .grad was rewritten with the K-FAC direction (not the raw gradient).
    assert rel_err(updates(precond)[0], precond.last_raw_gradients[0]) > 1e-2
    assert precond.stats["factor_updates"] == 30 and precond.stats["inverse_updates"] == 6


# ---- adaptive damping ----------------------------------------------------------------------


def test_adaptive_damping_with_closure():
    """Every step: ρ = (L(θ+δ) − L(θ)) / M(δ), M(δ) = ∇ᵀδ + ½ δᵀ(G⊗A + γI)δ (recomputed here),
    and γ ← γω if ρ > 3/4, γ/ω if ρ < 1/4 (ω = 19/20)."""
    torch.manual_seed(0)
    model = mlp()
    x, y = batch(n=64)
    gamma0 = 1e-2
    opt = KFAC(model, lr=0.1, momentum=0.0, loss="cross_entropy", fisher_type="type-2",
               damping=gamma0, adaptive_damping=True, adaptive_damping_interval=1, inv_update_steps=1)
    precond = opt.preconditioner

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    seen = []
    for step in range(4):
        gamma, before = precond.damping, params(model)
        loss_before = float(opt.step(closure).detach())
        with torch.no_grad():
            loss_after = F.cross_entropy(model(x), y).item()
        deltas = [p.detach() - p0 for p, p0 in zip(model.parameters(), before)]
        # The quadratic model from the factors, in dense row-major form vec(G δW̄ A).
        quad = gamma * sum(float((d.double() ** 2).sum()) for d in deltas)
        linear = 0.0
        for layer, raw in zip(precond.layers, precond.last_raw_gradients):
            dw = layer.module.weight.detach() - before[_param_index(model, layer.module.weight)]
            if layer.has_bias:
                db = layer.module.bias.detach() - before[_param_index(model, layer.module.bias)]
                dw = torch.cat([dw, db[:, None]], 1)
            dw = dw.double()
            a, g = (f.double() for f in precond.factors()[layer.name])
            quad += float((dw * (g @ dw @ a)).sum())
            linear += float((raw.double() * dw).sum())
        rho = (loss_after - loss_before) / (linear + 0.5 * quad)
        assert precond.stats["reduction_ratio"] == pytest.approx(rho, rel=1e-3, abs=1e-3), step
        omega = 19 / 20
        expected = gamma * omega if rho > 0.75 else gamma / omega if rho < 0.25 else gamma
        assert precond.damping == pytest.approx(expected), step
        seen.append(precond.damping)
    assert loss_after < loss_before
    assert any(d != gamma0 for d in seen)


def _param_index(model: nn.Module, param: torch.Tensor) -> int:
    return next(i for i, p in enumerate(model.parameters()) if p is param)


def test_adaptive_damping_needs_closure():
    model = mlp()
    opt = KFAC(model, lr=0.1, loss="cross_entropy", adaptive_damping=True)
    x, y = batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = params(model)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    assert all(torch.equal(p0, p) for p0, p in zip(before, model.parameters()))


def test_adaptive_damping_rejects_a_damping_schedule():
    with pytest.raises(ValueError, match="damping"):
        KFAC(mlp(), loss="cross_entropy", adaptive_damping=True, damping=lambda s: 1e-2)


# ---- real data: scikit-learn digits --------------------------------------------------------


def test_digits_kfac_beats_sgd():
    """MLP 64-64-10 (tanh) on the 1797 standardised 8x8 digits, full batch, 20 steps from the
    same init. SGD (momentum 0.9) gets the best lr of the grid below, run here; on this problem
    its loss keeps falling with lr up to ~5 (at 8 it oscillates). For reference, the grid we
    tried with 20 steps: lr 0.3 → 0.087, 1 → 0.017, 2 → 3.1e-3, 3 → 1.0e-3, 5 → 6.2e-4,
    8 → 2.8e-2. KFAC (momentum 0.9, lr 0.3, damping 3e-3, inverses every 5 steps; tried
    lr in {0.1, 0.2, 0.3, 0.5} x damping in {3e-3, 1e-2, 3e-2}) reaches ~4e-5.
    """
    datasets = pytest.importorskip("sklearn.datasets")
    x_np, y_np = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x_np, dtype=torch.float32)
    y = torch.tensor(y_np)
    std = x.std(0)
    x = (x - x.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))

    torch.manual_seed(0)
    init = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))

    def final_loss(make_opt) -> float:
        model = copy.deepcopy(init)
        opt = make_opt(model)
        for _ in range(20):
            train_step(model, opt, x, y)
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()

    sgd = min(final_loss(lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9))
              for lr in (1.0, 3.0, 5.0))
    kfac = final_loss(lambda m: KFAC(m, lr=0.3, momentum=0.9, loss="cross_entropy",
                                     damping=3e-3, inv_update_steps=5))
    assert math.isfinite(kfac)
    assert kfac < 0.25 * sgd, (kfac, sgd)
