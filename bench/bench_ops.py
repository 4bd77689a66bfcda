"""Op microbenchmarks: every native op family vs the pure-PyTorch reference, same inputs, same run.

    python bench/bench_ops.py --quick            # < 2 min on 2 CPU cores
    python bench/bench_ops.py                    # the full sweep
    python bench/bench_ops.py --device cuda

Prints a Markdown table (median time, achieved GFLOP/s, native/reference speed-up), writes JSON and
a PNG plot under bench/results/. Timing: torch.utils.benchmark (synchronises CUDA), median of
blocked_autorange. FLOP counts per family are in FLOPS below (textbook counts, full matrices).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from timing import environment, median_seconds

from kfac_ext import ops, reference

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _factor_update_flops(case) -> float:
    return sum(2.0 * case.rows * (d + 1) ** 2 for d in case.dims)


def _cholesky_flops(case) -> float:
    return sum(float(d) ** 3 for d in case.dims)  # potrf n^3/3 + inverse 2n^3/3


def _eigen_flops(case) -> float:
    return sum(9.0 * float(d) ** 3 for d in case.dims)  # tridiagonalization + QR sweeps, rough


def _precondition_flops(case) -> float:
    return sum(2.0 * d * (d + 1) * (2 * d + 1) for d in case.dims)  # G^-1 (grad A^-1)


def _precondition_eigen_flops(case) -> float:
    return 2 * _precondition_flops(case)  # into the eigenbasis and back


FLOPS: dict[str, Callable] = {
    "factor_update": _factor_update_flops,
    "damped_inverse": _cholesky_flops,
    "eigen_decompose": _eigen_flops,
    "precondition_inverse": _precondition_flops,
    "precondition_eigen": _precondition_eigen_flops,
}


@dataclasses.dataclass
class Case:
    family: str
    dims: list[int]  # layer input sizes d; factors are (d+1)x(d+1), layer outputs are d too
    rows: int
    dtype: torch.dtype  # activation / gradient dtype; factors are float32

    @property
    def label(self) -> str:
        sizes = sorted(set(self.dims))
        shape = f"{len(self.dims)}x{sizes[0]}" if len(sizes) == 1 else f"{len(self.dims)} mixed {sizes[0]}..{sizes[-1]}"
        rows = f" rows={self.rows}" if self.family == "factor_update" else ""
        return f"{shape}{rows} {str(self.dtype).removeprefix('torch.')}"


def _spd(n: int, device) -> torch.Tensor:
    x = torch.randn(n, 2 * n + 8, device=device)
    return (x @ x.T) / x.shape[1]


def make_workload(case: Case, device) -> tuple[Callable, Callable]:
    """Returns (native, reference) closures over the same freshly drawn inputs."""
    dims, dev = case.dims, device
    if case.family == "factor_update":
        xs = [torch.randn(case.rows, d, device=dev).to(case.dtype) for d in dims]
        fs = [torch.zeros(d + 1, d + 1, device=dev) for d in dims]
        kw = dict(decay=0.95, scales=1.0 / case.rows, append_ones=True)
        return (lambda: ops.factor_update_(fs, xs, **kw), lambda: reference.factor_update_(fs, xs, **kw))
    factors = [_spd(d + 1, dev) for d in dims]
    if case.family == "damped_inverse":
        return (lambda: ops.damped_inverse(factors, 1e-3), lambda: reference.damped_inverse(factors, 1e-3))
    if case.family == "eigen_decompose":
        return (lambda: ops.eigen_decompose(factors), lambda: reference.eigen_decompose(factors))
    grads = [torch.randn(d, d + 1, device=dev).to(case.dtype) for d in dims]
    g_factors = [_spd(d, dev) for d in dims]
    if case.family == "precondition_inverse":
        a_inv, _ = ops.damped_inverse(factors, 1e-3)
        g_inv, _ = ops.damped_inverse(g_factors, 1e-3)
        return (
            lambda: ops.precondition_inverse(g_inv, grads, a_inv),
            lambda: reference.precondition_inverse(g_inv, grads, a_inv),
        )
    la, qa, _ = ops.eigen_decompose(factors)
    lg, qg, _ = ops.eigen_decompose(g_factors)
    args = (qg, lg, grads, qa, la, 1e-3)
    return (lambda: ops.precondition_eigen(*args), lambda: reference.precondition_eigen(*args))


def sweep(quick: bool) -> list[Case]:
    """Layer-count x size grid per family, plus a mixed-size 'model' per family."""
    if quick:
        dims_grid, layer_counts, rows_grid, dtypes = [16, 64, 256], [1, 10], [256], [torch.float32]
        mixed = [64, 128, 256, 512, 256, 128, 10]
    else:
        dims_grid, layer_counts = [16, 64, 256, 1024, 4096], [1, 10, 100]
        rows_grid, dtypes = [256, 8192], [torch.float32, torch.bfloat16]
        mixed = [784, 1024, 1024, 512, 512, 256, 256, 128, 64, 10] * 2
    cases = []
    for family in FLOPS:
        family_dtypes = dtypes if family in ("factor_update", "precondition_inverse", "precondition_eigen") else [torch.float32]
        family_rows = rows_grid if family == "factor_update" else [0]
        for dtype in family_dtypes:
            for rows in family_rows:
                for d in dims_grid:
                    for layers in layer_counts:
                        if _too_big(family, d, layers, rows):
                            continue
                        cases.append(Case(family, [d] * layers, rows, dtype))
                cases.append(Case(family, mixed, max(family_rows), dtype))
    if quick:  # one low-precision input case keeps the bf16 path honest
        cases.append(Case("factor_update", [256] * 10, 256, torch.bfloat16))
    return cases


def _too_big(family: str, d: int, layers: int, rows: int) -> bool:
    """Skips grid points whose total work would take minutes on a 2-core CPU."""
    work = layers * d**3 if family != "factor_update" else layers * rows * d * d
    limit = 2e11 if family == "factor_update" else 1e11
    if family == "eigen_decompose":
        limit = 2e10
    return work > limit


def run(cases: list[Case], device, min_run_time: float) -> list[dict]:
    rows = []
    for i, case in enumerate(cases):
        torch.manual_seed(i)
        native, ref = make_workload(case, device)
        t_native = median_seconds(native, min_run_time)
        t_ref = median_seconds(ref, min_run_time)
        flops = FLOPS[case.family](case)
        rows.append(
            dict(
                family=case.family,
                case=case.label,
                layers=len(case.dims),
                max_dim=max(case.dims),
                native_ms=t_native * 1e3,
                reference_ms=t_ref * 1e3,
                native_gflops=flops / t_native / 1e9,
                speedup=t_ref / t_native,
            )
        )
        print(f"[{i + 1}/{len(cases)}] {case.family} {case.label}: {t_ref / t_native:.2f}x", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| family | case | native ms | reference ms | native GFLOP/s | speed-up |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['case']} | {r['native_ms']:.3f} | {r['reference_ms']:.3f} "
            f"| {r['native_gflops']:.1f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.5), squeeze=False)
    for ax, family in zip(axes[0], families):
        sel = [r for r in rows if r["family"] == family]
        ax.barh([r["case"] for r in sel], [r["speedup"] for r in sel])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(family, fontsize=9)
        ax.set_xlabel("reference time / native time")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sweep, < 2 min on 2 CPU cores")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.2)
    rows = run(sweep(args.quick), device, min_run_time)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"ops-{device.type}{'-quick' if args.quick else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(dict(environment=environment(device), rows=rows), indent=1))
    plot(rows, args.out / f"{stem}.png")
    env = environment(device)
    print(f"\n{stem}: torch {env['torch']}, {env.get('gpu', env['cpu'])}, {env['threads']} threads, {env['date']}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
