"""KFAC's update rules (kfac_ext.update): Adam in the K-FAC eigenbasis (the default), the K-FAC
direction into AdamW, and their skipping, checkpoints, schedules and refusals. The "sgd" rule is
pinned by the tests that pass update="sgd" (test_optimizer.py and the golden trajectories)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from test_fast_step import backward, data, no_host_reads, stack_model
from torch import nn

import kfac_ext
from kfac_ext import KFAC, KFACPreconditioner
from kfac_ext.util import doubling

F64 = torch.float64
BETAS, EPS = (0.9, 0.99), 1e-8


def net() -> nn.Module:
    """Two K-FAC blocks and a LayerNorm (left to AdamW), float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.LayerNorm(9), nn.Linear(9, 5)).double()


def rotate(m, q_g, q_a):
    return q_g.T @ m @ q_a


class Grouped(nn.Module):
    """Blocks that share shapes, so that eigen-adam batches them: two embeddings (diagonal A: no
    Q_A), three Linear(6, 6) — the third runs on odd steps only, so its group changes — and a
    head; a LayerNorm left to AdamW. Float64."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = nn.Embedding(7, 6), nn.Embedding(7, 6)
        self.hidden = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))
        self.norm, self.head = nn.LayerNorm(6), nn.Linear(6, 5)
        self.double()
        self.step = 0

    def forward(self, x):
        ids = (x[:, :2].abs() * 3).long().clamp_max(6)
        h = self.tok(ids[:, 0]) + self.pos(ids[:, 1]) + x
        for i, layer in enumerate(self.hidden):
            if i < 2 or self.step % 2:
                h = torch.tanh(layer(h))
        return self.head(self.norm(h))


def grouped_backward(model: Grouped, step: int) -> None:
    model.step = step
    model.zero_grad()
    x, y = data(step)
    F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("kind", ["two-shapes", "grouped", "grouped-reference-ops"])
def test_eigen_adam_is_adam_in_the_factor_eigenbasis(kind):
    """Every step of update="eigen-adam" equals a float64 recomputation from the captured
    gradients and the eigenvectors the preconditioner holds, block by block: ĝ = Q_Gᵀ ∇W̄ Q_A
    (no Q_A for an embedding's diagonal A), Adam's moments on ĝ (carried into each new basis: m
    exactly, v as independent coordinates, ``(R∘R) v (R_A∘R_A)``), the direction rotated back,
    the parameters moved by lr times it and decayed; every other parameter by AdamW. Inversions
    at steps 0, 2, 4, 6: the basis changes under the moments. "grouped": embeddings, blocks of
    one shape, and a block that skips a step (it keeps its moments); "grouped-reference-ops": the
    same through kfac_ext.reference (the native op's oracle)."""
    model = net() if kind == "two-shapes" else Grouped()
    step_model = (lambda step: backward(model, step)) if kind == "two-shapes" else (
        lambda step: grouped_backward(model, step))
    lr, wd = 1e-2, 0.05
    opt = KFAC(model, lr=lr, weight_decay=wd, betas=BETAS, eps=EPS, loss="cross_entropy", fisher_type="type-2",
               factor_update_steps=1, inv_update_steps=2, factor_dtype=F64, inv_dtype=F64)
    precond = opt.preconditioner
    if kind == "grouped-reference-ops":
        precond.ops = kfac_ext.reference
    ref = copy.deepcopy(model)
    block_params = {id(p) for b in precond.blocks for p in b.params()}
    others = [(p, q) for p, q in zip(model.parameters(), ref.parameters()) if id(p) not in block_params]
    ref_adamw = torch.optim.AdamW([q for _, q in others], lr=lr, betas=BETAS, eps=EPS, weight_decay=wd)
    moments = {}
    inversions = []
    for step in range(8):
        step_model(step)
        before = precond.stats["inverse_updates"]
        opt.step()
        inversions.append(precond.stats["inverse_updates"] > before)
        with torch.no_grad():
            for block, grad in zip(precond.blocks, precond.last_raw_gradients):
                if grad is None:  # did not run: no step, moments kept
                    continue
                rec_a, rec_g = precond.inverses.records[block.name]
                q_a, q_g = rec_a.vectors, rec_g.vectors
                q_a = torch.eye(grad.shape[1], dtype=F64) if q_a is None else q_a  # diagonal A: no rotation
                m, v, t, basis = moments.get(block.name, (torch.zeros_like(grad), torch.zeros_like(grad), 0, None))
                if basis is not None:  # into the new basis: m exactly, v as independent coordinates
                    r_g, r_a = q_g.T @ basis[1], basis[0].T @ q_a
                    m, v = r_g @ m @ r_a, (r_g * r_g) @ v @ (r_a * r_a)
                g = rotate(grad, q_g, q_a)
                m, v, t = m * BETAS[0] + g * (1 - BETAS[0]), v * BETAS[1] + g * g * (1 - BETAS[1]), t + 1
                moments[block.name] = (m, v, t, (q_a, q_g))
                u = (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
                module = ref.get_submodule(block.name)
                bias = getattr(module, "bias", None)
                wbar = block.matrix(module.weight, bias) * (1 - lr * wd) - lr * (q_g @ u @ q_a.T)
                for param, value in zip([module.weight, bias], block.split(wbar)):
                    param.copy_(value)
            for p, q in others:
                q.grad = None if p.grad is None else p.grad.clone()
        ref_adamw.step()
        # Adam's m / (√v + eps) amplifies rounding where a rotated coordinate is ~0 (√v ~ eps):
        # within 1e-7 of one step's size (lr)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-7 * lr)
    # grouped: the third hidden layer first runs at step 1, and its new factors are inverted then
    assert inversions == [True, False] * 4 if kind == "two-shapes" else [True, True, True] + [False, True] * 2 + [False]


def test_adamw_rule_is_the_kfac_direction_into_adamw():
    """update="adamw": every step equals KFACPreconditioner (same settings, no KL clip) writing
    the K-FAC direction, then torch.optim.AdamW on every parameter."""
    model = net()
    ref = copy.deepcopy(model)
    settings = dict(loss="cross_entropy", fisher_type="type-2", damping=1e-2, factor_update_steps=1,
                    inv_update_steps=3, factor_dtype=F64, inv_dtype=F64)
    opt = KFAC(model, lr=3e-3, betas=BETAS, update="adamw", **settings)
    precond = KFACPreconditioner(ref, kl_clip=None, **settings)
    adamw = torch.optim.AdamW(ref.parameters(), lr=3e-3, betas=BETAS, weight_decay=0.0)
    for step in range(6):
        backward(model, step)
        opt.step()
        backward(ref, step)
        precond.step()
        adamw.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("update", ["eigen-adam", "adamw"])
def test_nonfinite_step_changes_no_parameter_and_no_state(update):
    """A step whose gradients hold a NaN moves nothing: parameters (weight decay included),
    AdamW's and the eigenbasis moments, their step counts; the next finite steps go on as if it
    had not happened."""
    model, twin = net(), net()
    opts = [KFAC(m, lr=1e-2, weight_decay=0.1, update=update, loss="cross_entropy", fisher_type="type-2",
                 factor_dtype=F64, inv_dtype=F64, factor_update_steps=2, inv_update_steps=4) for m in (model, twin)]
    for step in range(6):  # the twin sees no NaN
        backward(twin, step)
        opts[1].step()
    for step in range(6):
        if step == 3:  # a steady-state step (no factor or inverse update) with a NaN gradient
            state = copy.deepcopy(opts[0].state_dict())
            params = [p.detach().clone() for p in model.parameters()]
            backward(model, step)
            model[0].weight.grad[0, 0] = float("nan")
            opts[0].step()
            assert opts[0].preconditioner.stats["nonfinite_grad_steps"] == 1
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
            _assert_same_state(opts[0].state_dict(), state)
            opts[0].preconditioner.steps -= 1  # replay the step number, as the twin saw it
        backward(model, step)
        opts[0].step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def _assert_same_state(got: dict, want: dict) -> None:
    for key in ("state",):
        for k, s in want[key].items():
            for name, t in s.items():
                assert torch.equal(got[key][k][name], t), (k, name)
    for name, s in want["kfac"].get("eigen_adam", {}).items():
        for k, t in s.items():
            assert torch.equal(got["kfac"]["eigen_adam"][name][k], t), (name, k)


class WithMatrix(nn.Module):
    """A bare matrix parameter used twice, as a tied input / output embedding is (no K-FAC block
    covers it), then a Linear head (a block). Float64."""

    def __init__(self, rows: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Parameter(torch.randn(rows, 6, dtype=F64) / 3)
        self.head = nn.Linear(6, 5).double()

    def forward(self, x):
        return self.head(torch.tanh(x @ self.mix.T) @ self.mix)


class MatrixAdamReference:
    """Adam in the eigenbasis of ``L = E[∇∇ᵀ]`` and ``R = E[∇ᵀ∇]`` of one matrix (the first step
    in the identity basis), written out with torch.linalg in float64; ``transposed``: the rows
    side is too wide, so ``∇ᵀ`` is used and only its rows (the matrix's columns) are rotated.
    ``L`` and ``R`` are debiased moving averages, as the K-FAC factors: ``Σ ρ^age ∇∇ᵀ / Σ ρ^age``."""

    def __init__(self, p, transposed, factor_every, basis_every, lr, wd, decay):
        self.p, self.transposed = p.detach().clone(), transposed
        self.factor_every, self.basis_every, self.lr, self.wd, self.decay = factor_every, basis_every, lr, wd, decay
        self.sides, self.bases, self.m, self.v, self.count = {}, {}, None, None, 0
        self.sums, self.gathered = {}, 0.0  # Σ ρ^age ∇∇ᵀ and Σ ρ^age

    def step(self, t, grad):
        g = grad.T if self.transposed else grad
        stats = {"left": g @ g.T} if self.transposed else {"left": g @ g.T, "right": g.T @ g}
        if t % self.factor_every == 0:
            self.gathered = self.decay * self.gathered + 1.0
            for k, f in stats.items():
                self.sums[k] = self.decay * self.sums.get(k, 0.0) + f
                self.sides[k] = self.sums[k] / self.gathered
        if self.m is None:  # the first step in the identity basis
            self.m, self.v = torch.zeros_like(g), torch.zeros_like(g)
            self.bases = {k: torch.eye(f.shape[0], dtype=F64) for k, f in self.sides.items()}
        elif t % self.basis_every == 0:
            new = {k: torch.linalg.eigh(f)[1] for k, f in self.sides.items()}
            r_l = new["left"].T @ self.bases["left"]
            r_r = new["right"].T @ self.bases["right"] if "right" in new else torch.eye(g.shape[1], dtype=F64)
            self.m, self.v = r_l @ self.m @ r_r.T, (r_l * r_l) @ self.v @ (r_r * r_r).T
            self.bases = new
        q_l = self.bases["left"]
        q_r = self.bases.get("right", torch.eye(g.shape[1], dtype=F64))
        rotated = q_l.T @ g @ q_r
        self.count += 1
        self.m = BETAS[0] * self.m + (1 - BETAS[0]) * rotated
        self.v = BETAS[1] * self.v + (1 - BETAS[1]) * rotated**2
        m_hat, v_hat = self.m / (1 - BETAS[0] ** self.count), self.v / (1 - BETAS[1] ** self.count)
        d = q_l @ (m_hat / (v_hat.sqrt() + EPS)) @ q_r.T
        self.p -= self.lr * ((d.T if self.transposed else d) + self.wd * self.p)


@pytest.mark.parametrize("shape", ["square", "too-wide"])
def test_matrices_without_a_block_get_adam_in_their_gradient_eigenbasis(shape):
    """eigen-adam gives a 2-D parameter that no block covers (here used twice, like a tied
    embedding) Adam in the eigenbasis of its gradient's ``L`` and ``R`` (SOAP's factors) on K-FAC's
    factor and basis schedules, with decoupled weight decay: equal to the written-out algorithm
    step by step, a NaN step skipped on the device without a read back. "too-wide": rows over
    ``max_factor_dim``, so only the columns are rotated."""
    model = WithMatrix(rows=9 if shape == "too-wide" else 6)
    opt = KFAC(model, lr=1e-2, betas=BETAS, eps=EPS, weight_decay=0.1, loss="cross_entropy", factor_update_steps=2,
               factor_decay=0.8, inv_update_steps=3, factor_dtype=F64, inv_dtype=F64, max_factor_dim=8)
    assert [b.name for b in opt.preconditioner.blocks] == ["head"]
    ref = MatrixAdamReference(model.mix, shape == "too-wide", 2, 3, lr=1e-2, wd=0.1, decay=0.8)
    for step in range(10):
        backward(model, step)
        if step in (5, 6):  # NaN gradients: a steady-state step (nothing read back), a factor and basis step
            model.head.weight.grad[0, 0] = float("nan")
            before = [model.mix.detach().clone(), copy.deepcopy(opt.state[model.mix])]
            with no_host_reads() if step == 5 else contextlib.nullcontext():
                opt.step()
            assert torch.equal(model.mix, before[0])
            assert all(torch.equal(v, before[1][k]) for k, v in opt.state[model.mix].items() if torch.is_tensor(v))
            continue
        ref.step(step, model.mix.grad.clone())
        opt.step()
        torch.testing.assert_close(model.mix.detach(), ref.p, rtol=1e-10, atol=1e-12)
    assert opt.preconditioner.stats["nonfinite_grad_steps"] == 2


class HeadOverFewRowsWithMatrix(nn.Module):
    """A convolution and a 512-wide classifier head over 16 examples (the head's decompositions
    outweigh its layer: ``inv_update_steps="auto"`` refreshes it at 0, 4, 16, 64, ...), then a
    bare 10x10 matrix that no block covers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
        self.mix = nn.Parameter(torch.eye(10) + 0.1 * torch.randn(10, 10))

    def forward(self, x):
        return self.body(x) @ self.mix


def test_a_blockless_matrix_refreshes_its_basis_on_the_blocks_shared_schedule():
    """A blockless matrix's basis is refreshed with the blocks on the shared schedule (0, 1, 2,
    4, ..., 32, then every 50), not at the steps where only a sparsely refreshed block is (64)."""
    model = HeadOverFewRowsWithMatrix()
    opt = KFAC(model, lr=1e-3, loss="cross_entropy")
    precond = opt.preconditioner
    x, y = torch.randn(16, 3, 8, 8), torch.zeros(16, dtype=torch.long)
    bases, heads = [], []
    for _ in range(70):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = opt.state[model.mix].get("q_g"), precond.inverses.records.get("body.3", (None,))[0]
        opt.step()
        bases.append(before[0] is not None and opt.state[model.mix]["q_g"] is not before[0])
        heads.append(before[1] is not None and precond.inverses.records["body.3"][0] is not before[1])
    assert (precond.refresh_period, list(precond.sparse_refresh)) == (50, ["body.3"])
    refreshed = lambda flags: [step for step, f in enumerate(flags) if f]  # noqa: E731
    assert refreshed(heads) == [4, 16, 64]
    assert refreshed(bases) == [1, 2, 4, 8, 16, 32, 50]


@pytest.mark.parametrize("update,make", [("eigen-adam", net), ("adamw", net), ("eigen-adam", WithMatrix)],
                         ids=["eigen-adam", "adamw", "eigen-adam-matrix"])
def test_checkpoint_resumes_the_same_trajectory(update, make):
    """state_dict after 3 steps, loaded into a fresh model and optimizer: the next steps equal an
    uninterrupted run's (the eigenbasis moments, a blockless matrix's factors, bases and moments,
    and AdamW's state travel with it)."""
    settings = dict(lr=1e-2, update=update, loss="cross_entropy", fisher_type="type-2", factor_dtype=F64,
                    inv_dtype=F64)
    whole, first = make(), make()
    opt_whole, opt_first = KFAC(whole, **settings), KFAC(first, **settings)
    for step in range(7):
        backward(whole, step)
        opt_whole.step()
    for step in range(3):
        backward(first, step)
        opt_first.step()
    state = copy.deepcopy(dict(model=first.state_dict(), optimizer=opt_first.state_dict()))
    resumed = make()
    opt_resumed = KFAC(resumed, **settings)
    resumed.load_state_dict(state["model"])
    opt_resumed.load_state_dict(state["optimizer"])
    for step in range(3, 7):
        backward(resumed, step)
        opt_resumed.step()
    for p, q in zip(resumed.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def _matrix_model_after_two_steps(**settings) -> tuple[WithMatrix, dict]:
    """A :class:`WithMatrix` after two KFAC steps (factor steps every 2), and a copy of the
    optimizer's state_dict then."""
    model = WithMatrix()
    opt = KFAC(model, **settings)
    for step in range(2):
        backward(model, step)
        opt.step()
    return model, copy.deepcopy(opt.state_dict())


def test_a_matrix_factor_without_its_weight_counts_as_settled():
    """A blockless matrix's L from a checkpoint saved before its debiasing weight existed keeps
    ρ = 0.9 (the default rule's) of itself at the next factor update (as the blocks' factors
    do), not 0."""
    settings = dict(lr=1e-2, loss="cross_entropy", factor_update_steps=2, factor_dtype=F64, inv_dtype=F64)
    model, state = _matrix_model_after_two_steps(**settings)
    for s in state["state"].values():
        s.pop("factor_weight", None)
    resumed = KFAC(model, **settings)
    resumed.load_state_dict(state)
    old_left = resumed.state[model.mix]["left"].clone()
    backward(model, 2)
    g = model.mix.grad.clone()
    resumed.step()
    torch.testing.assert_close(resumed.state[model.mix]["left"], 0.9 * old_left + 0.1 * g @ g.T, rtol=1e-12,
                               atol=1e-14)


def test_a_matrix_with_adamw_state_from_an_older_checkpoint_continues_from_it():
    """A checkpoint saved when AdamW took a blockless matrix (its state: step and
    parameter-shaped moments) loads, and the matrix's Adam continues from those moments (the
    identity basis: the same coordinates) into the factors' basis at the next refresh."""
    settings = dict(lr=1e-2, betas=BETAS, loss="cross_entropy", factor_update_steps=2, factor_decay=0.8,
                    inv_update_steps=3, factor_dtype=F64, inv_dtype=F64)
    model, state = _matrix_model_after_two_steps(**settings)
    index = next(i for i, p in enumerate(model.parameters()) if p is model.mix)
    adamw_state = {k: state["state"][index][k] for k in ("step", "exp_avg", "exp_avg_sq")}
    state["state"][index] = adamw_state
    resumed = KFAC(model, **settings)
    resumed.load_state_dict(state)
    ref = MatrixAdamReference(model.mix, False, 2, 3, lr=1e-2, wd=0.0, decay=0.8)
    ref.m, ref.v, ref.count = adamw_state["exp_avg"].clone(), adamw_state["exp_avg_sq"].clone(), 2
    ref.bases = {k: torch.eye(6, dtype=F64) for k in ("left", "right")}
    for step in range(2, 5):
        backward(model, step)
        ref.step(step, model.mix.grad.clone())
        resumed.step()
        torch.testing.assert_close(model.mix.detach(), ref.p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("update", ["eigen-adam", "adamw"])
def test_steady_state_step_reads_nothing_back(update):
    """With the Adam-based rules too, a step that updates no factors and no inverses never reads
    a value back to the host, a NaN step included (skipped on the device)."""
    model = stack_model()
    opt = KFAC(model, lr=1e-2, update=update, loss="cross_entropy", factor_update_steps=2, inv_update_steps=4,
               factor_dtype=F64, inv_dtype=F64)
    for step in range(3):
        backward(model, step)
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, 3, poison=True)
    with no_host_reads():
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    backward(model, 4)
    opt.step()
    backward(model, 5)
    with no_host_reads():
        opt.step()
    assert opt.preconditioner.stats["nonfinite_grad_steps"] == 1


def test_default_schedules_refresh_early_then_settle():
    """The default rule updates its factors at steps 0, 1, 2, 4, 8, then every 10, and the
    eigenbasis at 0, 1, 2, 4, ..., 32, then every 50 (this model's refreshes cost more than
    1/40 of its layers' work at any shorter period): the first bases, from little data, are
    replaced quickly, and the steady-state step is cheap."""
    model = stack_model()
    opt = KFAC(model, loss="cross_entropy")
    seen_factors, seen_inverses = [], []
    for step in range(130):
        x, y = data(step % 6)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        stats = dict(opt.preconditioner.stats)
        opt.step()
        if opt.preconditioner.stats["factor_updates"] > stats["factor_updates"]:
            seen_factors.append(step)
        if opt.preconditioner.stats["inverse_updates"] > stats["inverse_updates"]:
            seen_inverses.append(step)
    assert seen_factors == [0, 1, 2, 4, 8] + list(range(10, 130, 10))
    assert seen_inverses == [0, 1, 2, 4, 8, 16, 32, 50, 100]
    assert [doubling(10)(s) for s in (0, 1, 3, 9, 10, 11)] == [1, 1, 2, 8, 10, 10]


def test_default_factors_take_about_four_rows_per_width():
    """The default rule's factors take at most ~4·d rows (at least 1024) of a micro-batch: of 2400
    tokens, the 9-wide A and the 3-wide G take every 7th (the least stride from 3 with no divisor
    in common with 2400), from the first update's offset 1; G is that subset's sum rescaled."""
    torch.manual_seed(0)
    model = nn.Linear(8, 3).double()
    x, y = torch.randn(4, 600, 8, dtype=F64), torch.randint(0, 3, (4, 600))
    opt = KFAC(model, loss="cross_entropy", factor_dtype=F64)
    out = model(x)
    out.retain_grad()
    F.cross_entropy(out.flatten(0, 1), y.flatten()).backward()
    opt.step()
    a, g = opt.preconditioner.factors()[""]
    rows = torch.cat([x.flatten(0, 1), torch.ones(2400, 1, dtype=F64)], 1)[1::7]
    torch.testing.assert_close(a, rows.mT @ rows / rows.shape[0], rtol=1e-12, atol=1e-14)
    g_rows = out.grad.flatten(0, 1)[1::7]
    subset = g_rows.mT @ g_rows
    torch.testing.assert_close(g, subset * (g[0, 0] / subset[0, 0]), rtol=1e-12, atol=1e-14)


def test_rules_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match=r"update must be one of \['eigen-adam', 'adamw', 'sgd'\]"):
        KFAC(net(), loss="cross_entropy", update="lion")
    with pytest.raises(ValueError, match=r"eigen-adam.*needs inversion='eigen' and damping_mode='eigen'"):
        KFAC(net(), loss="cross_entropy", inversion="cholesky", damping_mode="tikhonov")
    with pytest.raises(ValueError, match=r"adaptive_damping adapts the damping.*update='adamw' or 'sgd'"):
        KFAC(net(), loss="cross_entropy", adaptive_damping=True)
    with pytest.raises(ValueError, match=r"\['amsgrad'\] are not supported"):
        KFAC([{"params": list(net().parameters()), "amsgrad": True}], model=net(), loss="cross_entropy")


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and kfac_ext.build_info()["built_with_cuda"]),
                    reason="needs a CUDA device and the CUDA build")
@pytest.mark.parametrize("update", ["eigen-adam", "adamw", "sgd"])
def test_every_rule_takes_the_same_steps_on_cuda(update):
    """Ten float64 steps with factor and eigenbasis refreshes on the GPU follow the CPU's: the
    native CUDA factor updates, cuSOLVER's eigenvectors (signs and order may differ: each rule's
    direction does not depend on them) and the rules' moment rotations agree with the CPU path
    to float64 rounding, amplified by Adam's 1/√v where a rotated coordinate is ~0."""
    lr = 0.05 if update == "sgd" else 1e-2
    settings = dict(lr=lr, update=update, loss="cross_entropy", factor_update_steps=1, inv_update_steps=3,
                    factor_dtype=F64, inv_dtype=F64)
    models = {"cpu": stack_model(), "cuda": stack_model().cuda()}
    opts = {dev: KFAC(m, **settings) for dev, m in models.items()}
    for step in range(10):
        for dev, model in models.items():
            model.zero_grad()
            x, y = data(step)
            F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
            opts[dev].step()
    for p, q in zip(models["cpu"].parameters(), models["cuda"].parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-8, atol=1e-6 * lr)


@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_mobilenet_v3_small_trains_from_its_first_bases_without_a_spike(lr):
    """torchvision MobileNetV3-small (hard-swish, squeeze-excitation, BatchNorm) on a fixed batch
    with KFAC's defaults at AdamW's learning rates: the first eigenbases come from one batch's
    low-rank factors, so they are refreshed at steps 1, 2, 4, 8 and the moments carried into each
    new basis. The loss never rises above its start until it has halved, stays within 1.5x of it
    after, and falls. (Measured: with the second moments kept instead of rotated into the new
    basis it rose to 5x its start; with the first bases kept 10 steps the old rule diverged. Once
    the batch is fitted a fixed-batch run at lr 1e-2 is chaotic: over seeds 0-4 on 2 threads one
    overshoots to 1.27x its start at step 7 — AdamW overshoots to 1.8-3.4x in every seed — and
    which seed does depends on the machine's kernels, so that phase gets the looser bound.)"""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = KFAC(model, lr=lr, loss="cross_entropy")
    losses, inverse_steps = [], []
    for step in range(10):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        before = opt.preconditioner.stats["inverse_updates"]
        opt.step()
        losses.append(loss.item())
        if opt.preconditioner.stats["inverse_updates"] > before:
            inverse_steps.append(step)
    assert inverse_steps == [0, 1, 2, 4, 8]
    halved = next((i for i, loss in enumerate(losses) if loss < losses[0] / 2), len(losses))
    assert max(losses[:halved]) <= losses[0] and max(losses) <= 1.5 * losses[0], losses
    assert losses[-1] < 0.85 * losses[0], losses  # measured 0.81 at lr 1e-3 (0.77 with factors every 5 steps)
