"""Time to target: K-FAC's update rules against a tuned AdamW and second-order peers, by
AlgoPerf's protocol at small scale.

Workloads (CPU sizes; ``--size large`` multiplies widths and batches for a GPU):

* ``char-transformer``: the character transformer of ``bench/demo_text.py`` (2 pre-norm
  ``nn.TransformerEncoderLayer``, d=64, T=64, B=32) on the standard library's pydoc text;
* ``gpt2-tied``: a Hugging Face ``GPT2LMHeadModel`` config (2 layers, d=64, 4 heads, tied input and
  output embedding, LayerNorms) on the same text, character tokens;
* ``autoencoder``: the digits autoencoder 64-256-128-32-128-256-64 of ``bench/demo.py``;
* ``convnet-bn``: a small convnet with BatchNorm classifying the 8x8 digits.

Protocol: every optimizer's learning rate is swept on a grid of five values a factor 3 apart
(:data:`GRIDS`), and for the Adam-based ones Adam's β2 on :data:`BETA2_GRIDS` (its default, 0.999,
and the 0.95 language-model runs use: on these short runs it makes AdamW itself reach much lower
losses, so a baseline tuned on lr alone would be a weak one), on seed 0, each run compared by its
final validation loss. The sweep walks each grid from its middle toward lower losses and stops
at the first rise (:func:`grid_walk`): the full grid's pick wherever the loss is unimodal in the
lr, which it was in every full sweep recorded, in about 60 % of the runs. The target is the tuned
AdamW's final validation loss at the step budget; the picks then run again on seeds
0..``--seeds``-1 (``--quick``: lr only, default β2), all optimizers' runs of a seed interleaved
step by step, so that their seconds meet the same machine state (on a shared machine, runs one
after another were ±20-30 % apart in seconds). Steps and seconds to
target are the first evaluation at or below the target (training wall-clock only: evaluation
excluded), averaged over the seeds that reach it; ratios are against AdamW's. Every run sees
the same initial weights and batches for a given seed.

Optimizers: ``AdamW`` (``torch.optim.AdamW``, no weight decay); ``K-FAC`` (``kfac_ext.KFAC``
with its defaults: Adam in the K-FAC eigenbasis); ``SOAP`` (``pytorch_optimizer``'s, when it is
installed: ``requirements-dev.txt`` has it); on request (``--optimizers``), ``K-FAC adamw``
(the K-FAC direction into AdamW: in every run since β2 is swept, 2026-12-06 05:32 on in
bench/RESULTS.md, no sooner than ``K-FAC`` at any target), ``K-FAC sgd`` (SGD + KL clip, the
pre-2026-12 rule) and ``K-FAC graft`` (the K-FAC direction with Adam's per-parameter step
length, ``bench/grafting.py``).

    python bench/time_to_target.py [--quick] [--workloads a,b] [--optimizers a,b] [--seeds N]

About 10–15 minutes on 2 AMD EPYC cores (``--quick``: about 1 minute). Writes
``time_to_target.json`` and ``time_to_target.png`` (validation loss vs training seconds and vs
steps, each optimizer's pick on seed 0) under ``--out`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import kfac_ext  # noqa: E402
from timing import environment  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ADAM_GRID = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
GRIDS = {
    "AdamW": ADAM_GRID,
    "K-FAC": ADAM_GRID,
    "K-FAC adamw": ADAM_GRID,
    "K-FAC sgd": [0.01, 0.03, 0.1, 0.3, 1.0],
    "K-FAC graft": ADAM_GRID,
    "SOAP": ADAM_GRID,
}
#: Adam's β2 values swept with the learning rate (the first: the optimizer's default); None: no β2
BETA2_GRIDS = {"AdamW": (0.999, 0.95), "K-FAC": (0.999, 0.95), "K-FAC adamw": (0.999, 0.95), "SOAP": (0.95, 0.999)}
BETA1 = {"SOAP": 0.95}  # SOAP's default; 0.9 for the others


@dataclasses.dataclass
class Workload:
    """``make(seed)`` builds the model; ``batch(step, seed)`` the step's ``(input, target)``;
    ``loss(output, input, target)`` the training loss; ``validate(model)`` the validation loss;
    ``kfac_loss`` what K-FAC is told the loss is."""

    make: Callable[[int], nn.Module]
    batch: Callable[[int, int], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor, Tensor], Tensor]
    validate: Callable[[nn.Module], float]
    kfac_loss: str
    steps: int
    evals: int = 30


# ---- workloads -------------------------------------------------------------------------------


def _text_workload(kind: str, steps: int, scale: int, device: torch.device) -> Workload:
    import demo_text as dt

    data = dt.CharData.build(dt.load_text())
    context, batch = 64, 32 * scale
    val_starts = torch.arange(0, len(data.val) - context - 1, context)[:256 * scale]
    val = tuple(t.to(device) for t in dt.windows(data.val, val_starts, context))
    d, vocab = 64 * scale, len(data.vocab)

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if kind == "char":
            return dt.CharTransformer(vocab, context, d, 2, 4).to(device)
        return _HFLogits(_gpt2(vocab, context, d)).to(device)

    def batch_of(step: int, seed: int):
        g = torch.Generator().manual_seed(1000 * seed + step)
        return tuple(t.to(device) for t in dt.random_windows(data.train, batch, context, g))

    def validate(model: nn.Module) -> float:
        return dt.evaluate(model, val)

    return Workload(make, batch_of, lambda out, x, y: dt.lm_loss(out, y), validate, "cross_entropy", steps)


class _HFLogits(nn.Module):
    """A Hugging Face causal LM as a module of token ids returning ``[B, T, V]`` logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids).logits


def _gpt2(vocab: int, context: int, d: int) -> nn.Module:
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=d, n_head=4, vocab_size=vocab, n_positions=context,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0, tie_word_embeddings=True)
    return transformers.GPT2LMHeadModel(config)


def _digits_workload(kind: str, steps: int, scale: int, device: torch.device) -> Workload:
    import demo

    splits = demo.load_splits()
    x_train, y_train = (t.to(device) for t in splits["train"])
    x_val, y_val = (t.to(device) for t in splits["val"])
    batch = 128

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if kind == "autoencoder":
            return demo._mlp([64, 256 * scale, 128 * scale, 32, 128 * scale, 256 * scale, 64], nn.Tanh).to(device)
        c = 16 * scale
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                             nn.Conv2d(c, 2 * c, 3, padding=1, stride=2), nn.BatchNorm2d(2 * c), nn.ReLU(),
                             nn.Flatten(), nn.Linear(2 * c * 16, 10)).to(device)

    def batch_of(step: int, seed: int):
        g = torch.Generator().manual_seed(1000 * seed + step)
        idx = torch.randint(0, len(x_train), (batch,), generator=g).to(device)
        return x_train[idx], y_train[idx]

    if kind == "autoencoder":
        def loss(out, x, y):
            return F.binary_cross_entropy_with_logits(out, x)
    else:
        def loss(out, x, y):
            return F.cross_entropy(out, y)

    @torch.no_grad()
    def validate(model: nn.Module) -> float:
        model.eval()
        value = float(loss(model(x_val), x_val, y_val))
        model.train()
        return value

    kfac_loss = "bce_with_logits" if kind == "autoencoder" else "cross_entropy"
    return Workload(make, batch_of, loss, validate, kfac_loss, steps)


WORKLOADS: dict[str, Callable[[int, int, torch.device], Workload]] = {
    "char-transformer": lambda *args: _text_workload("char", *args),
    "gpt2-tied": lambda *args: _text_workload("gpt2", *args),
    "autoencoder": lambda *args: _digits_workload("autoencoder", *args),
    "convnet-bn": lambda *args: _digits_workload("convnet", *args),
}
STEPS = {"char-transformer": 300, "gpt2-tied": 300, "autoencoder": 300, "convnet-bn": 200}


# ---- optimizers ------------------------------------------------------------------------------


def make_optimizer(name: str, model: nn.Module, lr: float, kfac_loss: str, beta2: float | None = None):
    adam = {} if beta2 is None else dict(betas=(BETA1.get(name, 0.9), beta2))
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, **adam)
    if name == "K-FAC":
        return kfac_ext.KFAC(model, lr=lr, loss=kfac_loss, **adam)
    if name == "K-FAC adamw":
        return kfac_ext.KFAC(model, lr=lr, loss=kfac_loss, update="adamw", **adam)
    if name == "K-FAC sgd":
        return kfac_ext.KFAC(model, lr=lr, loss=kfac_loss, update="sgd")
    if name == "K-FAC graft":
        from grafting import GraftedKFAC

        return GraftedKFAC(model, lr, kfac_loss)
    if name == "SOAP":
        import pytorch_optimizer

        return pytorch_optimizer.SOAP(model.parameters(), lr=lr, weight_decay=0.0, **adam)
    raise ValueError(f"unknown optimizer {name!r}")


#: Run unless --optimizers says otherwise (K-FAC's other rules on request: the whole protocol stays
#: within 15 minutes on 2 CPU cores).
DEFAULT_OPTIMIZERS = ["AdamW", "K-FAC", "SOAP"]


def available_optimizers() -> list[str]:
    names = list(DEFAULT_OPTIMIZERS)
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        names.remove("SOAP")
    return names


# ---- runs ------------------------------------------------------------------------------------


class Run:
    """One optimizer's run on a workload, stepped from outside: ``history`` rows are (step,
    training seconds, validation loss), from step 0 (``final_only``: the last step's row only).
    A non-finite loss ends it (validation loss inf)."""

    def __init__(self, work: Workload, name: str, lr: float, seed: int, beta2: float | None = None,
                 final_only: bool = False):
        self.work, self.name, self.lr, self.seed, self.beta2 = work, name, lr, seed, beta2
        self.model = work.make(seed)
        self.opt = make_optimizer(name, self.model, lr, work.kfac_loss, beta2)
        self.every = work.steps if final_only else max(1, work.steps // work.evals)
        self.history = [] if final_only else [(0, 0.0, work.validate(self.model))]
        self.seconds, self.done = 0.0, False

    def step(self, step: int) -> None:
        x, y = self.work.batch(step, self.seed)
        start = time.perf_counter()
        self.opt.zero_grad()
        loss = self.work.loss(self.model(x), x, y)
        loss.backward()
        self.opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()  # the step's kernels belong to the step's time
        self.seconds += time.perf_counter() - start
        if not math.isfinite(loss.item()):
            self.history.append((step, self.seconds, math.inf))
            self.done = True
        elif step % self.every == 0 or step == self.work.steps:
            value = self.work.validate(self.model)
            self.history.append((step, self.seconds, value if math.isfinite(value) else math.inf))

    def result(self) -> dict:
        return dict(optimizer=self.name, lr=self.lr, beta2=self.beta2, seed=self.seed, history=self.history,
                    final=self.history[-1][2], ms_per_step=1e3 * self.seconds / max(1, self.history[-1][0]))


def train(work: Workload, name: str, lr: float, seed: int, beta2: float | None = None,
          final_only: bool = False) -> dict:
    """One run (training seconds only; ``beta2``: Adam's, where not the default; ``final_only``:
    the validation loss at the last step only, all a sweep compares)."""
    run = Run(work, name, lr, seed, beta2, final_only)
    for step in range(1, work.steps + 1):
        if run.done:
            break
        run.step(step)
    return run.result()


def train_interleaved(work: Workload, picks: list[tuple[str, float, float | None]], seed: int) -> list[dict]:
    """The runs of ``picks`` (name, lr, beta2) in lockstep: step ``t`` of every optimizer, in an
    order that rotates with ``t``, before step ``t + 1`` of any. Each one's seconds are its own
    steps', but all of them meet the same machine state: on a shared machine a neighbour's load
    no longer lands on whichever optimizer happened to run at the time."""
    runs = [Run(work, name, lr, seed, beta2) for name, lr, beta2 in picks]
    for step in range(1, work.steps + 1):
        shift = step % len(runs)
        for run in runs[shift:] + runs[:shift]:
            if not run.done:
                run.step(step)
    return [run.result() for run in runs]


def to_target(history: list, target: float) -> tuple[int | None, float | None]:
    for step, seconds, loss in history:
        if loss <= target:
            return step, seconds
    return None, None


def grid_walk(size: int, start: int, loss: Callable[[int], float]) -> int:
    """The index of the least ``loss(i)`` on a grid of ``size`` points, probed from ``start``
    toward the lower neighbour and stopped at the first point no lower than the last: the
    grid's minimum where the loss is unimodal in the index, at 3 probes when ``start`` is it
    (``loss`` is called again for points already probed: memoize it)."""
    best = start
    step = 1 if start + 1 < size and loss(start + 1) < loss(start) else -1
    while 0 <= best + step < size and loss(best + step) < loss(best):
        best += step
    return best


def sweep(key: str, work: Workload, name: str, beta2s: tuple, progress) -> list[dict]:
    """Seed 0's runs of ``name`` over its lr grid for each of ``beta2s``: a :func:`grid_walk` from
    the grid's middle, for a later β2 from the lr the one before picked. Each run evaluates its
    final loss only. The final loss has been unimodal in the lr on every grid this benchmark
    recorded (6 full sweeps of 4 workloads, 4 optimizers, 2 β2s: the walk picks the same lr
    as the full grid at 61 % of its runs)."""
    grid, runs = GRIDS[name], []
    start = len(grid) // 2
    for beta2 in beta2s:
        finals: dict[int, float] = {}

        def final(i: int, beta2=beta2, finals=finals) -> float:
            if i not in finals:
                runs.append(train(work, name, grid[i], 0, None if beta2 == beta2s[0] else beta2, final_only=True))
                finals[i] = runs[-1]["final"]
                progress(f"{key} {name} lr={grid[i]:g} beta2={beta2}")
            return finals[i]

        start = grid_walk(len(grid), start, final)
    return runs


def run_workload(key: str, work: Workload, optimizers: list[str], seeds: int, progress, sweep_beta2: bool = True
                 ) -> dict:
    grid_runs = {name: sweep(key, work, name, BETA2_GRIDS.get(name, (None,)) if sweep_beta2 else (None,), progress)
                 for name in optimizers}
    picks = {name: min(runs, key=lambda r: r["final"]) for name, runs in grid_runs.items()}
    target = picks["AdamW"]["final"]
    # The picks again, every seed, interleaved step by step: the seconds compared side by side
    # (the sweep's runs, one after another, saw whatever load the machine had at their time).
    specs = [(name, picks[name]["lr"], picks[name]["beta2"]) for name in optimizers]
    by_seed = [train_interleaved(work, specs, seed) for seed in range(seeds)]
    progress(f"{key} picks interleaved, {seeds} seed(s)")
    rows = {}
    for k, name in enumerate(optimizers):
        pick = picks[name]
        runs = [results[k] for results in by_seed]
        reached = [to_target(r["history"], target) for r in runs]
        hit = [(s, t) for s, t in reached if s is not None]
        rows[name] = dict(lr=pick["lr"], beta2=pick["beta2"], edge=pick["lr"] in (GRIDS[name][0], GRIDS[name][-1]),
                          finals=[r["final"] for r in runs], ms_per_step=sum(r["ms_per_step"] for r in runs) / len(runs),
                          reached=len(hit), seeds=len(runs),
                          steps_to_target=sum(s for s, _ in hit) / len(hit) if hit else None,
                          seconds_to_target=sum(t for _, t in hit) / len(hit) if hit else None,
                          history=runs[0]["history"])
    grid = {name: [(r["lr"], r["beta2"], r["final"]) for r in runs] for name, runs in grid_runs.items()}
    return dict(target=target, rows=rows, grid=grid, steps=work.steps)


def markdown(key: str, result: dict) -> str:
    base = result["rows"]["AdamW"]
    lines = [f"**{key}** ({result['steps']} steps; target {result['target']:.4f} = tuned AdamW's final "
             "validation loss)", "",
             "| optimizer | lr | final val loss (seeds) | reached | steps to target | vs AdamW | s to target | vs AdamW | ms/step |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        finals = ", ".join(f"{v:.3f}" for v in r["finals"])
        steps = f"{r['steps_to_target']:.0f}" if r["steps_to_target"] is not None else "—"
        secs = f"{r['seconds_to_target']:.2f}" if r["seconds_to_target"] is not None else "—"
        step_ratio = _ratio(r["steps_to_target"], base["steps_to_target"])
        time_ratio = _ratio(r["seconds_to_target"], base["seconds_to_target"])
        beta2 = f", β2 {r['beta2']:g}" if r.get("beta2") is not None else ""
        lr = f"{r['lr']:g}{' (edge)' if r['edge'] else ''}{beta2}"
        lines.append(f"| {name} | {lr} | {finals} | {r['reached']}/{r['seeds']} | {steps} | {step_ratio} | {secs} "
                     f"| {time_ratio} | {r['ms_per_step']:.1f} |")
    return "\n".join(lines)


def _ratio(value, base) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "—"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(4.2 * len(results), 6.5), squeeze=False)
    for col, (key, result) in enumerate(results.items()):
        for name, r in result["rows"].items():
            steps, secs, losses = zip(*[h for h in r["history"] if math.isfinite(h[2])])
            axes[0][col].plot(secs, losses, label=f"{name} ({r['lr']:g})")
            axes[1][col].plot(steps, losses, label=name)
        for row, xlabel in ((0, "training seconds"), (1, "steps")):
            ax = axes[row][col]
            ax.axhline(result["target"], color="k", lw=0.8, ls="--")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation loss")
            ax.set_ylim(result["target"] * 0.9, result["rows"]["AdamW"]["history"][0][2] * 1.05)
        axes[0][col].set_title(key, fontsize=9)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- profile ---------------------------------------------------------------------------------

#: on factor steps K-FAC's hooks reduce the layers' inputs and output gradients to A and G sums in the backward
FORWARD_BACKWARD = "forward + backward (K-FAC: with capture hooks, the factor GEMMs on factor steps)"
KFAC_PHASES = {  # KFACPreconditioner phase -> what it does under the default rule
    "gradients": "gather gradients [W, b], finiteness flag",
    "update_curvature": "factor update: rows no backward reduced yet (GEMMs), moving average",
    "update_inverses": "eigendecompositions of A and G",
    "write_directions": "rotate, Adam in the eigenbasis (moments into a new basis), rotate back, write .grad",
}


def profile(work: Workload, steps: int, block: int = 25) -> dict:
    """Where a default K-FAC step's time goes over the whole step budget (early refreshes
    included), next to AdamW on the same batches. The two alternate in blocks of ``block`` steps
    so that both see the same machine state; the phases are timed by wrapping the
    preconditioner's methods (the remainder of ``step()`` is the other parameters' update —
    AdamW, or Adam in a blockless matrix's own gradient basis — the parameter move and Python)."""
    runs = {}
    for name in ("AdamW", "K-FAC"):
        model = work.make(0)
        opt = make_optimizer(name, model, 1e-3, work.kfac_loss)
        timers = dict.fromkeys([FORWARD_BACKWARD, "optimizer step"], 0.0)
        if name == "K-FAC":
            for attr, label in KFAC_PHASES.items():
                owner = opt.preconditioner.topology if attr == "gradients" else opt.preconditioner
                timers[label] = 0.0
                setattr(owner, attr, _timed(getattr(owner, attr), label, timers))
        runs[name] = dict(model=model, opt=opt, timers=timers)
    for start in range(1, steps + 1, block):
        for run in runs.values():
            for step in range(start, min(start + block, steps + 1)):
                x, y = work.batch(step, 0)
                t0 = time.perf_counter()
                run["opt"].zero_grad()
                work.loss(run["model"](x), x, y).backward()
                _sync(x)
                t1 = time.perf_counter()
                run["opt"].step()
                _sync(x)
                run["timers"][FORWARD_BACKWARD] += t1 - t0
                run["timers"]["optimizer step"] += time.perf_counter() - t1
    return {name: {k: 1e3 * v / steps for k, v in run["timers"].items()} for name, run in runs.items()}


def _timed(fn, label: str, timers: dict):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        timers[label] += time.perf_counter() - start
        return result
    return timed


def _sync(x: Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize()


def profile_markdown(key: str, steps: int, result: dict) -> str:
    adamw, kfac = result["AdamW"], result["K-FAC"]
    phases = sum(v for k, v in kfac.items() if k in KFAC_PHASES.values())
    total_a, total_k = sum(adamw.values()), sum(kfac.values()) - phases  # the phases are inside the step
    lines = [f"**{key}**: ms per step averaged over steps 1-{steps} (K-FAC's defaults; AdamW alongside)", "",
             "| part | AdamW ms | K-FAC ms |", "|---|---:|---:|"]
    for label in kfac:
        if label == "optimizer step":
            lines.append(f"| optimizer step, of which: | {adamw[label]:.2f} | {kfac[label]:.2f} |")
        elif label in adamw:
            lines.append(f"| {label} | {adamw[label]:.2f} | {kfac[label]:.2f} |")
        else:
            lines.append(f"| &nbsp;&nbsp;{label} | | {kfac[label]:.2f} |")
    lines.append(f"| &nbsp;&nbsp;rest: other parameters (AdamW; Adam in a blockless matrix's own basis), parameter move, Python | | "
                 f"{kfac['optimizer step'] - phases:.2f} |")
    lines.append(f"| **step total** | **{total_a:.2f}** | **{total_k:.2f}** ({total_k / total_a:.2f}x) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50-step runs, 2 workloads, 1 seed (a smoke run)")
    parser.add_argument("--workloads", default=None, help=f"comma-separated, from {','.join(WORKLOADS)}")
    parser.add_argument("--optimizers", default=None, help=f"comma-separated, from {','.join(GRIDS)}")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--size", choices=("small", "large"), default="small")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--profile", action="store_true",
                        help="instead: where a default K-FAC step's time goes, next to AdamW (no sweep)")
    args = parser.parse_args(argv)
    keys = args.workloads.split(",") if args.workloads else list(WORKLOADS)
    if args.quick and not args.workloads:
        keys = ["char-transformer", "autoencoder"]
    optimizers = args.optimizers.split(",") if args.optimizers else available_optimizers()
    if "AdamW" not in optimizers:
        optimizers = ["AdamW"] + optimizers  # the target comes from it
    seeds = 1 if args.quick else args.seeds
    scale = 4 if args.size == "large" else 1
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message=r"KFACPreconditioner: block .* produced one row")
    start = time.perf_counter()

    def progress(label: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {label}", file=sys.stderr, flush=True)

    if args.profile:
        for key in keys:
            steps = 50 if args.quick else STEPS[key]
            print(profile_markdown(key, steps, profile(WORKLOADS[key](steps, scale, device), steps)) + "\n", flush=True)
        return
    results = {}
    for key in keys:
        work = WORKLOADS[key](50 if args.quick else STEPS[key], scale, device)
        results[key] = run_workload(key, work, optimizers, seeds, progress, sweep_beta2=not args.quick)
        print(markdown(key, results[key]) + "\n", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)  # after each workload: a cut-off run keeps its tables
        (args.out / "time_to_target.json").write_text(json.dumps(
            dict(environment=environment(device), size=args.size, grids=GRIDS, beta2_grids=BETA2_GRIDS,
                 results=results), indent=1))
    plot(results, args.out / "time_to_target.png")
    print(f"time_to_target: {time.perf_counter() - start:.0f} s, {args.out}/time_to_target.png")


if __name__ == "__main__":
    main()
