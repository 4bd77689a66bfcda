"""Fault injection for KFACPreconditioner / KFAC: non-finite activations and gradients, factors
that cannot be inverted, models that change or misbehave, misuse that must raise a clear error,
GradScaler and bf16 autocast.
"""

from __future__ import annotations

import copy
import warnings

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

from kfac_ext import KFAC, KFACPreconditioner
from kfac_ext.inverse import tensors
from kfac_ext.util import OWN_PASS_ELEMENTS, all_finite, flush_denormals


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def batch(n: int = 16):
    return torch.randn(n, 6), torch.randint(0, 4, (n,))


def train_step(model, opt, x, y) -> torch.Tensor:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def snapshot(precond: KFACPreconditioner):
    """Deep copies of the factors and inverses."""
    factors = {k: (a.clone(), g.clone()) for k, (a, g) in precond.factors().items()}
    inverses = {k: tuple(tuple(t.clone() for t in tensors(side)) for side in v) for k, v in precond.inverses.records.items()}
    return factors, inverses


def assert_same(left, right) -> None:
    """``torch.equal`` on nested dicts / tuples of tensors."""
    if isinstance(left, torch.Tensor):
        assert torch.equal(left, right)
    elif isinstance(left, dict):
        assert left.keys() == right.keys()
        for k in left:
            assert_same(left[k], right[k])
    else:
        assert len(left) == len(right)
        for a, b in zip(left, right):
            assert_same(a, b)


def kfac_messages(record) -> list[str]:
    return [str(w.message) for w in record if "KFACPreconditioner" in str(w.message)]


# ---- the finiteness flag -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [7, OWN_PASS_ELEMENTS + 3], ids=["small", "large"])
def test_all_finite_is_exact(dtype, numel):
    """Finite however large the values (their squares overflow the dtype: no false alarm that
    would skip every step), and not finite with one NaN, +inf or -inf anywhere, whichever of the
    two passes (one norm call for small tensors, min / max for large ones) checks the tensor."""
    huge = torch.finfo(dtype).max
    tensors = [torch.full((numel,), huge, dtype=dtype), torch.full((3, 5), -huge, dtype=dtype).t(),
               torch.zeros(0, dtype=dtype), torch.randn(numel).to(dtype)]
    assert bool(all_finite(tensors))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for which in (0, 1, 3):
            broken = [t.clone() for t in tensors]
            broken[which][-1, ...] = bad
            assert not bool(all_finite(broken)), (bad, which)
    assert bool(all_finite([torch.zeros(0, dtype=dtype)]))


# ---- non-finite activations ----------------------------------------------------------------


class InjectInf:
    """A forward pre-hook that puts +inf into one input element of a layer, once."""

    def __init__(self):
        self.armed = False

    def __call__(self, module, inputs):
        if self.armed:
            self.armed = False
            x = inputs[0].clone()
            x[0, 0] = float("inf")
            return (x,)
        return None


@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical"])
@pytest.mark.parametrize("fault", ["nan-input", "inf-hook"])
def test_nonfinite_activations_skip_the_factor_update(fisher_type, fault):
    """A step whose activations hold NaN/inf: the factor update is skipped, factors and inverses
    are kept, the (non-finite) step changes no parameter, and training goes on afterwards."""
    model = mlp()
    hook = InjectInf()
    model[2].register_forward_pre_hook(hook)
    opt = KFAC(model, update="sgd", lr=0.1, momentum=0.9, loss="cross_entropy", fisher_type=fisher_type, inv_update_steps=1)
    precond = opt.preconditioner
    train_step(model, opt, *batch())
    factors, inverses = snapshot(precond)
    params = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    x, y = batch()
    if fault == "nan-input":
        x[3, 2] = float("nan")
    else:
        hook.armed = True
    train_step(model, opt, x, y)

    assert precond.stats["skipped_factor_updates"] == 1
    assert precond.stats["factor_updates"] == 1
    assert precond.stats["nonfinite_grad_steps"] == 1
    assert_same(snapshot(precond), (factors, inverses))
    for p0, p in zip(params, model.parameters()):
        assert torch.equal(p, p0)
    for m0, p in zip(momentum, model.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], m0)

    for _ in range(2):
        train_step(model, opt, *batch())
    assert precond.stats["factor_updates"] == 3
    assert precond.stats["skipped_factor_updates"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not any(torch.equal(p, p0) for p0, p in zip(params, model.parameters()))


@pytest.mark.parametrize("factor_decay", [0.95, 0.0])
def test_folded_nonfinite_statistics_leave_the_factors_bit_for_bit(factor_decay):
    """Under gradient accumulation (the statistics go into the factors as they come), a step
    whose every micro-batch has a NaN input leaves the factors exactly as they were, also with
    no moving average (factor_decay=0, where a fed step replaces them)."""
    model = mlp()
    precond = KFACPreconditioner(model, loss="cross_entropy", fisher_type="type-2", factor_decay=factor_decay,
                                 grad_accumulation_steps=2)
    for nan in (False, True):
        model.zero_grad()
        for _ in range(2):
            x, y = batch()
            if nan:
                x[0, 0] = float("nan")
            (F.cross_entropy(model(x), y) / 2).backward()
        if not nan:
            assert precond.step()
            before = {name: (a.clone(), g.clone()) for name, (a, g) in precond.factors().items()}
    assert not precond.step()
    assert_same(precond.factors(), before)
    assert precond.stats["factor_updates"] == 1 and precond.stats["skipped_factor_updates"] == 1


def test_nonfinite_first_step_leaves_no_factors():
    """The very first step is non-finite: no factors are created (not even zeros), the gradients
    are zeroed, and the next step initialises the factors."""
    model = mlp()
    precond = KFACPreconditioner(model, loss="cross_entropy", fisher_type="type-2")
    x, y = batch()
    x[0, 0] = float("nan")
    F.cross_entropy(model(x), y).backward()
    assert not precond.step()
    assert precond.factors() == {}
    assert precond.stats["skipped_factor_updates"] == 1
    for p in model.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))
    model.zero_grad()
    F.cross_entropy(model(batch()[0]), y).backward()
    assert precond.step()
    assert set(precond.factors()) == {"0", "2"}
    assert all(torch.isfinite(t).all() for a_g in precond.factors().values() for t in a_g)


# ---- non-finite gradients ------------------------------------------------------------------


def test_nonfinite_gradient_preconditioner_zeroes_registered_grads():
    """Activations are finite, one gradient is NaN after backward: step() returns False, every
    registered layer's gradient is zero and the step is counted; its statistics, finite, go into
    the factors (they say what the curvature is, whatever went wrong in the gradient)."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4))
    precond = KFACPreconditioner(model, loss="cross_entropy")
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    model[3].bias.grad[1] = float("nan")
    bn_grads = [p.grad.clone() for p in model[1].parameters()]
    assert not precond.step()
    assert precond.stats["nonfinite_grad_steps"] == 1
    assert precond.stats["factor_updates"] == 1 and precond.stats["skipped_factor_updates"] == 0
    assert all(torch.isfinite(t).all() for a_g in precond.factors().values() for t in a_g)
    for layer in (model[0], model[3]):
        for p in layer.parameters():
            assert torch.equal(p.grad, torch.zeros_like(p))
    for p, g in zip(model[1].parameters(), bn_grads):  # not K-FAC's to touch
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("where", ["registered", "unregistered"])
def test_nonfinite_gradient_kfac_changes_no_parameter(where):
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4))
    opt = KFAC(model, update="sgd", lr=0.1, momentum=0.9, loss="cross_entropy")
    train_step(model, opt, *batch())
    params = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.zero_grad()
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    grad = model[0].weight.grad if where == "registered" else model[1].weight.grad
    grad.mul_(float("nan"))
    opt.step()
    assert opt.preconditioner.stats["nonfinite_grad_steps"] == 1
    for p0, m0, p in zip(params, momentum, model.parameters()):
        assert torch.equal(p, p0)
        assert torch.equal(opt.state[p]["momentum_buffer"], m0)
    train_step(model, opt, *batch())
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- failed inversions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "inversion,bad",
    [
        ("cholesky", lambda n: -100.0 * torch.eye(n)),  # negative definite: Cholesky fails in fp64 too
        ("eigen", lambda n: torch.full((n, n), float("nan"))),  # eigh never fails on finite input
        ("cholesky", lambda n: torch.full((n, n), float("nan"))),
    ],
    ids=["cholesky-negative-definite", "eigen-nan", "cholesky-nan"],
)
def test_failed_inversion_keeps_previous_inverse_and_warns_once(inversion, bad):
    model = mlp()
    # Factors only at step 0, inverses every step, so that the injected factor stays as it is.
    opt = KFAC(model, update="sgd", lr=0.1, loss="cross_entropy", inversion=inversion, damping=1e-8,
               factor_update_steps=100, inv_update_steps=1)
    precond = opt.preconditioner
    train_step(model, opt, *batch())
    assert precond.stats["failed_inversions"] == 0
    _, inverses = snapshot(precond)
    a_dim = precond.factors()["2"][0].shape[0]
    precond.curvature.a["2"] = bad(a_dim)

    with pytest.warns(RuntimeWarning, match=r"factor A of block '2'") as record:
        train_step(model, opt, *batch())
    assert len(kfac_messages(record)) == 1
    assert precond.stats["failed_inversions"] == 1
    assert precond.stats["inverse_updates"] == 2
    assert_same(tensors(precond.inverses.records["2"][0]), inverses["2"][0])  # the previous A-side inverse

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train_step(model, opt, *batch())
    assert kfac_messages(record) == []  # warned once per factor
    assert precond.stats["failed_inversions"] == 2
    assert_same(tensors(precond.inverses.records["2"][0]), inverses["2"][0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failed_first_inversion_falls_back_to_identity():
    """The first inversion of a factor fails (injected right after the first factor update):
    that side becomes the identity, so the update is ``(G + √γ I)⁻¹ ∇W̄`` for that layer."""
    model = mlp()
    precond = KFACPreconditioner(model, loss="cross_entropy", inversion="cholesky", damping=1e-8)
    update = precond.curvature.update

    def corrupt(*args):
        done = update(*args)
        precond.curvature.a["0"] = -100.0 * torch.eye(7)
        return done

    precond.curvature.update = corrupt
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match=r"factor A of block '0'.*identity"):
        assert precond.step()
    assert precond.stats["failed_inversions"] == 1
    assert torch.equal(precond.inverses.records["0"][0].matrix, torch.eye(7))
    raw = precond.last_raw_gradients[0].double()
    g = precond.factors()["0"][1].double() + 1e-4 * torch.eye(8, dtype=torch.float64)
    expected = torch.linalg.solve(g, raw)
    assert rel_err(precond.blocks[0].grad_matrix(), expected) < 1e-4
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---- model changes and misuse --------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, unused: bool = False, output: str = "tensor"):
        super().__init__()
        self.body = mlp()
        if unused:
            self.unused = nn.Linear(3, 3)
        self.output = output

    def forward(self, x):
        out = self.body(x)
        if hasattr(self, "extra"):
            out = self.extra(out)
        if self.output == "tuple":
            return out, x.mean()
        return out


def test_layer_added_after_construction_raises():
    model = Net()
    precond = KFACPreconditioner(model, loss="cross_entropy")
    model.add_module("extra", nn.Linear(4, 4))
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="'extra'.*added"):
        precond.step()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fisher_type="mc", loss=None), "fisher_type='mc'"),
        (dict(fisher_type="type-2", loss=None), "fisher_type='type-2'"),
        (dict(loss=nn.CrossEntropyLoss(label_smoothing=0.1)), "label_smoothing"),
        (dict(loss=nn.CrossEntropyLoss(weight=torch.ones(4))), "weight"),
        (dict(loss=nn.CrossEntropyLoss(reduction="none")), "reduction"),
        (dict(loss=nn.L1Loss()), "L1Loss"),
        (dict(loss="hinge"), "hinge"),
        (dict(loss="cross_entropy", damping_mode="eigen", inversion="cholesky"), "inversion='eigen'"),
        (dict(loss="cross_entropy", fisher_type="exact"), "fisher_type"),
        (dict(loss="cross_entropy", factor_dtype=torch.bfloat16), "factor_dtype"),
        (dict(loss="cross_entropy", kl_clip=1e-3), "kl_clip needs lr"),
        (dict(loss="cross_entropy", grad_accumulation_steps=0), "grad_accumulation_steps"),
        (dict(loss="cross_entropy", factor_rows=0), "factor_rows"),
    ],
    ids=["mc-no-loss", "type2-no-loss", "label-smoothing", "class-weights", "reduction-none",
         "l1", "unknown-name", "eigen-damping-cholesky", "unknown-fisher", "bf16-factors",
         "kl-clip-no-lr", "zero-accumulation", "zero-factor-rows"],
)
def test_invalid_configuration_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KFACPreconditioner(mlp(), **kwargs)


def test_empirical_fisher_needs_no_loss():
    model = mlp()
    precond = KFACPreconditioner(model, fisher_type="empirical")
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    assert precond.step()
    assert set(precond.factors()) == {"0", "2"}


def test_kfac_forwards_configuration_errors():
    with pytest.raises(ValueError, match="label_smoothing"):
        KFAC(mlp(), update="sgd", loss=nn.CrossEntropyLoss(label_smoothing=0.1))


@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
def test_step_before_backward_raises(fisher_type):
    model = mlp()
    precond = KFACPreconditioner(model, loss="cross_entropy", fisher_type=fisher_type)
    x, y = batch()
    model(x)  # forward only
    with pytest.raises(RuntimeError, match="backward"):
        precond.step()


def test_step_after_zero_grad_without_backward_warns():
    """Gradients left as zeros (``set_to_none=False``) but no backward this step: the forward
    without a backward is no micro-batch of the empirical Fisher, the factors stay as they were,
    and the preconditioner says so (once)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = KFACPreconditioner(model, loss="cross_entropy", fisher_type="empirical")
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    precond.step()
    opt.step()
    opt.zero_grad(set_to_none=False)
    factors = {name: (a.clone(), g.clone()) for name, (a, g) in precond.factors().items()}
    model(x)
    with pytest.warns(RuntimeWarning, match="no layer statistics.*backward"):
        precond.step()
    assert precond.stats["factor_updates"] == 1 and precond.stats["skipped_factor_updates"] == 1
    for name, (a, g) in precond.factors().items():
        assert torch.equal(a, factors[name][0]) and torch.equal(g, factors[name][1])


def test_first_step_without_statistics_raises_with_the_reason():
    """No factors yet and nothing captured: K-FAC has no curvature; the error says why."""
    model = mlp()
    precond = KFACPreconditioner(model, loss="cross_entropy")
    x, y = batch()
    model.eval()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="eval mode"):
        precond.step()
    model.train()
    with precond.pause():
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"no_grad\(\) or precond.pause\(\)"):
        precond.step()


def test_kfac_step_before_backward_raises():
    model = mlp()
    opt = KFAC(model, update="sgd", lr=0.1, loss="cross_entropy")
    model(batch()[0])
    with pytest.raises(RuntimeError, match="backward"):
        opt.step()


def test_unused_layer_is_left_alone():
    """A layer that does not run in a step (an unused pooler, a dropped or unrouted layer) is no
    error: it has no gradient and keeps none, while the layers that ran are preconditioned."""
    model = Net(unused=True)
    opt = KFAC(model, update="sgd", lr=0.1, loss="cross_entropy")
    losses = [train_step(model, opt, *batch()).item() for _ in range(3)]
    precond = opt.preconditioner
    assert [b.name for b in precond.blocks] == ["body.0", "body.2", "unused"]
    assert set(precond.factors()) == {"body.0", "body.2"}
    assert model.unused.weight.grad is None
    assert precond.stats["factor_updates"] == 3
    assert all(math.isfinite(v) for v in losses)


def test_unused_layer_in_skip_layers_works():
    model = Net(unused=True)
    opt = KFAC(model, update="sgd", lr=0.1, loss="cross_entropy", skip_layers=("unused",))
    assert ("unused", "skipped by skip_layers") in opt.preconditioner.unregistered
    unused = model.unused.weight.detach().clone()
    losses = [train_step(model, opt, *batch()).item() for _ in range(3)]
    assert opt.preconditioner.stats["factor_updates"] == 3
    assert set(opt.preconditioner.factors()) == {"body.0", "body.2"}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert torch.equal(model.unused.weight, unused)


def test_tuple_output_with_mc_samples_from_the_first_tensor():
    """A tuple output: the logits are its first tensor (the default ``output_fn``)."""
    model = Net(output="tuple")
    precond = KFACPreconditioner(model, loss="cross_entropy", fisher_type="mc")
    x, y = batch()
    F.cross_entropy(model(x)[0], y).backward()
    assert precond.step()
    assert set(precond.factors()) == {"body.0", "body.2"}


def test_output_without_logits_raises_naming_output_fn():
    model = Net(output="tuple")
    KFACPreconditioner(model, loss="cross_entropy", fisher_type="mc", output_fn=lambda out: out[1])
    with pytest.raises((RuntimeError, ValueError, IndexError)):
        model(batch()[0])  # a 0-d "logits" tensor cannot be sampled from
    model = nn.Sequential(nn.Linear(3, 3), Dictify())
    KFACPreconditioner(model, loss="cross_entropy", fisher_type="mc")
    with pytest.raises(TypeError, match="output_fn"):
        model(torch.randn(2, 3))


class Dictify(nn.Module):
    def forward(self, x):
        return {"count": 3}


def test_tuple_output_with_empirical_fisher_works():
    """The docstring (and the mc TypeError's advice) say only "mc"/"type-2" need a tensor output:
    with the empirical Fisher a model returning ``(logits, aux)`` trains."""
    model = Net(output="tuple")
    precond = KFACPreconditioner(model, fisher_type="empirical")
    x, y = batch()
    logits, _ = model(x)
    F.cross_entropy(logits, y).backward()
    assert precond.step()
    assert set(precond.factors()) == {"body.0", "body.2"}


def test_load_state_dict_from_another_model_raises():
    source = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.Linear(4, 4))
    precond = KFACPreconditioner(source, loss="cross_entropy")
    x, y = batch()
    F.cross_entropy(source(x), y).backward()
    precond.step()
    target = KFACPreconditioner(mlp(), loss="cross_entropy")
    with pytest.raises(ValueError, match="'3'"):
        target.load_state_dict(precond.state_dict())


# ---- mixed precision -----------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler needs torch >= 2.3")
def test_grad_scaler_empirical_factors_are_unscaled():
    """Empirical Fisher with a GradScaler (scale 2¹⁰) given to the preconditioner: factors and
    the parameters after ``scaler.step(KFAC)`` match the unscaled run."""
    init = mlp()
    data = [batch() for _ in range(3)]
    runs = {}
    for scaled in (False, True):
        model = copy.deepcopy(init)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
        opt = KFAC(model, update="sgd", lr=0.1, momentum=0.9, fisher_type="empirical", loss="cross_entropy",
                   grad_scaler=scaler, inv_update_steps=1)
        for x, y in data:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if scaled:
                scaler.scale(loss).backward()
                scaler.step(opt)  # unscales .grad, then KFAC.step
                scaler.update()
            else:
                loss.backward()
                opt.step()
        runs[scaled] = (model, opt.preconditioner)
    (plain, pp), (scaled_model, ps) = runs[False], runs[True]
    assert ps.stats["factor_updates"] == 3
    for name, (a, g) in pp.factors().items():
        sa, sg = ps.factors()[name]
        assert rel_err(sa, a) < 1e-6, name
        assert rel_err(sg, g) < 1e-5, name
    for p, q in zip(plain.parameters(), scaled_model.parameters()):
        assert rel_err(q, p) < 1e-5


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler needs torch >= 2.3")
def test_grad_scaler_not_passed_scales_empirical_g():
    """The control for the test above: a scaled backward the preconditioner does not know about
    gives G = scale² x the unscaled G (A is unaffected) -- hence the ``grad_scaler`` argument."""
    init = mlp()
    x, y = batch()
    factors = {}
    for scale in (1.0, 2.0**10):
        model = copy.deepcopy(init)
        precond = KFACPreconditioner(model, fisher_type="empirical")
        (F.cross_entropy(model(x), y) * scale).backward()
        precond.step()
        factors[scale] = precond.factors()
    for name, (a, g) in factors[1.0].items():
        sa, sg = factors[2.0**10][name]
        assert rel_err(sa, a) < 1e-6
        assert rel_err(sg, 2.0**20 * g) < 1e-5


def test_bf16_autocast_keeps_float32_factors():
    """Under CPU bf16 autocast the layers see bf16 activations / output gradients: factors stay
    float32, finite, close to the float32 run (bf16 rounding), and training steps work."""
    init = mlp()
    x, y = batch(64)
    factors = {}
    for autocast in (False, True):
        model = copy.deepcopy(init)
        precond = KFACPreconditioner(model, loss="cross_entropy", fisher_type="type-2")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            loss = F.cross_entropy(out, y)
        if autocast:
            assert out.dtype == torch.bfloat16
        loss.backward()
        assert precond.step()
        factors[autocast] = precond.factors()
    for name, (a, g) in factors[True].items():
        assert a.dtype == g.dtype == torch.float32
        assert torch.isfinite(a).all() and torch.isfinite(g).all()
        a32, g32 = factors[False][name]
        assert rel_err(a, a32) < 3e-2 and rel_err(g, g32) < 5e-2, name

    model = copy.deepcopy(init)
    opt = KFAC(model, update="sgd", lr=0.1, loss="cross_entropy", inv_update_steps=2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert opt.preconditioner.stats["nonfinite_grad_steps"] == 0
    assert losses[-1] < losses[0]


# ---- subnormal floats ----------------------------------------------------------------------


def _subnormal_survives() -> bool:
    """Whether float32 arithmetic on this thread keeps a subnormal (1e-39 < 1.18e-38)."""
    return bool((torch.full((1,), 1e-39) * 1.0).item() != 0)


@pytest.mark.parametrize("already_on", [False, True])
def test_flush_denormals_flushes_inside_and_restores_after(already_on):
    torch.set_flush_denormal(already_on)
    try:
        with flush_denormals():
            assert not _subnormal_survives()
        assert _subnormal_survives() is not already_on
    finally:
        torch.set_flush_denormal(False)


def test_step_runs_with_subnormals_flushed():
    """The eigenvectors of low-rank factors carry subnormals that make CPU arithmetic on them
    ~100x slower: every phase of step() runs with them flushed, and the user's setting is back after."""
    torch.manual_seed(0)
    model = mlp()
    precond = KFACPreconditioner(model, loss="cross_entropy", lr=0.1)
    seen = []

    def rule(blocks, grads, finite):
        seen.append(_subnormal_survives())
        return grads

    precond.direction_rule = rule
    for _ in range(2):
        x, y = batch()
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()
    assert seen == [False, False]
    assert _subnormal_survives()


def test_raw_gradients_are_kept_until_the_next_forward():
    """``last_raw_gradients`` (a copy of every block's gradient) is there after step() and through
    a paused forward (adaptive damping's L(θ+δ)), and let go as the next forward begins, so the
    copy is not held through the next forward and backward."""
    torch.manual_seed(0)
    model = mlp()
    precond = KFACPreconditioner(model, loss="cross_entropy")
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    precond.step()
    assert [g.shape for g in precond.last_raw_gradients] == [(8, 7), (4, 9)]
    with precond.pause():
        model(x)
    assert len(precond.last_raw_gradients) == 2
    with torch.no_grad():
        model(x)
    assert precond.last_raw_gradients == []


@pytest.mark.parametrize("through", ["KFAC", "KFACPreconditioner"])
def test_warnings_point_at_the_users_line(through):
    """A warning names the user's call (here: this file), not kfac_ext's or torch.optim's
    wrappers that KFAC.step() goes through."""
    torch.manual_seed(0)
    model = mlp()
    opt = (KFAC(model, lr=0.1, loss="cross_entropy") if through == "KFAC"
           else KFACPreconditioner(model, loss="cross_entropy"))
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradients") as record:
        opt.step()
    assert [w.filename for w in record if "non-finite" in str(w.message)] == [__file__]
