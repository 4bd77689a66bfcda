"""Character-level language model on real text: a small causal transformer, K-FAC vs AdamW.

The text is the Python documentation's topic help that ships with the standard library
(``pydoc_data.topics``: the ``topics`` dict's values concatenated in sorted key order, ~465k
characters, ~100 distinct), so nothing is downloaded. The first 90 % (by position) is the
training split, the last 10 % the validation split; batches are random contiguous windows of
``T`` characters from the training split, the next character as the target at every position.

Model: token + learned position embedding, two pre-norm ``nn.TransformerEncoderLayer`` blocks
(4 heads, feed-forward 4x, no dropout) under a causal mask, a final LayerNorm and a Linear head
to logits ``[B, T, V]``; loss the token-mean cross-entropy.

Optimizers: ``kfac_ext.KFAC(model, lr=lr, loss="cross_entropy")`` with its defaults (Adam in the
K-FAC eigenbasis; the layers it does not precondition, e.g. LayerNorm, get AdamW; the JSON keeps
its registration report) and ``torch.optim.AdamW`` with its
defaults (betas 0.9/0.999, weight decay 0.01); both at a constant learning rate, from the same
initial weights and on the same batches. Each learning rate is picked from its grid (``GRIDS``)
by the validation loss after a short tuning run (a quarter of the final run's steps, same
batches); the final run with the pick then trains for the full budget. A pick on the edge of
its grid is flagged in the output.

"Steps to target" is the first evaluation step at which the validation loss reaches the target:
the worse of the two final validation losses, so both optimizers reach it. Seconds are
training time only (evaluation excluded). Validation loss is over every non-overlapping
``T``-window of the validation split; train loss over a fixed sample of training windows.

    python bench/demo_text.py [--steps N] [--quick] [--out DIR]

About 2.7 minutes on 2 quiet CPU cores (``--quick``: about 8 s). With another process busy on
the same cores, OpenMP's spinning worker threads stall K-FAC's many small ops (steps of ~1 s
instead of ~50 ms were measured); ``OMP_WAIT_POLICY=PASSIVE`` avoids that, at about 1.6x the
time on a quiet machine.

Writes ``demo_text.json`` (config, tuning results, curves, environment) and ``demo_text.png``
(loss vs step and vs training seconds) to ``--out`` and prints a Markdown table. Exits 1 when an
optimizer raised (the error is in the table and the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if str(Path(__file__).resolve().parent) not in sys.path:  # demo, timing: also when imported from elsewhere
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import kfac_ext  # noqa: E402
from demo import Progress, time_to_target  # noqa: E402
from timing import environment  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEED = 0

# Half-decade grids, wide enough that both picks are interior at the default budget (an edge pick is
# flagged in the table).
GRIDS = {
    "K-FAC": [1e-3, 3e-3, 1e-2, 3e-2],
    "AdamW": [1e-3, 3e-3, 1e-2, 3e-2],
}


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 1000  # final run; each tuning run is steps // TUNE_FRACTION
    context: int = 64  # T
    batch: int = 32  # B windows per step
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    evals: int = 20  # evaluations along a final run
    train_eval_windows: int = 256


TUNE_FRACTION = 4
QUICK = Config(steps=40, context=32, batch=16, d_model=32, evals=4, train_eval_windows=64)


# ---- data ------------------------------------------------------------------------------------


def load_text() -> str:
    """The standard library's pydoc topic help, values in sorted key order."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


@dataclasses.dataclass
class CharData:
    """Encoded train / validation splits and the vocabulary."""

    vocab: list[str]
    train: Tensor  # [n_train] int64
    val: Tensor  # [n_val] int64

    @classmethod
    def build(cls, text: str, train_fraction: float = 0.9) -> CharData:
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        cut = int(train_fraction * len(ids))
        return cls(vocab, ids[:cut], ids[cut:])


def windows(ids: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Inputs ``[len(starts), T]`` and next-character targets of the windows at ``starts``."""
    offsets = starts[:, None] + torch.arange(context)
    return ids[offsets], ids[offsets + 1]


def random_windows(ids: Tensor, n: int, context: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    starts = torch.randint(0, len(ids) - context - 1, (n,), generator=generator)
    return windows(ids, starts, context)


def eval_sets(data: CharData, cfg: Config) -> dict[str, tuple[Tensor, Tensor]]:
    """Fixed evaluation windows: every non-overlapping window of the validation split, and a
    fixed random sample of training windows."""
    val_starts = torch.arange(0, len(data.val) - cfg.context - 1, cfg.context)
    g = torch.Generator().manual_seed(SEED + 2)
    return dict(train=random_windows(data.train, cfg.train_eval_windows, cfg.context, g),
                val=windows(data.val, val_starts, cfg.context))


# ---- model -----------------------------------------------------------------------------------


class CharTransformer(nn.Module):
    """Causal transformer: token ids ``[B, T]`` -> logits ``[B, T, V]`` (``T <= context``)."""

    def __init__(self, vocab: int, context: int, d_model: int, layers: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.0,
                                       batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = self.mask[:t, :t]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Token-mean cross-entropy of logits ``[B, T, V]`` against targets ``[B, T]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_optimizer(name: str, model: nn.Module, lr: float):
    if name == "K-FAC":
        return kfac_ext.KFAC(model, lr=lr, loss="cross_entropy")
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


# ---- training --------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, split: tuple[Tensor, Tensor], chunk: int = 256) -> float:
    """Token-mean cross-entropy (nats) over all windows of ``split``."""
    x, y = split
    model.eval()
    total = 0.0
    for i in range(0, len(x), chunk):
        logits = model(x[i : i + chunk])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i : i + chunk].reshape(-1),
                                       reduction="sum"))
    model.train()
    return total / y.numel()


def train(opt_name: str, lr: float, data: CharData, sets: dict, cfg: Config, steps: int,
          eval_every: int, tick) -> dict:
    """One run from the seeded initial weights on the seeded batch sequence. History rows are
    ``(step, training seconds, val loss, train loss)``; a non-finite training loss ends the run
    (val loss inf)."""
    torch.manual_seed(SEED)
    model = CharTransformer(len(data.vocab), cfg.context, cfg.d_model, cfg.layers, cfg.heads)
    opt = make_optimizer(opt_name, model, lr)
    batches = torch.Generator().manual_seed(SEED + 1)
    history, seconds = [], 0.0
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            history.append((step, seconds, evaluate(model, sets["val"]), evaluate(model, sets["train"])))
            tick(step)
        if step == steps:
            break
        x, y = random_windows(data.train, cfg.batch, cfg.context, batches)
        start = time.perf_counter()
        opt.zero_grad()
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - start
        if not math.isfinite(loss.item()):
            history.append((step + 1, seconds, math.inf, math.inf))
            tick(steps)
            break
    run = dict(lr=lr, history=history, val_loss=history[-1][2], train_loss=history[-1][3], seconds=seconds)
    if isinstance(opt, kfac_ext.KFAC):  # what it preconditioned, and its counters (KL-clip scale, skips)
        stats = opt.preconditioner.stats
        run["kfac"] = dict(layers=opt.preconditioner.registration_report(),
                           stats={k: v if isinstance(v, (int, float)) else str(v) for k, v in stats.items()})
    return run


def tune_and_train(opt_name: str, grid: list[float], data: CharData, sets: dict, cfg: Config,
                   progress: Progress) -> dict:
    """Short run per learning rate, pick the lowest validation loss, then the full run."""
    tune_steps = max(1, cfg.steps // TUNE_FRACTION)
    tuning = {}
    for lr in grid:
        tick = _ticker(progress, f"tune {opt_name} lr={lr:g}")
        tuning[lr] = train(opt_name, lr, data, sets, cfg, tune_steps, tune_steps, tick)["val_loss"]
    pick = min(grid, key=lambda lr: tuning[lr] if math.isfinite(tuning[lr]) else math.inf)
    eval_every = max(1, cfg.steps // cfg.evals)
    tick = _ticker(progress, f"final {opt_name} lr={pick:g}")
    final = train(opt_name, pick, data, sets, cfg, cfg.steps, eval_every, tick)
    final["tuning"] = {f"{lr:g}": v for lr, v in tuning.items()}
    final["edge"] = len(grid) > 1 and pick in (grid[0], grid[-1])
    return final


def _ticker(progress: Progress, label: str):
    last = [0]

    def tick(step: int) -> None:
        progress.advance(label, step - last[0])
        last[0] = step

    return tick


# ---- output ----------------------------------------------------------------------------------


def report(results: dict, cfg: Config, n_params: int) -> str:
    env = environment(torch.device("cpu"))
    done = {name: r for name, r in results.items() if "error" not in r}
    target = max((r["val_loss"] for r in done.values() if math.isfinite(r["val_loss"])), default=math.nan)
    lines = [
        f"char-level transformer on pydoc_data.topics: {cfg.layers} layers, d_model {cfg.d_model}, "
        f"{n_params} parameters, T={cfg.context}, batch {cfg.batch}, {cfg.steps} steps; "
        f"torch {env['torch']}, {env['threads']} CPU threads, {env['date']}",
        "",
        f"target val loss {target:.4f} (the worse final val loss)",
        "",
        "| optimizer | lr | train loss | val loss | val bits/char | steps to target | s to target | total s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | - | error: {r['error']} | | | | | |")
            continue
        step, sec = time_to_target([(s, t, v) for s, t, v, _ in r["history"]], target)
        lr = f"{r['lr']:g}" + (" (grid edge)" if r["edge"] else "")
        lines.append(
            f"| {name} | {lr} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['val_loss'] / math.log(2):.3f} "
            f"| {step if step is not None else '-'} | {f'{sec:.1f}' if sec is not None else '-'} | {r['seconds']:.1f} |"
        )
    lines += ["", f"lr tuning (val loss after {max(1, cfg.steps // TUNE_FRACTION)} steps):"]
    for name, r in results.items():
        if "tuning" in r:
            grid = ", ".join(f"{lr}: {v:.4f}" for lr, v in r["tuning"].items())
            lines.append(f"- {name}: {grid} -> pick {r['lr']:g}" + (" (edge of the grid)" if r["edge"] else ""))
    return "\n".join(lines)


def plot(results: dict, path: Path, vocab: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, r) in enumerate(results.items()):
        if "error" in r:
            continue
        steps, secs, val, train_loss = zip(*r["history"])
        color = f"C{i}"
        for ax, x in zip(axes, (steps, secs)):
            ax.plot(x, val, color=color, label=f"{name} val (lr={r['lr']:g})")
            ax.plot(x, train_loss, color=color, ls="--", alpha=0.6, label=f"{name} train")
    for ax, xlabel in zip(axes, ("step", "training seconds")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cross-entropy (nats/char)")
        ax.set_title("char transformer, pydoc topics")
        ax.set_ylim(top=math.log(vocab))  # the uniform guess; the first evaluation (random init) sits above
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- entry point -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """Runs the demo; returns ``{optimizer: final run}`` (``{"error": ...}`` for one that raised)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None,
                        help=f"final-run steps (default {Config.steps}; tuning runs 1/{TUNE_FRACTION} of it)")
    parser.add_argument("--quick", action="store_true", help="tiny model and budget: a smoke run of ~10 s")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    wall = time.perf_counter()
    data = CharData.build(load_text())
    sets = eval_sets(data, cfg)
    tune_steps = max(1, cfg.steps // TUNE_FRACTION)
    progress = Progress(sum(len(g) * tune_steps + cfg.steps for g in GRIDS.values()))
    results = {}
    for name, grid in GRIDS.items():
        try:
            results[name] = tune_and_train(name, grid, data, sets, cfg, progress)
        except Exception as exc:  # an optimizer that cannot handle this model: report, keep going
            results[name] = dict(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    print(file=sys.stderr)
    model = CharTransformer(len(data.vocab), cfg.context, cfg.d_model, cfg.layers, cfg.heads)
    n_params = sum(p.numel() for p in model.parameters())
    table = report(results, cfg, n_params)
    args.out.mkdir(parents=True, exist_ok=True)
    record = dict(environment=environment(torch.device("cpu")), config=dataclasses.asdict(cfg),
                  grids=GRIDS, tune_steps=tune_steps, vocab=len(data.vocab),
                  chars=dict(train=len(data.train), val=len(data.val)), n_params=n_params,
                  history_columns=["step", "seconds", "val_loss", "train_loss"], results=results,
                  wall_seconds=time.perf_counter() - wall)
    (args.out / "demo_text.json").write_text(json.dumps(record, indent=1))
    plot(results, args.out / "demo_text.png", len(data.vocab))
    print(table)
    print(f"\nplot: {args.out / 'demo_text.png'}  wall {record['wall_seconds']:.0f} s")
    return results


if __name__ == "__main__":
    sys.exit(1 if any("error" in r for r in main().values()) else 0)
