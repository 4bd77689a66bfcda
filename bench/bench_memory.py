"""Peak host memory of one K-FAC step with gradient accumulation, on the [B, T, d] transformer
stack of bench_step.py: every micro-batch is reduced to factor sums as the next one starts, so the
peak should not grow with the number of micro-batches k.

    python bench/bench_memory.py [--d 256 --blocks 4 --batch 32 --tokens 64]

Each (mode, k) runs in a fresh process (peak RSS is per process): build the model and data, take
three steps of k micro-batches (forward, backward) + the optimizer, report the peak resident set
size above the resident size before the first step. Modes: plain AdamW (the floor), KFAC with its
defaults, and KFACPreconditioner with Monte Carlo factors (:data:`MODES`). Run it against another checkout of kfac_ext
with PYTHONPATH to compare.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


MODES = {
    "plain AdamW": "torch.optim.AdamW alone: what training holds without K-FAC",
    "KFAC (defaults)": "kfac_ext.KFAC(model, lr=1e-3, loss='cross_entropy'): eigenbasis Adam, empirical factors",
    "KFACPreconditioner (mc)": "KFACPreconditioner(model, 'cross_entropy') + SGD: Monte Carlo factors, sampled backward",
}


def one_run(args) -> dict:
    import torch
    import torch.nn.functional as F
    from bench_step import TransformerLinears

    import kfac_ext

    torch.manual_seed(0)
    model = TransformerLinears(args.d, args.blocks)
    if args.mode == "plain AdamW":
        opt, precond = torch.optim.AdamW(model.parameters(), lr=1e-3), None
    elif args.mode == "KFAC (defaults)":
        opt = kfac_ext.KFAC(model, lr=1e-3, loss="cross_entropy", grad_accumulation_steps=args.k)
        precond = None  # inside opt.step()
    else:
        precond = kfac_ext.KFACPreconditioner(model, "cross_entropy", grad_accumulation_steps=args.k)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = [(torch.randn(args.batch, args.tokens, args.d), torch.randint(0, 10, (args.batch,))) for _ in range(args.k)]
    before = resident_mib()
    for _ in range(3):
        opt.zero_grad()
        for x, y in data:
            (F.cross_entropy(model(x), y) / args.k).backward()
        if precond is not None:
            precond.step()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(k=args.k, mode=args.mode, peak_above_start_mib=round(peak - before, 1),
                kfac_ext=str(Path(kfac_ext.__file__).parent))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=0, help="one run with k micro-batches (internal)")
    parser.add_argument("--mode", default="KFACPreconditioner (mc)", choices=list(MODES), help="(internal)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.k:
        print(json.dumps(one_run(args)))
        return
    rows = []
    for mode in MODES:
        for k in (1, 4, 8):
            cmd = [sys.executable, __file__, "--k", str(k), "--mode", mode] + [
                f"--{n}={getattr(args, n)}" for n in ("d", "blocks", "batch", "tokens")]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(dict(config=vars(args) | dict(out=str(args.out)), rows=rows), indent=1))
    print(f"transformer stack d={args.d}, {args.blocks} blocks, micro-batch {args.batch}x{args.tokens} tokens "
          f"({rows[0]['kfac_ext']}); peak RSS above the start (MiB)\n")
    print("| micro-batches k | " + " | ".join(MODES) + " |\n|---:|" + "---:|" * len(MODES))
    for k in (1, 4, 8):
        print(f"| {k} | " + " | ".join(str(r["peak_above_start_mib"]) for r in rows if r["k"] == k) + " |")


if __name__ == "__main__":
    main()
