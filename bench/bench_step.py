"""Whole preconditioner step, native vs pure-PyTorch reference, with the phase breakdown (factor
update, inversion, preconditioning) and the overhead over plain SGD.

    python bench/bench_step.py --quick                 # the zoo at small widths, < 1 min on 2 CPU cores
    python bench/bench_step.py [--device cuda]         # the zoo at full widths
    python bench/bench_step.py --realistic             # + torchvision ResNet and Hugging Face GPT-2
    python bench/bench_step.py --device cuda --realistic --models resnet,gpt2 --min-run-time 0.1

Models (--models picks and orders them by key):
  mlp          8 Linear layers of width W
  cnn          a small ResNet-style CNN (3x3 convs, two stages)
  transformer  the Linear layers of transformer blocks (qkv, proj, fc1, fc2) on [B, T, d] inputs
  resnet       torchvision ResNet-18 on 32x32 images (CPU) / ResNet-50 on 64x64 (CUDA), 10 classes,
               no pretrained weights; BatchNorm is left to SGD. On CPU its 4608-sided factors
               (layer4's 3x3 convs) make the inversion take minutes: --max-factor-dim 1200 leaves
               the large blocks to SGD for a quick look.
  gpt2         transformers.GPT2LMHeadModel: 2 layers of width 128 and a 1000-token vocabulary on
               CPU, the GPT-2 small config (12 x 768, 12 heads, 50257 tokens) on CUDA; the
               vocabulary-sized head (tied with the token embedding) is left out by max_factor_dim
               and tying; cross-entropy over the flattened [B, T, V] logits, every position counts
               (loss_mask_fn=None).
resnet and gpt2 run with --realistic or when --models names them.

Per backend, each phase is timed alone (median, torch.utils.benchmark) on the same captured batch.
"step" is forward + backward + preconditioner step, twice: with the inversion every step
(inv_update_steps=1) and amortised over inv_update_steps=10 (steps without inversion + a tenth of
the inversion). "SGD step" is forward + backward + torch.optim.SGD step, the baseline of the
overhead rows. A call slower than the minimum run time is timed once after one warm-up call.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from timing import environment, median_seconds

from kfac_ext import KFACPreconditioner

RESULTS_DIR = Path(__file__).resolve().parent / "results"
INV_UPDATE_STEPS = 10
PHASES = [
    ("factor_update", "factor_update"),
    ("inversion", "inversion"),
    ("precondition", "precondition"),
    ("step_every", "step, inversion every step"),
    ("step_amortised", f"step, inversion every {INV_UPDATE_STEPS}"),
]


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


@dataclasses.dataclass
class Workload:
    name: str  # what the table shows
    model: nn.Module
    x: torch.Tensor  # the model's one positional input
    classes: int  # size of the logits' last dim; targets are drawn from it
    options: dict = dataclasses.field(default_factory=dict)  # extra KFACPreconditioner arguments


def zoo(quick: bool) -> dict[str, Workload]:
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
        "mlp": Workload(f"mlp 8x{w}", mlp, torch.randn(batch, w), 10),
        "cnn": Workload(f"resnet c={c}", cnn, torch.randn(batch // 2, 3, 16, 16), 10),
        "transformer": Workload(f"transformer {blocks}x(d={d}, T={t})", TransformerLinears(d, blocks),
                                torch.randn(batch // 4, t, d), 10),
    }


REALISTIC = ("resnet", "gpt2")


def realistic(key: str, device_type: str) -> Workload:
    """The model of ``key`` (one of REALISTIC), sized for the device (imports only what it needs)."""
    gpu = device_type == "cuda"
    if key == "resnet":
        import torchvision

        arch, side, batch = ("resnet50", 64, 32) if gpu else ("resnet18", 32, 8)
        model = getattr(torchvision.models, arch)(weights=None, num_classes=10)
        return Workload(f"{arch} ({batch}x{side}x{side})", model, torch.randn(batch, 3, side, side), 10)
    if key == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        layers, width, heads, vocab, positions = (12, 768, 12, 50257, 1024) if gpu else (2, 128, 4, 1000, 64)
        batch, t = (8, 256) if gpu else (4, 32)
        config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=positions,
                            bos_token_id=vocab - 1, eos_token_id=vocab - 1, use_cache=False)
        model = GPT2LMHeadModel(config)
        tokens = torch.randint(0, vocab, (batch, t))
        name = f"gpt2 {layers}x{width} V={vocab} ({batch}x{t} tokens)"
        return Workload(name, model, tokens, vocab, dict(max_factor_dim=4 * width + 1, loss_mask_fn=None))
    raise KeyError(key)


def logits_of(output) -> torch.Tensor:
    """A tensor, or the ``.logits`` of a Hugging Face ``ModelOutput``."""
    return output if isinstance(output, torch.Tensor) else output.logits


def kfac_phases(precond: KFACPreconditioner) -> dict:
    """The preconditioner's phases as closures over the micro-batch the last forward + backward
    left pending in ``precond.capture``."""
    capture = precond.capture
    pending = dict(capture.pending_a), dict(capture.pending_g)
    grads = [b.grad_matrix() for b in precond.blocks]
    finite = torch.ones((), dtype=torch.bool, device=next(g for g in grads if g is not None).device)

    def factor_update():  # reduce the captured micro-batch to factor sums, then the EMA
        capture.clear()
        capture.pending_a, capture.pending_g = dict(pending[0]), dict(pending[1])
        capture.statistics.forwards = 1
        precond.update_curvature(finite)

    return dict(factor_update=factor_update, inversion=precond.update_inverses,
                precondition=lambda: precond.write_directions(grads, finite))


def seconds(fn, min_run_time: float, device: torch.device) -> float:
    """:func:`timing.median_seconds`, except that a call slower than ``min_run_time`` (a GPT-2 or
    ResNet-50 inversion) is timed once: :func:`measure` has run every path once before timing
    (its first step updates factors and inverses), so that call is warm, and a second one would
    double the longest part of a GPU run."""
    def timed() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = timed()
    if first >= min_run_time:
        return first
    return median_seconds(fn, min_run_time)


def measure(work: Workload, backend: str, device: torch.device, min_run_time: float,
            max_factor_dim: int | None = None) -> dict[str, float]:
    torch.manual_seed(0)
    model = copy.deepcopy(work.model).to(device).train()  # each backend starts from the same weights
    x = work.x.to(device)
    with torch.no_grad():
        lead = logits_of(model(x)).shape[:-1]
    y = torch.randint(0, work.classes, lead, device=device)
    options = dict(work.options)
    if max_factor_dim is not None:
        options["max_factor_dim"] = max_factor_dim
    precond = KFACPreconditioner(model, "cross_entropy", fisher_type="mc", inversion="eigen", damping=1e-2,
                                 inv_update_steps=INV_UPDATE_STEPS, backend=backend, **options)

    def forward_backward():
        model.zero_grad()
        F.cross_entropy(logits_of(model(x)).flatten(0, -2), y.flatten()).backward()

    forward_backward()
    precond.step()  # factors and inverses exist from here on
    precond.capture.held_gradient_bytes = None  # every gradient row held until step(), as the replay needs
    forward_backward()  # leaves this step's micro-batch pending for the phase timings
    times = {name: seconds(fn, min_run_time, device) for name, fn in kfac_phases(precond).items()}

    def kfac_step():
        forward_backward()
        precond.step()

    precond.inv_update_steps = 1
    times["step_every"] = seconds(kfac_step, min_run_time, device)
    precond.inv_update_steps = 10**9  # time steps without inversion, add it amortised
    times["step_amortised"] = seconds(kfac_step, min_run_time, device) + times["inversion"] / INV_UPDATE_STEPS
    precond.remove_hooks()
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def sgd_step():
        forward_backward()
        sgd.step()

    times["sgd_step"] = seconds(sgd_step, min_run_time, device)
    return times


def table_rows(r: dict) -> list[str]:
    lines = []
    for phase, label in PHASES:
        n, ref = r[f"native_{phase}_ms"], r[f"reference_{phase}_ms"]
        lines.append(f"| {r['model']} | {label} | {n:.2f} | {ref:.2f} | {ref / n:.2f}x |")
    sgd = r["native_sgd_step_ms"]
    for phase, label in PHASES[3:]:
        lines.append(f"| {r['model']} | SGD step; K-FAC {label} / SGD | {sgd:.2f} | "
                     f"| native {r[f'native_{phase}_ms'] / sgd:.2f}x, reference {r[f'reference_{phase}_ms'] / sgd:.2f}x |")
    return lines


TABLE_HEADER = ["| model | phase | native ms | reference ms | speed-up |", "|---|---|---:|---:|---:|"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the zoo at small widths")
    parser.add_argument("--realistic", action="store_true", help="add torchvision ResNet and Hugging Face GPT-2")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated keys, run in this order: mlp,cnn,transformer,{','.join(REALISTIC)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--max-factor-dim", type=int, default=None,
                        help="leave blocks with a larger factor side to SGD (overrides each model's own)")
    parser.add_argument("--rounds", type=int, choices=(1, 2), default=2,
                        help="2: measure native, reference, reference, native and keep each one's best")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    min_run_time = args.min_run_time or (0.2 if args.quick else 1.0)
    workloads = zoo(args.quick)
    known = list(workloads) + list(REALISTIC)
    keys = [k.strip() for k in args.models.split(",") if k.strip()] if args.models else \
        list(workloads) + (list(REALISTIC) if args.realistic else [])
    unknown = [k for k in keys if k not in known]
    if unknown:
        parser.error(f"--models: unknown {unknown}; known: {','.join(known)}")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"step-{device.type}{'-quick' if args.quick else ''}"
    if args.models:
        stem += "-" + "-".join(keys)
    elif args.realistic:
        stem += "-realistic"
    env = environment(device)
    print(f"{stem}: torch {env['torch']}, {env.get('gpu', env['cpu'])}, {env['threads']} threads, {env['date']}\n")
    print("\n".join(TABLE_HEADER), flush=True)
    rows = []
    for key in keys:  # rows print as they come, so a run cut short keeps what it measured
        work = workloads[key] if key in workloads else realistic(key, device.type)
        per_backend: dict[str, dict[str, float]] = {}
        # Rounds in the order N R R N, the fastest of each backend's rounds kept: a machine that
        # speeds up or slows down during the run (frequency, a neighbour) favours neither side.
        order = ("native", "reference") if args.rounds == 1 else ("native", "reference", "reference", "native")
        for backend in order:
            times = measure(work, backend, device, min_run_time, args.max_factor_dim)
            print(f"{work.name} {backend}: {times}", file=sys.stderr, flush=True)
            best = per_backend.setdefault(backend, times)
            per_backend[backend] = {k: min(v, best[k]) for k, v in times.items()}
            if device.type == "cuda":
                gc.collect()  # the preconditioner's closures hold the model in reference cycles
                torch.cuda.empty_cache()
        rows.append(dict(model=work.name, **{f"{b}_{k}_ms": v * 1e3 for b, t in per_backend.items() for k, v in t.items()}))
        print("\n".join(table_rows(rows[-1])), flush=True)
        (args.out / f"{stem}.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
