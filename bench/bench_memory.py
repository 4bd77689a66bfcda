"""Peak host memory of K-FAC steps with gradient accumulation, on the [B, T, d] transformer stack
of bench_step.py, against plain AdamW and a pure-PyTorch K-FAC built the established way
(``kfac_torch.py``: factors reduced in each layer's hooks).

    python bench/bench_memory.py [--d 256 --blocks 4 --batch 32 --tokens 64]     # ~5 min

Each (measure, mode, k) runs in a fresh process: build the model and data, take three steps of k
micro-batches (forward, backward) + the optimizer. Two measures: the most bytes the CPU allocator
held at once (every allocation and free, from torch.profiler: what the code holds) and the peak
resident set size above the size before the first step (what the machine sees; glibc's heap keeps
freed blocks, so it also depends on the order of allocations). Modes: :data:`MODES`, each K-FAC
next to the baseline with the same optimizer. Run it against another checkout of kfac_ext with
PYTHONPATH to compare.
"""

from __future__ import annotations

import argparse
import contextlib
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
    "pure-PyTorch K-FAC + AdamW": "kfac_torch.HookKFAC (empirical factors reduced in each layer's hooks) into "
                                  "torch.optim.AdamW: the same optimizer state as KFAC's eigenbasis Adam",
    "KFACPreconditioner (mc) + SGD": "KFACPreconditioner(model, 'cross_entropy') + SGD: Monte Carlo factors, sampled backward",
    "pure-PyTorch K-FAC + SGD": "kfac_torch.HookKFAC + SGD: empirical factors",
    "pure-PyTorch K-FAC (mc) + SGD": "kfac_torch.HookKFAC(fisher='mc') + SGD: Monte Carlo factors from a sampled "
                                     "backward (torch.autograd.grad, graph retained), the baseline of the mc row",
}
MEASURES = ("live", "rss")


def live_peak_mib(events) -> float:
    """The most bytes the CPU allocator held at once, from the profiler's allocation events."""
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def one_run(args) -> dict:
    import torch
    import torch.nn.functional as F
    from bench_step import TransformerLinears
    from kfac_torch import HookKFAC

    import kfac_ext

    torch.manual_seed(0)
    model = TransformerLinears(args.d, args.blocks)
    precond = None  # KFAC's is inside opt.step()
    if args.mode == "KFAC (defaults)":
        opt = kfac_ext.KFAC(model, lr=1e-3, loss="cross_entropy", grad_accumulation_steps=args.k)
    elif args.mode.startswith("KFACPreconditioner"):
        precond = kfac_ext.KFACPreconditioner(model, "cross_entropy", grad_accumulation_steps=args.k)
    elif args.mode.startswith("pure-PyTorch"):
        precond = HookKFAC(model, fisher="mc" if "(mc)" in args.mode else "empirical")
    if args.mode.endswith("SGD"):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    elif args.mode.endswith("AdamW"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = [(torch.randn(args.batch, args.tokens, args.d), torch.randint(0, 10, (args.batch,))) for _ in range(args.k)]
    profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
                if args.measure == "live" else contextlib.nullcontext())
    before = resident_mib()
    with profiler:
        for _ in range(3):
            opt.zero_grad()
            for x, y in data:
                out = model(x)
                if isinstance(precond, HookKFAC) and precond.fisher == "mc":
                    precond.sampled_backward(out)
                (F.cross_entropy(out, y) / args.k).backward()
            if precond is not None:
                precond.step()
            opt.step()
    if args.measure == "live":
        peak = live_peak_mib([(e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                              if e.name() == "[memory]"])
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before  # KiB on Linux
    return dict(k=args.k, mode=args.mode, measure=args.measure, peak_mib=round(peak, 1),
                kfac_ext=str(Path(kfac_ext.__file__).parent))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=0, help="one run with k micro-batches (internal)")
    parser.add_argument("--mode", default="KFACPreconditioner (mc) + SGD", choices=list(MODES), help="(internal)")
    parser.add_argument("--measure", default="rss", choices=MEASURES, help="(internal)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.k:
        print(json.dumps(one_run(args)))
        return
    rows = []
    for measure in MEASURES:
        for mode in MODES:
            for k in (1, 4, 8):
                cmd = [sys.executable, __file__, "--k", str(k), "--mode", mode, "--measure", measure] + [
                    f"--{n}={getattr(args, n)}" for n in ("d", "blocks", "batch", "tokens")]
                rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(dict(config=vars(args) | dict(out=str(args.out)), rows=rows), indent=1))
    print(f"transformer stack d={args.d}, {args.blocks} blocks, micro-batch {args.batch}x{args.tokens} tokens "
          f"({rows[0]['kfac_ext']})")
    for measure, title in (("live", "peak bytes held by the CPU allocator (profiler)"),
                           ("rss", "peak resident set size above the start")):
        print(f"\n{title}, MiB\n")
        print("| micro-batches k | " + " | ".join(MODES) + " |\n|---:|" + "---:|" * len(MODES))
        for k in (1, 4, 8):
            print(f"| {k} | " + " | ".join(str(r["peak_mib"]) for r in rows if r["k"] == k and r["measure"] == measure) + " |")


if __name__ == "__main__":
    main()
