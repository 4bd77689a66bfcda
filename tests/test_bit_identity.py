"""A dozen KFAC steps over every combination of Fisher type × inversion × damping mode ×
gradient accumulation (and a few special paths), compared with golden values recorded from the
code before the preconditioner was split into parts (tests/golden.py: ``torch.equal`` under
``KFAC_GOLDEN=strict``, 1e-12 relative otherwise). A checkpoint saved by that code must still
load and continue the same trajectory.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from golden import Golden
from torch import nn

from kfac_ext import KFAC

F64 = torch.float64
FISHER = ["mc", "type-2", "empirical"]
INVERSION_DAMPING = [("eigen", "tikhonov"), ("eigen", "pi"), ("eigen", "eigen"), ("cholesky", "tikhonov"),
                     ("cholesky", "pi")]
ACCUMULATION = [1, 2]
STEPS = 12
BATCH = 8


class Net(nn.Module):
    """The blocks the preconditioner treats apart: an embedding (diagonal A); two Linear layers
    reading the same input (equal A factors, inverted once; equal gradient shapes, preconditioned
    as one stacked group); Linear layers on ``[B, T, d]``; a Conv1d; a head."""

    def __init__(self, dtype=F64):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(13, 6)
        self.q, self.k = nn.Linear(6, 6), nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 5, 3, padding=1)
        self.head = nn.Linear(5, 4)
        self.to(dtype)

    def forward(self, tokens):
        e = self.emb(tokens)
        h = torch.tanh(self.q(e)) * torch.sigmoid(self.k(e))
        return self.head(torch.relu(self.conv(h.transpose(1, 2))).mean(-1))


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 13, (BATCH, 5), generator=g), torch.randint(0, 4, (BATCH,), generator=g)


def run(model: nn.Module, steps: range, opt: KFAC, accumulation: int = 1, scaler=None) -> None:
    chunk = BATCH // accumulation
    for step in steps:
        tokens, labels = batch(step)
        opt.zero_grad()

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(tokens), labels)
            loss.backward()
            return loss

        if opt.adaptive_damping:
            opt.step(closure)
            continue
        for i in range(accumulation):
            rows = slice(i * chunk, (i + 1) * chunk)
            loss = F.cross_entropy(model(tokens[rows]), labels[rows]) / accumulation
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


def outcome(model: nn.Module, opt: KFAC) -> dict:
    precond = opt.preconditioner
    return dict(params=[p.detach() for p in model.parameters()],
                factors={k: list(v) for k, v in precond.factors().items()},
                stats={k: v for k, v in precond.stats.items()}, damping=float(precond.damping))


def kfac(model, inversion="eigen", damping_mode="tikhonov", fisher_type="mc", accumulation=1, dtype=F64, **extra):
    args = dict(lr=0.05, loss="cross_entropy", fisher_type=fisher_type, inversion=inversion,
                damping_mode=damping_mode, damping=1e-2, inv_update_steps=3, grad_accumulation_steps=accumulation,
                factor_dtype=dtype, inv_dtype=dtype)
    return KFAC(model, update="sgd", **{**args, **extra})


COMBOS = list(itertools.product(FISHER, INVERSION_DAMPING, ACCUMULATION))
SPECIAL = {
    # factors every 2nd step, inverses every 4th: steps that update neither
    "factor-every-2": dict(fisher_type="mc", inversion="eigen", damping_mode="eigen", factor_update_steps=2,
                           inv_update_steps=4),
    # Levenberg-Marquardt damping from step(closure)
    "adaptive": dict(fisher_type="type-2", inversion="cholesky", damping_mode="pi", adaptive_damping=True,
                     adaptive_damping_interval=2),
    # no KL clip, weight decay and Nesterov momentum in the SGD step
    "no-clip": dict(fisher_type="empirical", inversion="eigen", damping_mode="pi", kl_clip=None,
                    weight_decay=1e-3, nesterov=True),
    # float32 model, factors and inverses
    "float32": dict(fisher_type="mc", inversion="eigen", damping_mode="tikhonov", dtype=torch.float32),
    # a grad scaler on the CPU: empirical factors unscaled, the scaler steps the optimizer
    "grad-scaler": dict(fisher_type="empirical", inversion="cholesky", damping_mode="tikhonov",
                        dtype=torch.float32, scaler=True),
}


@pytest.fixture(scope="module")
def golden():
    g = Golden("bit_identity")
    yield g
    g.save()


@pytest.mark.parametrize("fisher_type,inversion_damping,accumulation", COMBOS,
                         ids=[f"{f}-{i}-{d}-acc{a}" for f, (i, d), a in COMBOS])
def test_trajectory_matches_golden(golden, fisher_type, inversion_damping, accumulation):
    inversion, damping_mode = inversion_damping
    model = Net()
    opt = kfac(model, inversion, damping_mode, fisher_type, accumulation)
    run(model, range(STEPS), opt, accumulation)
    golden.check(f"{fisher_type}-{inversion}-{damping_mode}-acc{accumulation}", outcome(model, opt))


@pytest.mark.parametrize("name", SPECIAL)
def test_special_paths_match_golden(golden, name):
    spec = dict(SPECIAL[name])
    dtype = spec.pop("dtype", F64)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if spec.pop("scaler", False) else None
    model = Net(dtype)
    opt = kfac(model, dtype=dtype, grad_scaler=scaler, **spec)
    run(model, range(STEPS), opt, scaler=scaler)
    golden.check(name, outcome(model, opt))


@pytest.mark.parametrize("fisher_type", FISHER)
def test_gpt2_matches_golden(golden, fisher_type):
    """Hugging Face GPT-2 (Conv1D blocks, labels as the loss mask, a position embedding): the
    capture defaults for Hugging Face models, and its own loss (as users call it)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=17, n_positions=8, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).double()
    opt = KFAC(model, update="sgd", lr=0.05, loss="cross_entropy", fisher_type=fisher_type, damping=1e-2, inv_update_steps=3,
               factor_dtype=F64, inv_dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the position embedding's batch-broadcast warning
        for step in range(6):
            ids = torch.randint(0, 17, (4, 7), generator=torch.Generator().manual_seed(step))
            labels = ids.clone()
            labels[0, 4:] = -100  # padding: uncounted tokens
            opt.zero_grad()
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
    # Hugging Face's causal-LM loss casts the logits to float32 (transformers/loss/loss_utils.py),
    # so the loss gradient is float32 arithmetic, whose rounding depends on the CPU's vector width
    # (AVX2 and AVX-512 runs of this test differ by ~5e-9): float32's tolerance.
    golden.check(f"gpt2-{fisher_type}", outcome(model, opt), computed_in=torch.float32)


CHECKPOINT_STEPS = 7


def test_checkpoint_of_the_old_code_loads_and_continues(golden, tmp_path):
    """A checkpoint saved by the code before the split (tests/fixtures/checkpoint_v1.pt, the
    model and ``KFAC.state_dict()`` after 7 steps, eigen inverses with exact eigen damping, so
    its inverses are (λ, Q) pairs) loads into a fresh model and optimizer, and the next 5 steps
    follow the trajectory that code took."""
    path = golden.path.parent / "checkpoint_v1.pt"
    model = Net()
    opt = kfac(model, "eigen", "eigen", "type-2")
    if golden.recording:
        run(model, range(CHECKPOINT_STEPS), opt)
        path.parent.mkdir(exist_ok=True)
        torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict()), path)
        model, opt = Net(), kfac(Net(), "eigen", "eigen", "type-2")
        model = opt.preconditioner.model
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    assert opt.preconditioner.steps == CHECKPOINT_STEPS
    run(model, range(CHECKPOINT_STEPS, STEPS), opt)
    golden.check("checkpoint-continued", outcome(model, opt))
