"""Whole preconditioner step on a model zoo, native vs pure-PyTorch reference, with the phase
breakdown (factor update, inversion, preconditioning) and the overhead over plain SGD.

    python bench/bench_step.py --quick        # small widths, < 1 min on 2 CPU cores
    python bench/bench_step.py [--device cuda]

Models: an MLP of 8 Linear layers of width W; a small ResNet-style CNN (3x3 convs, two stages);
a stack of transformer-block Linear layers (qkv, proj, fc1, fc2) on [B, T, d] inputs.
Per backend, each phase is timed alone (median, torch.utils.benchmark) on the same captured batch;
"step" is forward + backward + preconditioner step with the inversion amortised over
inv_update_steps=10, and "SGD step" forward + backward + torch.optim.SGD step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from timing import environment, median_seconds

from kfac_ext import KFACPreconditioner

RESULTS_DIR = Path(__file__).resolve().parent / "results"
INV_UPDATE_STEPS = 10


class Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class TransformerLinears(nn.Module):
    """The Linear layers of transformer blocks (attention mixing left out: K-FAC sees Linears)."""

    def __init__(self, d, blocks, classes=10):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(qkv=nn.Linear(d, 3 * d), proj=nn.Linear(d, d), fc1=nn.Linear(d, 4 * d), fc2=nn.Linear(4 * d, d)))
            for _ in range(blocks)
        )
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        for b in self.blocks:
            q, k, v = b["qkv"](x).chunk(3, dim=-1)
            x = x + b["proj"](torch.tanh(q) * v)
            x = x + b["fc2"](F.gelu(b["fc1"](x)))
        return self.head(x.mean(1))


def zoo(quick: bool):
    w = 256 if quick else 1024
    mlp = nn.Sequential(*[m for _ in range(7) for m in (nn.Linear(w, w), nn.ReLU())], nn.Linear(w, 10))
    c = 16 if quick else 32
    cnn = nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), Residual(c), nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),
        Residual(2 * c), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 10),
    )
    d, blocks, t = (128, 2, 16) if quick else (256, 4, 64)
    batch = 128 if quick else 256
    return {
        f"mlp 8x{w}": (mlp, torch.randn(batch, w)),
        f"resnet c={c}": (cnn, torch.randn(batch // 2, 3, 16, 16)),
        f"transformer {blocks}x(d={d}, T={t})": (TransformerLinears(d, blocks), torch.randn(batch // 4, t, d)),
    }


def measure(model, x, backend, device, min_run_time):
    model = model.to(device)
    x = x.to(device)
    y = torch.randint(0, 10, (x.shape[0],), device=device)
    precond = KFACPreconditioner(model, "cross_entropy", fisher_type="mc", inversion="eigen", damping=1e-2,
                                 inv_update_steps=INV_UPDATE_STEPS, backend=backend)

    def forward_backward():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    forward_backward()
    precond.step()  # factors and inverses exist from here on
    forward_backward()  # leaves this step's micro-batch pending for the phase timings
    pending = dict(precond._pending_a), dict(precond._pending_g)
    grads = [b.grad_matrix() for b in precond.blocks]

    def factor_update():  # reduce the captured micro-batch to factor sums, then the EMA
        precond._clear_pending()
        precond._pending_a, precond._pending_g, precond._forwards = dict(pending[0]), dict(pending[1]), 1
        precond._flush()
        precond._update_factors()

    times = dict(
        factor_update=median_seconds(factor_update, min_run_time),
        inversion=median_seconds(precond._update_inverses, min_run_time),
        precondition=median_seconds(lambda: precond._precondition(grads), min_run_time),
    )

    def kfac_step():
        forward_backward()
        precond.step()

    precond.inv_update_steps = 10**9  # time steps without inversion, add it amortised
    times["step"] = median_seconds(kfac_step, min_run_time) + times["inversion"] / INV_UPDATE_STEPS
    precond.remove_hooks()
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def sgd_step():
        forward_backward()
        sgd.step()

    times["sgd_step"] = median_seconds(sgd_step, min_run_time)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    min_run_time = 0.2 if args.quick else 1.0
    rows = []
    for name, (model, x) in zoo(args.quick).items():
        per_backend = {}
        for backend in ("native", "reference"):
            torch.manual_seed(0)
            per_backend[backend] = measure(model, x, backend, device, min_run_time)
            print(f"{name} {backend}: {per_backend[backend]}", file=sys.stderr)
        rows.append(dict(model=name, **{f"{b}_{k}_ms": v * 1e3 for b, t in per_backend.items() for k, v in t.items()}))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"step-{device.type}{'-quick' if args.quick else ''}"
    env = environment(device)
    (args.out / f"{stem}.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    print(f"\n{stem}: torch {env['torch']}, {env.get('gpu', env['cpu'])}, {env['threads']} threads, {env['date']}\n")
    print(table(rows))


def table(rows) -> str:
    lines = ["| model | phase | native ms | reference ms | speed-up |", "|---|---|---:|---:|---:|"]
    for r in rows:
        for phase in ("factor_update", "inversion", "precondition", "step"):
            n, ref = r[f"native_{phase}_ms"], r[f"reference_{phase}_ms"]
            lines.append(f"| {r['model']} | {phase} | {n:.2f} | {ref:.2f} | {ref / n:.2f}x |")
        sgd = r["native_sgd_step_ms"]
        lines.append(f"| {r['model']} | SGD step (overhead of K-FAC step) | {sgd:.2f} "
                     f"| | native {r['native_step_ms'] / sgd:.2f}x, reference {r['reference_step_ms'] / sgd:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
