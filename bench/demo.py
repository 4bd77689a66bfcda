"""Training demo on real data that ships with scikit-learn: the 1797 handwritten digits (8x8).

Two tasks, three optimizers (K-FAC, SGD with momentum, Adam), same initial weights and batch
order; each optimizer's learning rate is the best (lowest final loss on the held-out validation
split) of a small grid; test numbers come from a split never used for selection.

1. the deep autoencoder 64-256-128-32-128-256-64 (tanh, sigmoid-cross-entropy reconstruction),
   the classic K-FAC benchmark of Martens & Grosse (2015), on digits instead of MNIST;
2. a classifier 64-128-128-10 (ReLU, cross-entropy).

"Time to target" is the first iteration / training second (evaluation excluded) at which the
full-training-set loss reaches the target: the worst of the three optimizers' final training
losses, so every optimizer reaches it.

    python bench/demo.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import kfac_ext
from timing import environment

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEED = 0
BATCH = 128

# Half-decade grids wide enough that no task's pick sits on an edge (checked in bench/RESULTS.md).
GRIDS = {
    "K-FAC": [0.01, 0.03, 0.1, 0.3, 1.0],
    "SGD-momentum": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
    "Adam": [1e-3, 3e-3, 1e-2, 3e-2],
}
# The SGD + KL clip rule, tuned for these small MLPs (the digits demo predates the eigenbasis-Adam
# default; bench/time_to_target.py compares the rules on the autoencoder).
KFAC_SETTINGS = dict(update="sgd", momentum=0.9, fisher_type="mc", inversion="eigen", damping=3e-2,
                     factor_decay=0.95, inv_update_steps=10, kl_clip=1e-2)


def load_splits():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
    x, y = x[perm], y[perm]
    n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    cut = [0, n_train, n_train + n_val, len(x)]
    return {name: (x[a:b], y[a:b]) for name, a, b in zip(("train", "val", "test"), cut, cut[1:])}


TASKS = {
    "autoencoder": dict(
        build=lambda: _mlp([64, 256, 128, 32, 128, 256, 64], nn.Tanh),
        loss=lambda out, x, y: F.binary_cross_entropy_with_logits(out, x),
        kfac_loss="bce_with_logits",
    ),
    "classifier": dict(
        build=lambda: _mlp([64, 128, 128, 10], nn.ReLU),
        loss=lambda out, x, y: F.cross_entropy(out, y),
        kfac_loss="cross_entropy",
    ),
}


def _mlp(sizes, act):
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def make_optimizer(name, model, lr, task):
    if name == "K-FAC":
        return kfac_ext.KFAC(model, lr=lr, loss=task["kfac_loss"], **KFAC_SETTINGS)
    if name == "SGD-momentum":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=lr)


@torch.no_grad()
def full_loss(model, task, split):
    x, y = split
    model.eval()
    out = model(x)
    model.train()
    loss = float(task["loss"](out, x, y))
    acc = float((out.argmax(1) == y).float().mean()) if out.shape[1] == 10 else None
    return loss, acc


def train(task, opt_name, lr, splits, steps, eval_every, progress):
    torch.manual_seed(SEED)
    model = task["build"]()
    opt = make_optimizer(opt_name, model, lr, task)
    x_train, y_train = splits["train"]
    order = torch.Generator().manual_seed(SEED + 1)
    history, seconds = [], 0.0
    perm, pos = torch.randperm(len(x_train), generator=order), 0
    for it in range(steps + 1):
        if it % eval_every == 0 or it == steps:
            history.append((it, seconds, full_loss(model, task, splits["train"])[0]))
            progress(it)
        if it == steps:
            break
        if pos + BATCH > len(perm):
            perm, pos = torch.randperm(len(x_train), generator=order), 0
        idx = perm[pos : pos + BATCH]
        pos += BATCH
        start = time.perf_counter()
        opt.zero_grad()
        task["loss"](model(x_train[idx]), x_train[idx], y_train[idx]).backward()
        opt.step()
        seconds += time.perf_counter() - start
    return model, history


class Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def advance(self, label: str, steps: int = 0) -> None:
        self.done += steps
        frac = self.done / self.total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        elapsed = time.perf_counter() - self.start
        print(f"\r[{bar}] {100 * frac:5.1f}% {elapsed:6.1f}s {label:40.40s}", end="", file=sys.stderr, flush=True)


def time_to_target(history, target):
    for it, sec, loss in history:
        if loss <= target:
            return it, sec
    return None, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training iterations per run")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    splits = load_splits()
    eval_every = max(1, args.steps // 40)
    runs = sum(len(g) for g in GRIDS.values()) * len(TASKS)
    progress = Progress(runs * args.steps)
    results = {}
    for task_name, task in TASKS.items():
        results[task_name] = {}
        for opt_name, grid in GRIDS.items():
            best = None
            for lr in grid:
                last = [0]

                def tick(it, label=f"{task_name} {opt_name} lr={lr}"):
                    progress.advance(label, it - last[0])
                    last[0] = it

                model, history = train(task, opt_name, lr, splits, args.steps, eval_every, tick)
                val = full_loss(model, task, splits["val"])[0]
                if best is None or val < best["val_loss"] or not torch.isfinite(torch.tensor(best["val_loss"])):
                    test_loss, test_acc = full_loss(model, task, splits["test"])
                    best = dict(lr=lr, val_loss=val, history=history, train_loss=history[-1][2],
                                test_loss=test_loss, test_acc=test_acc, seconds=history[-1][1])
            results[task_name][opt_name] = best
    print(file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    table = report(results)
    (args.out / "demo.json").write_text(json.dumps(dict(environment=environment(torch.device("cpu")), results=results), indent=1))
    plot(results, args.out / "demo.png")
    print(table)
    print(f"\nplot: {args.out / 'demo.png'}")


def report(results) -> str:
    env = environment(torch.device("cpu"))
    lines = [f"digits demo: torch {env['torch']}, {env['threads']} CPU threads, {env['date']}", ""]
    for task_name, per_opt in results.items():
        target = max(r["train_loss"] for r in per_opt.values())
        lines += [f"### {task_name} (target train loss {target:.4f})", "",
                  "| optimizer | lr | train loss | test loss | test acc | iters to target | s to target | total s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for opt_name, r in per_opt.items():
            it, sec = time_to_target(r["history"], target)
            acc = f"{100 * r['test_acc']:.1f}%" if r["test_acc"] is not None else "-"
            lines.append(f"| {opt_name} | {r['lr']:g} | {r['train_loss']:.4f} | {r['test_loss']:.4f} | {acc} "
                         f"| {it} | {sec:.2f} | {r['seconds']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.6 * len(results)), squeeze=False)
    for row, (task_name, per_opt) in zip(axes, results.items()):
        for opt_name, r in per_opt.items():
            its, secs, losses = zip(*r["history"])
            row[0].plot(its, losses, label=f"{opt_name} (lr={r['lr']:g})")
            row[1].plot(secs, losses, label=opt_name)
        for ax, xlabel in zip(row, ("iteration", "training seconds")):
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("train loss")
            ax.set_title(task_name)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
