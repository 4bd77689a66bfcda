"""The fast step: a steady-state step never synchronizes, same-shape blocks are preconditioned as
one batch, and the skip of a non-finite step is decided on the device."""

from __future__ import annotations

import contextlib
import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_ext
import kfac_ext.capture as capture_module
from conftest import assert_kfac_step, cpu_generators
from kfac_ext import KFAC, KFACPreconditioner
from kfac_ext.inverse import tensors
from kfac_ext.update import masked_adamw, masked_sgd

F64 = torch.float64
#: Tensor methods through which a value reaches Python or the host (on CUDA each one is a
#: device-to-host copy and a synchronization); Tensor.to naming the CPU is guarded too (see _to_host).
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__complex__")
#: torch functions that return a Python value computed from tensors' elements.
HOST_READ_FUNCTIONS = ("equal", "allclose", "is_nonzero")


def _kfac_ext_on_stack() -> bool:
    """Whether kfac_ext's code is on the call stack: the read is kfac_ext's, made directly or
    through torch's Python code (a tensor hook, a warning that formats a tensor). The test's own
    reads of CPU tensors are not."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__", "").partition(".")[0] == "kfac_ext":
            return True
        frame = frame.f_back
    return False


def _to_host(args, kwargs) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names the CPU as its target device. The tests'
    models live on the CPU, so this cannot tell a copy to the host from a move to the blocks'
    own device; the steady-state step needs neither (test_steady_state_step_on_meta_moves_nothing_to_the_host
    checks every device-to-host path on a device that has no host copy at all)."""
    for target in (*args[:1], kwargs.get("device")):
        if isinstance(target, (str, torch.device)):
            try:
                if torch.device(target).type == "cpu":
                    return True
            except (RuntimeError, TypeError):  # a string that is no device
                continue
    return False


@contextlib.contextmanager
def host_reads(on_read):
    """Inside the block, every way kfac_ext can bring a tensor's value to Python or to the host
    (HOST_READS, HOST_READ_FUNCTIONS, ``Tensor.to`` the CPU) first calls ``on_read(name)``;
    the same calls made by the test itself go through unseen."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS + ("to",)}
    saved_functions = {name: getattr(torch, name) for name in HOST_READ_FUNCTIONS}

    def patched(name, original, check=None):
        def read(*args, **kwargs):
            if (check is None or check(args[1:], kwargs)) and _kfac_ext_on_stack():
                on_read(name)
            return original(*args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, patched(name, saved[name]))
    torch.Tensor.to = patched("to", saved["to"], _to_host)
    for name, function in saved_functions.items():
        setattr(torch, name, patched(name, function))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        for name, function in saved_functions.items():
            setattr(torch, name, function)


def _forbid(name):
    raise AssertionError(f"Tensor.{name} read a value back to the host")


def no_host_reads():
    """Every host read kfac_ext makes raises."""
    return host_reads(_forbid)


def counted_host_reads(reads: list):
    """Every host read kfac_ext makes is recorded in ``reads`` and goes through."""
    return host_reads(reads.append)


def as_if_in_kfac_ext(fn):
    """``fn`` called from a frame of a module named like one of kfac_ext's."""
    scope = {"__name__": "kfac_ext._probe", "fn": fn}
    exec("def call():\n    return fn()", scope)
    return scope["call"]


def test_no_host_reads_catches_them():
    t = torch.ones(2)
    reads = (lambda: bool(t.all()), lambda: float(t.sum()), lambda: t.sum().item(), lambda: t.tolist(),
             lambda: int(t[0]), lambda: math.sqrt(t.sum()), lambda: t.cpu(), lambda: t.to("cpu"),
             lambda: t.to(device=torch.device("cpu"), dtype=F64), lambda: t.numpy(), lambda: torch.equal(t, t),
             lambda: f"{t}", lambda: t.double().to("cpu", copy=True))
    with no_host_reads():
        for read in reads:
            read()  # the test's own reads of its CPU tensors
            with pytest.raises(AssertionError, match="read a value back"):
                as_if_in_kfac_ext(read)()
        as_if_in_kfac_ext(lambda: (t.to(F64), t.to(t), t + 1, t.sum()))()  # no value leaves the device


def stack_model() -> nn.Module:
    """Four hidden blocks of one shape (one group) between blocks of other shapes."""
    torch.manual_seed(0)
    layers = [nn.Linear(6, 12), nn.Tanh()]
    for _ in range(4):
        layers += [nn.Linear(12, 12), nn.Tanh()]
    layers.append(nn.Linear(12, 5))
    return nn.Sequential(*layers).double()


def data(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g, dtype=F64), torch.randint(0, 5, (16,), generator=g)


def backward(model: nn.Module, step: int, poison: bool = False) -> None:
    model.zero_grad()
    x, y = data(step)
    F.cross_entropy(model(x), y).backward()
    if poison:
        model[2].weight.grad[0, 0] = float("nan")


@pytest.mark.parametrize("inversion,damping_mode", [("eigen", "tikhonov"), ("eigen", "eigen"), ("cholesky", "pi")])
def test_steady_state_preconditioner_step_reads_nothing_back(inversion, damping_mode):
    """factor_update_steps=2, inv_update_steps=4: odd steps update neither factors nor inverses.
    They run with every host read forbidden, KL clip on, one of them with a NaN gradient."""
    model = stack_model()
    precond = KFACPreconditioner(model, "cross_entropy", inversion=inversion, damping_mode=damping_mode,
                                 factor_update_steps=2, inv_update_steps=4, lr=0.1, kl_clip=1e-4,
                                 factor_dtype=F64, inv_dtype=F64)
    results = []
    for step in range(6):
        poison = step == 3
        backward(model, step, poison)
        if step % 2:
            with no_host_reads():
                results.append(precond.step())
        else:
            results.append(precond.step())
        grads = [p.grad for p in model.parameters()]
        if poison:  # skipped: zeros, never NaN
            assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
        else:
            assert all(torch.isfinite(g).all() for g in grads)
    assert [bool(r) for r in results] == [True, True, True, False, True, True]
    assert precond.stats["nonfinite_grad_steps"] == 1
    assert precond.stats["factor_updates"] == 3
    assert 0 < precond.stats["kl_clip_scale"] <= 1


def test_steady_state_kfac_step_reads_nothing_back_and_skips_on_device():
    """KFAC.step in a steady-state step: no host read; with a NaN gradient it changes no
    parameter and no momentum buffer, exactly as if the step had not happened."""
    model = stack_model()
    opt = KFAC(model, update="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3, loss="cross_entropy",
               factor_update_steps=2, inv_update_steps=4, factor_dtype=F64, inv_dtype=F64)
    for step in range(3):
        backward(model, step)
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    backward(model, 3, poison=True)
    with no_host_reads():
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), buffers))
    assert opt.preconditioner.stats["nonfinite_grad_steps"] == 1
    backward(model, 4)
    opt.step()  # a factor step
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, 5)
    with no_host_reads():
        opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("inversion,damping_mode", [("eigen", "tikhonov"), ("eigen", "eigen"), ("cholesky", "pi")])
def test_steady_state_step_on_meta_moves_nothing_to_the_host(inversion, damping_mode):
    """A tensor on the meta device has no data: every way of bringing its value to the host
    raises (``.cpu()``, ``.to("cpu")``, ``.item()``, ``.tolist()``, ``.numpy()``, ``bool()``, a
    copy into a CPU tensor, ...). So a steady-state KFAC step (forward, backward, preconditioner
    and SGD step, KL clip, momentum and weight decay on) of a model on meta checks on any machine
    what test_steady_state_step_on_cuda_never_synchronizes checks on a GPU, whichever way a value
    would travel. The state comes from a CPU run through state_dict / load_state_dict, which
    moves it to the blocks' (meta) device."""
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, loss="cross_entropy", inversion=inversion,
                  damping_mode=damping_mode, factor_update_steps=2, inv_update_steps=4, factor_dtype=F64,
                  inv_dtype=F64)
    model = stack_model()
    opt = KFAC(model, update="sgd", **kwargs)
    for step in range(3):  # factor steps 0 and 2, an inversion at 0
        backward(model, step)
        opt.step()
    meta = stack_model().to("meta")
    with cpu_generators():
        meta_opt = KFAC(meta, update="sgd", **kwargs)
    meta_opt.load_state_dict(opt.state_dict())
    x, y = (t.to("meta") for t in data(3))
    with no_host_reads():
        meta_opt.zero_grad()
        F.cross_entropy(meta(x), y).backward()
        meta_opt.step()
    assert meta_opt.preconditioner.steps == 4
    assert all(p.device.type == "meta" and p.grad.device.type == "meta" for p in meta.parameters())


def test_kfac_sgd_step_is_torch_sgd():
    """The device-masked SGD step of update="sgd" is torch.optim.SGD's (momentum, Nesterov,
    weight decay), buffers included: same parameters after several steps on the same gradients;
    a step masked off changes nothing."""
    model = stack_model()
    for nesterov in (False, True):
        ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
        states = {p: {} for p in ours.parameters()}
        sgd = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=nesterov)
        for step in range(5):
            g = torch.Generator().manual_seed(step)
            grads = [torch.randn(p.shape, generator=g, dtype=F64) for p in ours.parameters()]
            for p, q, gr in zip(ours.parameters(), theirs.parameters(), grads):
                p.grad, q.grad = gr.clone(), gr.clone()
            skip = step == 2  # NaN gradients, masked off: nothing may change
            if skip:
                next(ours.parameters()).grad[0, 0] = float("nan")
            with torch.no_grad():
                masked_sgd(list(ours.parameters()), [states[p] for p in ours.parameters()], torch.tensor(not skip),
                           lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=nesterov)
            if not skip:
                sgd.step()
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(p, q)
            assert torch.equal(states[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"])


def test_kfac_adamw_step_is_torch_adamw():
    """The device-masked AdamW step of the Adam-based rules is torch.optim.AdamW's (bias
    correction, decoupled weight decay) up to float64 rounding; a step masked off (NaN gradients)
    changes no parameter and no moment, and does not count as a step."""
    model = stack_model()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    states = {p: {} for p in ours.parameters()}
    adamw = torch.optim.AdamW(theirs.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=g, dtype=F64) for p in ours.parameters()]
        for p, q, gr in zip(ours.parameters(), theirs.parameters(), grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        skip = step in (0, 3)  # the very first step too: no moment exists yet
        if skip:
            next(ours.parameters()).grad[0, 0] = float("inf")
        with torch.no_grad():
            masked_adamw(list(ours.parameters()), [states[p] for p in ours.parameters()], torch.tensor(not skip),
                         lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        if not skip:
            adamw.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
        assert float(states[p]["step"]) == 4
        torch.testing.assert_close(states[p]["exp_avg_sq"], adamw.state[q]["exp_avg_sq"], rtol=1e-13, atol=1e-300)


def test_kfac_refuses_sgd_options_its_step_does_not_implement():
    model = stack_model()
    with pytest.raises(ValueError, match=r"\['maximize'\] are not supported"):
        KFAC([{"params": list(model.parameters()), "maximize": True}], update="sgd", model=model, loss="cross_entropy")


def dense_update(a: torch.Tensor, g: torch.Tensor, grad: torch.Tensor, inversion: str, damping_mode: str, gamma: float):
    """``(G ⊗ A + damping)⁻¹ vec(∇W̄)`` in float64 from the dense Kronecker matrix."""
    eye_a, eye_g = torch.eye(len(a), dtype=F64), torch.eye(len(g), dtype=F64)
    if damping_mode == "eigen":
        k = torch.kron(g, a) + gamma * torch.eye(len(a) * len(g), dtype=F64)
    else:
        pi = math.sqrt((a.trace() / len(a)) / (g.trace() / len(g))) if damping_mode == "pi" else 1.0
        root = math.sqrt(gamma)
        k = torch.kron(g + root / pi * eye_g, a + pi * root * eye_a)
    return torch.linalg.solve(k, grad.flatten()).reshape(grad.shape)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("inversion,damping_mode",
                         [("eigen", "tikhonov"), ("eigen", "pi"), ("eigen", "eigen"), ("cholesky", "tikhonov"),
                          ("cholesky", "pi")])
def test_grouped_preconditioning_is_per_block_solve(backend, inversion, damping_mode):
    """The four same-shape hidden blocks are preconditioned as one batch (stacked inverses, one
    batched GEMM per side); every block still gets its own ``(G ⊗ A + damping)⁻¹ ∇W̄``."""
    model = stack_model()
    precond = KFACPreconditioner(model, "cross_entropy", inversion=inversion, damping_mode=damping_mode,
                                 damping=1e-2, kl_clip=None, inv_update_steps=1, factor_dtype=F64, inv_dtype=F64,
                                 backend=backend)
    for step in range(2):
        backward(model, step)
        precond.step()
    (groups,) = precond.inverses.cached_groups()
    assert sorted(len(indices) for indices, _, _ in groups) == [1, 1, 4]
    stacked = next(a_side for indices, a_side, _ in groups if len(indices) == 4)
    assert tensors(stacked)[-1].shape[:2] == (4, 13)  # [4, 13, 13] inverses (or eigenvectors)
    factors = precond.factors()
    for block, raw in zip(precond.blocks, precond.last_raw_gradients):
        a, g = factors[block.name]
        expected = dense_update(a, g, raw, inversion, damping_mode, 1e-2)
        got = block.grad_matrix()
        assert (got - expected).norm() / expected.norm() < 1e-10, block.name


@pytest.mark.parametrize("inversion", ["eigen", "cholesky"])
def test_every_inversion_replaces_the_stacked_inverses(inversion):
    """Inverses every other step: the stacks of the same-shape blocks' inverses (and every
    block's cached group) are rebuilt after each inversion, so that each step preconditions with
    the factors of the last inversion, not those of the first (π-corrected damping, float64)."""
    model = stack_model()
    precond = KFACPreconditioner(model, "cross_entropy", inversion=inversion, damping_mode="pi", damping=1e-2,
                                 kl_clip=None, inv_update_steps=2, factor_dtype=F64, inv_dtype=F64)
    inverted = None
    for step in range(5):
        backward(model, step)
        precond.step()
        if step % 2 == 0:
            inverted = {name: (a.clone(), g.clone()) for name, (a, g) in precond.factors().items()}
        assert_kfac_step(precond, inverted, damping_mode="pi", gamma=1e-2)
    assert precond.stats["inverse_updates"] == 3


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and kfac_ext.build_info()["built_with_cuda"]),
                    reason="needs a CUDA device and the CUDA build")
@pytest.mark.parametrize("update,inversion,damping_mode", [
    ("sgd", "eigen", "tikhonov"), ("sgd", "eigen", "eigen"), ("sgd", "cholesky", "tikhonov"),
    ("eigen-adam", "eigen", "eigen"), ("adamw", "eigen", "tikhonov")])
def test_steady_state_step_on_cuda_never_synchronizes(update, inversion, damping_mode):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronizing call: steady-state
    KFAC steps (forward and backward included) run under it, one with a NaN gradient, for every
    update rule."""
    model = stack_model().cuda()
    opt = KFAC(model, update=update, lr=0.05 if update == "sgd" else 1e-3, loss="cross_entropy", inversion=inversion, damping_mode=damping_mode,
               factor_update_steps=2, inv_update_steps=4, factor_dtype=F64, inv_dtype=F64)
    batches = [tuple(t.cuda() for t in data(step)) for step in range(6)]

    def step(i, poison=False):
        model.zero_grad()
        x, y = batches[i]
        F.cross_entropy(model(x), y).backward()
        if poison:
            # fill_ on a view is one kernel; item assignment may copy the scalar host to device
            # (a synchronizing copy that sync-debug mode "error" flags: seen on torch 2.11)
            model[2].weight.grad[0, 0].fill_(float("nan"))
        opt.step()

    for i in range(3):
        step(i)
    before = [p.detach().clone() for p in model.parameters()]
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(3, poison=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    step(4)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.preconditioner.stats["nonfinite_grad_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_identical_factors_are_inverted_once():
    """Self-attention's q, k and v see the same input: their A factors are equal and are inverted
    once (one result shared by the three blocks), with the same updates as inverting each."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True).double()
    head = nn.Linear(8, 3).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.head = attention, head

        def forward(self, x):
            return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))

    net = Net()
    x, y = torch.randn(5, 4, 8, dtype=F64), torch.randint(0, 3, (5,))
    precond = KFACPreconditioner(net, "cross_entropy", kl_clip=None, factor_dtype=F64, inv_dtype=F64)
    seen = []
    decompose = precond.ops.eigen_decompose

    def counting(factors):
        seen.append(len(factors))
        return decompose(factors)

    precond.ops = type("Ops", (), dict(vars(precond.ops), eigen_decompose=staticmethod(counting)))
    F.cross_entropy(net(x), y).backward()
    precond.step()
    names = [b.name for b in precond.blocks]
    assert names == ["attention.q", "attention.k", "attention.v", "attention.out_proj", "head"]
    assert seen == [2 * len(names) - 2]  # q, k, v: one A between them
    a_inverses = [precond.inverses.records[n][0].matrix for n in names[:3]]
    assert torch.equal(a_inverses[0], a_inverses[1]) and torch.equal(a_inverses[0], a_inverses[2])
    factors = precond.factors()
    for block, raw in zip(precond.blocks, precond.last_raw_gradients):
        a, g = factors[block.name]
        expected = dense_update(a, g, raw, "eigen", "tikhonov", 1e-3)
        assert (block.grad_matrix() - expected).norm() / expected.norm() < 1e-9, block.name


def test_loading_a_checkpoint_replaces_the_stacked_inverses():
    """A preconditioner that already stepped (its same-shape blocks' inverses stacked and cached)
    preconditions with the loaded inverses after load_state_dict, not with its own."""
    saved_model, used_model = stack_model(), stack_model()
    kwargs = dict(loss="cross_entropy", kl_clip=None, inv_update_steps=100, factor_dtype=F64, inv_dtype=F64)
    saved, used = KFACPreconditioner(saved_model, **kwargs), KFACPreconditioner(used_model, **kwargs)
    for step in range(2):
        backward(saved_model, step)
        saved.step()
        backward(used_model, 10 + step)  # other data: other factors and inverses
        used.step()
    used.load_state_dict(copy.deepcopy(saved.state_dict()))
    used_model.load_state_dict(saved_model.state_dict())
    backward(saved_model, 5)
    saved.step()
    backward(used_model, 5)
    used.step()
    for p, q in zip(saved_model.parameters(), used_model.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical"])
def test_a_factor_step_reads_back_once(fisher_type):
    """A step that updates the factors but not the inverses reads one thing back: the gradients'
    and the statistics' finite flags, together (forward and backward included: sampling the
    targets reads nothing back)."""
    model = stack_model()
    opt = KFAC(model, update="sgd", lr=0.05, loss="cross_entropy", fisher_type=fisher_type, inv_update_steps=3,
               factor_dtype=F64, inv_dtype=F64)
    backward(model, 0)
    opt.step()
    reads = []
    with counted_host_reads(reads):
        backward(model, 1)
        opt.step()
    assert reads == ["tolist"]
    assert opt.preconditioner.stats["factor_updates"] == 2


def test_sampling_targets_from_nonfinite_logits_neither_raises_nor_reads_back():
    """The MC targets are drawn without checking the probabilities (torch.multinomial raises on
    CPU and asserts on CUDA for NaN): rows with NaN logits give NaN directions, which the factor
    update's finite check drops; the other rows are proper draws."""
    from kfac_ext.losses import BCEWithLogits, CrossEntropy

    logits = torch.randn(4, 5, dtype=F64)
    logits[1, 2] = float("nan")
    logits[3, 0] = float("inf")
    g = torch.Generator().manual_seed(0)
    with no_host_reads():
        v = CrossEntropy().sample_output_grads(logits, g)
        b = BCEWithLogits().sample_output_grads(logits, g)
    assert v.shape == b.shape == logits.shape
    assert torch.isfinite(v[0]).all() and torch.isfinite(v[2]).all() and not torch.isfinite(v[1]).all()
    assert abs(float(v[0].sum())) < 1e-12  # p - e_y sums to zero
    assert torch.isnan(b[1, 2])


def test_gumbel_max_targets_follow_the_softmax():
    """Frequencies of 20000 draws match the probabilities (4 sigma)."""
    from kfac_ext.losses import CrossEntropy

    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]], dtype=F64).expand(20000, 4)
    v = CrossEntropy().sample_output_grads(logits, torch.Generator().manual_seed(1))
    p = torch.softmax(logits[0], -1)
    counts = (p - v).sum(0)  # each row is p - e_y: p - v = e_y
    sigma = (20000 * p * (1 - p)).sqrt()
    assert ((counts - 20000 * p).abs() < 4 * sigma).all()


class TokenModel(nn.Module):
    """``[B, T, d]`` tokens to ``[B, T, C]`` logits, with an ``attention_mask`` keyword as Hugging
    Face models take it (the default loss mask counts the attended positions)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.out = nn.Linear(6, 10), nn.Linear(10, 4)

    def forward(self, x, attention_mask=None):
        return self.out(torch.tanh(self.inner(x)))


@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
def test_a_masked_factor_step_reads_back_once(fisher_type):
    """Token-level cross-entropy with an attention mask (the counted tokens M stay on the
    device), under a grad scaler (its scale stays on the device): forward, backward and the
    preconditioner's factor step read back once."""
    model = TokenModel().double()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    precond = KFACPreconditioner(model, "cross_entropy", fisher_type=fisher_type, grad_scaler=scaler,
                                 inv_update_steps=3, factor_dtype=F64, inv_dtype=F64)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 6, generator=g, dtype=F64), torch.randint(0, 4, (3, 5), generator=g)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = mask[2, 1:] = 0

    def forward_backward():
        model.zero_grad()
        logits = model(x, attention_mask=mask)
        per_token = F.cross_entropy(logits.reshape(-1, 4), y.reshape(-1), reduction="none")
        loss = (per_token * mask.reshape(-1)).sum() / mask.sum()
        scaler.scale(loss).backward()

    forward_backward()
    precond.step()
    reads = []
    with counted_host_reads(reads):
        forward_backward()
        precond.step()
    assert reads == ["tolist"]
    assert precond.stats["factor_updates"] == 2
    assert precond.capture.terms == 9


@pytest.mark.parametrize("fisher_type", ["mc", "type-2"])
def test_sampled_backward_reaches_outputs_modified_in_place(fisher_type, monkeypatch):
    """The sampled backward differentiates w.r.t. the gradient edge of the lowest block output,
    never the parameters (no weight gradients), and still reaches an output an inplace activation
    modified: the factors of a model with ``ReLU(inplace=True)`` equal those of the same model
    with ``ReLU()``."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    inplace = copy.deepcopy(plain)
    inplace[1] = nn.ReLU(inplace=True)
    factors, used = [], []
    sampling_inputs = capture_module.sampling_inputs
    monkeypatch.setattr(capture_module, "sampling_inputs",
                        lambda taps: used.append(sampling_inputs(taps)) or used[-1])
    for model in (plain, inplace):
        precond = KFACPreconditioner(model, "cross_entropy", fisher_type=fisher_type, factor_dtype=F64, inv_dtype=F64)
        x, y = data(0)
        F.cross_entropy(model(x), y).backward()
        assert precond.capture.taps == []  # released once the sampled backward ran
        assert all(p.grad is not None for p in model.parameters())  # the model's own backward
        precond.step()
        factors.append(precond.factors())
    for edges in used:
        # the lowest tap only (the first Linear's output): the others' hooks fire on the way to it,
        # and autograd.grad holds no second copy of their gradients
        assert len(edges) == 1 and "Addmm" in edges[0].node.name()
        assert not any(isinstance(e.node, torch.autograd.graph.Node) and "AccumulateGrad" in e.node.name()
                       for e in edges)  # no parameter among them
    assert factors[0].keys() == factors[1].keys() == {"0", "2", "4"}
    for name in factors[0]:
        for a, b in zip(factors[0][name], factors[1][name]):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-15), name
