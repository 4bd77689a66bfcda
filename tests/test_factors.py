"""K-FAC factors vs a hand-written float64 computation, and the seed's K-FAC identities.

The expected factors never use the preconditioner's hooks: the test runs its own forward that
keeps every layer's input and (retain_grad) output, backpropagates each direction v (sampled
targets, Hessian square-root columns, or the real labels' per-example gradients) through
Σ_n v_nᵀ z_n, and builds A = ā ᵀā / rows and G = w Σ_{dirs} Σ_rows g gᵀ from that.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_ext import KFACPreconditioner
from kfac_ext.losses import make_loss
from kfac_ext.statistics import Statistics

SEED = 1234
LOSSES = [("cross_entropy", "mean"), ("cross_entropy", "sum"), ("mse", "mean"), ("mse", "sum"),
          ("bce_with_logits", "mean"), ("bce_with_logits", "sum")]


class SeqModel(nn.Module):
    """[B, T, d] inputs: the first Linear sees B·T rows (positions are extra examples)."""

    def __init__(self, d=5, hidden=7, out=4):
        super().__init__()
        self.inner = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)).mean(1))


def make_model(kind: str, out: int) -> tuple[nn.Module, torch.Tensor]:
    n = 6
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6, bias=False), nn.ReLU(), nn.Linear(6, out))
        x = torch.randn(n, 5)
    elif kind == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1), nn.Tanh(),
            nn.Conv2d(3, 4, 2, stride=1, padding=2, dilation=2, bias=False), nn.ReLU(),
            nn.Flatten(), nn.LazyLinear(out),
        )
        x = torch.randn(n, 2, 7, 6)
        model(x)  # materialise the lazy layer
    else:
        model = SeqModel(out=out)
        x = torch.randn(n, 3, 5)
    return model.double(), x.double()


def make_targets(loss_name: str, z: torch.Tensor) -> torch.Tensor:
    if loss_name == "cross_entropy":
        return torch.randint(0, z.shape[1], (z.shape[0],))
    if loss_name == "mse":
        return torch.randn_like(z)
    return torch.rand_like(z).round()


def _activation_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer-input rows without F.unfold: explicit patch extraction for convolutions."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
    else:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = module.kernel_size, module.stride, module.padding, module.dilation
        xp = F.pad(x, (pw, pw, ph, ph))
        out_h = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
        out_w = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
        patches = [
            xp[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw].reshape(x.shape[0], -1)
            for i in range(out_h) for j in range(out_w)
        ]
        rows = torch.stack(patches, 1).reshape(-1, patches[0].shape[1])  # example-major, then position
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
    return rows


def _grad_rows(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return grad.reshape(-1, grad.shape[-1])
    return grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])


def expected_factors(model, x, y, loss, fisher_type, mc_samples):
    """Float64 factors computed without the preconditioner (see the module docstring)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    inputs, outputs = {}, {}

    def keep(name):
        def hook(module, args, out):
            inputs[name] = args[0].detach()
            out.retain_grad()
            outputs[name] = out
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    z = model(x)
    for h in handles:
        h.remove()
    n = z.shape[0]
    w = 1.0 / n if loss.reduction == "mean" else 1.0
    if fisher_type == "mc":
        gen = torch.Generator().manual_seed(SEED)
        directions = [loss.sample_output_grads(z, gen) for _ in range(mc_samples)]
        weight = w / mc_samples
    elif fisher_type == "type-2":
        directions, weight = list(loss.hessian_sqrt(z)), w
    else:  # per-example gradients of the real labels' loss terms
        directions = [torch.autograd.grad(loss.per_example(z, y).sum(), z, retain_graph=True)[0]]
        weight = w
    g_factors = {name: 0.0 for name in layers}
    for v in directions:
        for out in outputs.values():
            out.grad = None
        (z * v).sum().backward(retain_graph=True)
        for name, m in layers.items():
            g = _grad_rows(m, outputs[name].grad)
            g_factors[name] = g_factors[name] + weight * g.T @ g
    expected = {}
    for name, m in layers.items():
        a = _activation_rows(m, inputs[name])
        expected[name] = (a.T @ a / a.shape[0], g_factors[name])
    return expected


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("loss_name,reduction", LOSSES)
@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical"])
def test_factors_match_float64_hand_computation(kind, loss_name, reduction, fisher_type):
    check_factors(kind, loss_name, reduction, fisher_type, "native")


@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical"])
def test_reference_backend_factors_match_float64_hand_computation(fisher_type):
    check_factors("cnn", "cross_entropy", "mean", fisher_type, "reference")


def check_factors(kind, loss_name, reduction, fisher_type, backend):
    out = 4
    model, x = make_model(kind, out)
    loss = make_loss(loss_name, reduction)
    y = make_targets(loss_name, model(x))
    precond = KFACPreconditioner(
        model, loss_name, reduction=reduction, fisher_type=fisher_type, mc_samples=3, backend=backend,
        factor_dtype=torch.float64, inv_dtype=torch.float64, seed=SEED,
    )
    loss(model(x), y).backward()
    precond.step()
    got = precond.factors()
    model.zero_grad()
    with precond.pause():  # its forward is no micro-batch of the preconditioner's
        expected = expected_factors(model, x, y, loss, fisher_type, mc_samples=3)
    assert set(got) == set(expected)
    for name, (a_ref, g_ref) in expected.items():
        a, g = got[name]
        torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-12, msg=f"A of {name}")
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12, msg=f"G of {name}")


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_factor_ema_and_update_period(fisher_type):
    """F ← ρ F + (1 − ρ) F_step, the first update initialising; no capture off-period. Type-2's
    statistics go into the factors as they come (folded), empirical's at step()."""
    model, _ = make_model("mlp", 3)
    loss = make_loss("mse")
    xs = [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    y = torch.randn(6, 3, dtype=torch.float64)
    expected = [expected_factors(model, x, y, loss, fisher_type, 1) for x in xs]  # parameters never move
    precond = KFACPreconditioner(model, "mse", fisher_type=fisher_type, factor_decay=0.9,
                                 factor_update_steps=2, factor_dtype=torch.float64, inv_dtype=torch.float64)
    for x in xs:
        model.zero_grad()
        loss(model(x), y).backward()
        precond.step()
    assert precond.stats["factor_updates"] == 2  # steps 0 and 2; step 1 captured nothing
    for name, (a, g) in precond.factors().items():
        torch.testing.assert_close(a, 0.9 * expected[0][name][0] + 0.1 * expected[2][name][0])
        torch.testing.assert_close(g, 0.9 * expected[0][name][1] + 0.1 * expected[2][name][1])


def _factors_over_steps(model, xs, y, fisher_type, micro_batches, **settings):
    """The float64 factors after each step of ``xs`` (the weights never move), each step's batch
    in ``micro_batches`` micro-batches."""
    loss = make_loss("mse")
    precond = KFACPreconditioner(model, "mse", fisher_type=fisher_type, grad_accumulation_steps=micro_batches,
                                 factor_dtype=torch.float64, inv_dtype=torch.float64, **settings)
    seen = []
    for x in xs:
        model.zero_grad()
        for xc, yc in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            loss(model(xc), yc).backward()
        precond.step()
        seen.append({name: (a.clone(), g.clone()) for name, (a, g) in precond.factors().items()})
    precond.remove_hooks()
    return seen, precond


@pytest.mark.parametrize("fisher_type,micro_batches", [("type-2", 1), ("empirical", 1), ("type-2", 2), ("empirical", 2)])
def test_debiased_factors_weigh_each_step_by_its_age(fisher_type, micro_batches):
    """debias_factors: after n updates a factor is ``Σ ρ^age F_step / Σ ρ^age``, whether a
    step's statistics go in at step() (empirical), folded as they come (type-2), or by
    micro-batch; the steps' own factors from a run with factor_decay=0."""
    model, _ = make_model("mlp", 3)
    xs = [torch.randn(6, 5, dtype=torch.float64) for _ in range(4)]
    y = torch.randn(6, 3, dtype=torch.float64)
    fresh, _ = _factors_over_steps(model, xs, y, fisher_type, micro_batches, factor_decay=0.0)
    debiased, _ = _factors_over_steps(model, xs, y, fisher_type, micro_batches, factor_decay=0.9, debias_factors=True)
    for n, got in enumerate(debiased):
        ages = [0.9 ** (n - j) for j in range(n + 1)]
        for name, (a, g) in got.items():
            for i, factor in enumerate((a, g)):
                want = sum(w * step[name][i] for w, step in zip(ages, fresh)) / sum(ages)
                torch.testing.assert_close(factor, want, rtol=1e-12, atol=1e-14, msg=f"step {n}, {name}[{i}]")


def test_debiased_factor_weights_travel_with_a_checkpoint():
    """The weights the factors gathered are in state_dict: a run resumed from it continues the
    same averages; a checkpoint without them (saved before they existed) counts its factors as
    settled, so that the next update keeps ρ of them."""
    model, _ = make_model("mlp", 3)
    xs = [torch.randn(6, 5, dtype=torch.float64) for _ in range(4)]
    y = torch.randn(6, 3, dtype=torch.float64)
    settings = dict(factor_decay=0.9, debias_factors=True)
    whole, _ = _factors_over_steps(model, xs, y, "type-2", 1, **settings)
    _, first = _factors_over_steps(model, xs[:2], y, "type-2", 1, **settings)
    fresh, _ = _factors_over_steps(model, xs[2:3], y, "type-2", 1, factor_decay=0.0)
    state = copy.deepcopy(first.state_dict())
    assert state["factor_weights"] == {name: pytest.approx(1.9) for name in state["factors"]}
    for weights, want in ((state["factor_weights"], whole[2]), (None, None)):
        resumed = KFACPreconditioner(model, "mse", fisher_type="type-2", factor_dtype=torch.float64,
                                     inv_dtype=torch.float64, **settings)
        resumed.load_state_dict({**state, "factor_weights": weights} if weights else
                                {k: v for k, v in state.items() if k != "factor_weights"})
        model.zero_grad()
        make_loss("mse")(model(xs[2]), y).backward()
        resumed.step()
        resumed.remove_hooks()
        for name, (a, g) in resumed.factors().items():
            old_a, old_g = state["factors"][name]
            want_a = want[name][0] if want else 0.9 * old_a + 0.1 * fresh[0][name][0]
            want_g = want[name][1] if want else 0.9 * old_g + 0.1 * fresh[0][name][1]
            torch.testing.assert_close(a, want_a, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(g, want_g, rtol=1e-12, atol=1e-14)


def _flat_wbar_perm(d_in: int, d_out: int) -> torch.Tensor:
    """Index map from [vec(W) row-major, b] (parameter order) to vec(W̄), W̄ = [W | b]."""
    idx = []
    for i in range(d_out):
        idx += [i * d_in + j for j in range(d_in)] + [d_out * d_in + i]
    return torch.tensor(idx)


USER_LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss, "bce_with_logits": F.binary_cross_entropy_with_logits}


@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse", "bce_with_logits"])
def test_kfac_equals_exact_fisher_block_for_one_layer_on_one_input(loss_name):
    """One Linear layer, one input (three copies of it, so that the mean's 1/M counts): the Fisher
    is exactly G ⊗ A (row-major vec(W̄)). The reference is ``Jᵀ (∇²_z L) J`` with the Hessian of
    the loss as the user computes it (torch.nn.functional's, mean over the examples) by double
    backward, never through kfac_ext.losses."""
    layer = nn.Linear(4, 3).double()
    x = torch.randn(1, 4, dtype=torch.float64).expand(3, 4)
    y = make_targets(loss_name, layer(x))
    user_loss = USER_LOSSES[loss_name]
    params = (layer.weight.detach(), layer.bias.detach())

    def output(w, b):
        return F.linear(x, w, b).reshape(-1)

    jac_w, jac_b = torch.autograd.functional.jacobian(output, params)  # [9, 3, 4], [9, 3]
    jac = torch.cat([jac_w.reshape(9, -1), jac_b], 1)[:, _flat_wbar_perm(4, 3)]  # [9, 15] in vec(W̄) order
    z = layer(x).detach()
    hessian = torch.autograd.functional.hessian(lambda out: user_loss(out, y), z).reshape(9, 9)
    exact = jac.T @ hessian @ jac

    precond = KFACPreconditioner(layer, loss_name, fisher_type="type-2", factor_dtype=torch.float64, inv_dtype=torch.float64)
    user_loss(layer(x), y).backward()
    precond.step()
    a, g = precond.factors()[""]
    torch.testing.assert_close(torch.kron(g, a), exact, rtol=1e-10, atol=1e-12)


def test_kfac_update_invariant_to_affine_input_reparametrisation():
    """Seed App. B: with exact (undamped) factors, transforming a layer's inputs a' = M a + c and
    its weights W̄' = W̄ T⁻¹ (T = [[M, c], [0, 1]]) maps the K-FAC update to Δ' = Δ T⁻¹."""
    torch.manual_seed(0)
    d, h, out, n = 4, 6, 3, 64
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randn(n, out, dtype=torch.float64)
    m = torch.randn(d, d, dtype=torch.float64) + 3 * torch.eye(d, dtype=torch.float64)
    c = torch.randn(d, dtype=torch.float64)
    t = torch.eye(d + 1, dtype=torch.float64)
    t[:d, :d], t[:d, d] = m, c

    def updates(model, inputs):
        precond = KFACPreconditioner(model, "mse", fisher_type="type-2", inversion="eigen", damping_mode="eigen",
                                     damping=1e-14, factor_dtype=torch.float64, inv_dtype=torch.float64)
        make_loss("mse")(model(inputs), y).backward()
        precond.step()
        first, second = model[0], model[2]
        return (torch.cat([first.weight.grad, first.bias.grad[:, None]], 1),
                torch.cat([second.weight.grad, second.bias.grad[:, None]], 1))

    base = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, out)).double()
    moved = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, out)).double()
    moved.load_state_dict(base.state_dict())
    wbar = torch.cat([base[0].weight, base[0].bias[:, None]], 1).detach()
    wbar_moved = wbar @ torch.linalg.inv(t)
    with torch.no_grad():
        moved[0].weight.copy_(wbar_moved[:, :d])
        moved[0].bias.copy_(wbar_moved[:, d])
    delta_first, delta_second = updates(base, x)
    moved_first, moved_second = updates(moved, x @ m.T + c)
    torch.testing.assert_close(moved_first, delta_first @ torch.linalg.inv(t), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(moved_second, delta_second, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_factor_rows_subsets_partition_the_rows_over_successive_updates(fisher_type):
    """factor_rows=6 on 18 rows per micro-batch (the [B, T, d] model's first layer): each update
    sums every 5th row (3 and 4 share a divisor with 18) from an offset that moves on, rescaled;
    over 5 updates of one batch the subsets partition the rows, so the step factors weighted by
    their subsets' sizes (factor_decay=0) add up to the all-rows factor. The head's 6 rows are
    all taken. Monte Carlo targets differ per step, so there only A is compared."""
    torch.manual_seed(SEED)
    model, x = make_model("seq", 3)
    twin = copy.deepcopy(model)
    y = torch.randint(0, 3, (x.shape[0],))
    full = KFACPreconditioner(twin, "cross_entropy", fisher_type=fisher_type, factor_dtype=torch.float64)
    sub = KFACPreconditioner(model, "cross_entropy", fisher_type=fisher_type, factor_dtype=torch.float64,
                             factor_rows=6, factor_decay=0.0)
    steps = []
    for net, precond in [(twin, full)] + [(model, sub)] * 5:  # no optimizer: the weights stay
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        precond.step()
        steps.append({name: (a.clone(), g.clone()) for name, (a, g) in precond.factors().items()})
    want, got = steps[0], steps[1:]
    # the offset is the factor-update count plus the forwards of this step: 1, 2, 3, 4, 0
    shares = [len(range(offset % 5, 18, 5)) / 18 for offset in range(1, 6)]  # 4, 4, 3, 3, 4 rows
    for name in want:
        a_mean = sum(w * s[name][0] for w, s in zip(shares, got))
        torch.testing.assert_close(a_mean, want[name][0], rtol=1e-12, atol=1e-14, msg=f"A of {name}")
        if fisher_type == "empirical":
            g_mean = sum(w * s[name][1] for w, s in zip(shares, got))
            torch.testing.assert_close(g_mean, want[name][1], rtol=1e-12, atol=1e-14, msg=f"G of {name}")
    assert not torch.allclose(got[0]["inner"][0], got[1]["inner"][0])  # each update saw other rows
    assert torch.equal(got[0]["head"][0], want["head"][0])  # 6 rows <= 6: all of them, unscaled


def test_row_subsets_take_every_position_of_an_example():
    """Rows are (example, position) pairs: 128 examples of a 4x4 feature map, at most 512 rows.
    A stride of 4 would take one column of the map from every example; the stride has no divisor
    in common with the row count, so one subset covers every position about equally."""
    stats = Statistics(max_rows=512)
    positions = torch.arange(128 * 16) % 16
    for phase in range(3):
        stats.phase = phase
        picked, scale = stats.subsample(positions[:, None], width=145)
        counts = torch.bincount(picked[:, 0], minlength=16)
        assert counts.min() >= counts.max() - 1 and picked.shape[0] <= 512
        assert scale == pytest.approx(2048 / picked.shape[0])


def test_auto_row_budget_grows_with_the_factor_width():
    """factor_rows="auto": at most 4·d rows for a factor d wide, never fewer than 1024; a sum
    without a GEMM (width None: an embedding's counts) keeps every row."""
    stats = Statistics(max_rows="auto")
    assert [stats.row_budget(d) for d in (10, 256, 257, 1000)] == [1024, 1024, 1028, 4000]
    assert stats.row_budget(None) is None
    rows = torch.randn(2048, 65)
    picked, _ = stats.subsample(rows, width=65)  # a stride of 2 shares a divisor with 2048: 3
    assert torch.equal(picked, rows[0::3])
    assert stats.subsample(rows[:1024], width=65)[0].shape[0] == 1024
