"""Peak host memory of one K-FAC step with gradient accumulation, on the [B, T, d] transformer
stack of bench_step.py: every micro-batch is reduced to factor sums as the next one starts, so the
peak should not grow with the number of micro-batches k.

    python bench/bench_memory.py [--d 256 --blocks 4 --batch 32 --tokens 64]

Each (k) runs in a fresh process (peak RSS is per process): build the model and data, take two
steps of k micro-batches (forward, backward) + ``precond.step()``, report the peak resident set
size above the resident size before the first step. Run it against another checkout of kfac_ext
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


def one_run(args) -> dict:
    import torch
    import torch.nn.functional as F
    from bench_step import TransformerLinears

    import kfac_ext

    torch.manual_seed(0)
    model = TransformerLinears(args.d, args.blocks)
    precond = kfac_ext.KFACPreconditioner(model, "cross_entropy", grad_accumulation_steps=args.k)
    data = [(torch.randn(args.batch, args.tokens, args.d), torch.randint(0, 10, (args.batch,))) for _ in range(args.k)]
    before = resident_mib()
    for _ in range(2):
        model.zero_grad()
        for x, y in data:
            (F.cross_entropy(model(x), y) / args.k).backward()
        precond.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(k=args.k, peak_above_start_mib=round(peak - before, 1), kfac_ext=str(Path(kfac_ext.__file__).parent))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=0, help="one run with k micro-batches (internal)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.k:
        print(json.dumps(one_run(args)))
        return
    rows = []
    for k in (1, 2, 4, 8):
        cmd = [sys.executable, __file__, "--k", str(k)] + [f"--{n}={getattr(args, n)}" for n in ("d", "blocks", "batch", "tokens")]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(dict(config=vars(args) | dict(out=str(args.out)), rows=rows), indent=1))
    print(f"transformer stack d={args.d}, {args.blocks} blocks, micro-batch {args.batch}x{args.tokens} tokens "
          f"({rows[0]['kfac_ext']})\n")
    print("| micro-batches k | peak RSS above start (MiB) |\n|---:|---:|")
    for r in rows:
        print(f"| {r['k']} | {r['peak_above_start_mib']} |")


if __name__ == "__main__":
    main()
