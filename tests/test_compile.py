"""K-FAC on a ``torch.compile``d model: same names, same updates as eager, no recompilation per step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn

from kfac_ext import KFAC

F64 = torch.float64


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4)).double()


def data(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g, dtype=F64), torch.randint(0, 4, (16,), generator=g)


def train(net: nn.Module, opt: KFAC, steps: range) -> list[float]:
    losses = []
    for step in steps:
        opt.zero_grad()
        x, y = data(step)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical"])
def test_compiled_model_trains_like_eager(fisher_type):
    """Hooks run eagerly between compiled pieces (graph breaks): the factors, and so the updates,
    are those of the eager model; layer names carry no ``_orig_mod.`` prefix."""
    eager = model()
    compiled_inner = copy.deepcopy(eager)
    compiled = torch.compile(compiled_inner, backend="aot_eager")
    kwargs = dict(lr=0.1, loss="cross_entropy", fisher_type=fisher_type, factor_update_steps=2, inv_update_steps=2)
    opt_eager, opt_compiled = KFAC(eager, update="sgd", **kwargs), KFAC(compiled, update="sgd", **kwargs)
    assert [b.name for b in opt_compiled.preconditioner.blocks] == ["0", "2", "4"]
    losses_eager = train(eager, opt_eager, range(5))
    losses_compiled = train(compiled, opt_compiled, range(5))
    assert losses_compiled[-1] < losses_compiled[0]
    assert losses_compiled == pytest.approx(losses_eager, rel=1e-10)
    for p, q in zip(eager.parameters(), compiled_inner.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)
    state = opt_compiled.state_dict()["kfac"]
    assert sorted(state["factors"]) == ["0", "2", "4"]


class Unrolled(nn.Module):
    """model()'s layers called one by one. A graph break inside nn.Sequential's loop (each K-FAC
    hook is one) makes torch 2.11's dynamo skip the whole frame and run it eagerly, so with
    Sequential that version compiles nothing at all; called one by one, the pieces between the
    hooks compile on every version."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = model()[::2]

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def test_no_recompilation_per_step():
    """After the first steps compiled what they need (factor and non-factor steps), further
    steps compile nothing new and attempt no new frame."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(Unrolled(), backend=counter)
    opt = KFAC(compiled, update="sgd", lr=0.1, loss="cross_entropy", factor_update_steps=2, inv_update_steps=3)
    train(compiled, opt, range(4))
    warm, attempts = counter.frame_count, torch._dynamo.utils.counters["frames"]["total"]
    assert warm > 0
    train(compiled, opt, range(4, 12))
    assert counter.frame_count == warm
    assert torch._dynamo.utils.counters["frames"]["total"] == attempts


def test_compiled_with_inductor():
    """The default backend too (a C++ compiler builds the CPU kernels): the same losses as eager
    up to the fused kernels' float64 rounding."""
    eager = model()
    compiled = torch.compile(copy.deepcopy(eager))
    losses_eager = train(eager, KFAC(eager, update="sgd", lr=0.1, loss="cross_entropy"), range(4))
    opt = KFAC(compiled, update="sgd", lr=0.1, loss="cross_entropy")
    assert train(compiled, opt, range(4)) == pytest.approx(losses_eager, rel=1e-8)
    assert opt.preconditioner.stats["factor_updates"] == 4


def test_fullgraph_is_refused_at_construction():
    compiled = torch.compile(model(), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"fullgraph=True\) cannot work with K-FAC.*compile without fullgraph=True"):
        KFAC(compiled, update="sgd", lr=0.1, loss="cross_entropy")
