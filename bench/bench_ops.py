"""Op microbenchmarks: every native op family vs the pure-PyTorch reference and the vendor
library called per layer, same inputs, same run.

    python bench/bench_ops.py --quick                        # < 2 min on 2 CPU cores
    python bench/bench_ops.py                                # the full sweep, sizes capped for a CPU
    python bench/bench_ops.py --device cuda                  # the full GPU sweep: rows up to 65536
    python bench/bench_ops.py --large-rows --device cuda     # what bench/gpu_check.sh runs

Prints a Markdown table (median time, achieved GFLOP/s, speed-ups), writes JSON and a PNG plot
under bench/results/. Timing: torch.utils.benchmark (synchronises CUDA), median of
blocked_autorange. FLOP counts per family are in FLOPS below (textbook counts, full matrices).

Columns: "reference" is kfac_ext.reference (pure PyTorch, one layer at a time, with its checks);
"vendor" is the plain library call per layer, the yardstick a batched op has to beat:
  factor_update    gemm           f.addmm_(x.T, x, beta=decay, alpha=scale) per layer, into a d x d
                                  factor (no ones column, no symmetrization)
  damped_inverse   cholesky loop  torch.linalg.cholesky_ex + torch.cholesky_inverse per layer
  eigen_decompose  eigh loop      torch.linalg.eigh per layer
The "reference / native" and "vendor / native" columns are time ratios (above 1: native is faster).

--large-rows runs only the cases where per-layer libraries and fused kernels part ways: the
factor update with 65536 rows, d from 64 to 4096, one or two layers and 20 or 50 small layers,
64 small factors (n = 16..256) through damped_inverse and eigen_decompose, and pairs of factor
updates on either side of the CUDA routing thresholds (routing_boundary_cases).
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

LARGE_ROWS = 65536
FACTOR_DIMS = [64, 128, 256, 512, 1024, 2048, 4096]
SMALL_LAYER_MAX = 512  # "small" layers: the ones repeated 20 or 50 times
SMALL_N = [16, 32, 64, 128, 256]  # factor sizes of the batched-inversion cases
SMALL_N_COUNT = 64


@dataclasses.dataclass
class Case:
    family: str
    dims: list[int]  # layer input sizes d; factors are (d+1)x(d+1) (d x d with ones=False)
    rows: int
    dtype: torch.dtype  # activation / gradient dtype; factors are float32
    ones: bool = True  # the homogeneous coordinate: factor side d + 1

    @property
    def sides(self) -> list[int]:
        return [d + self.ones for d in self.dims]

    @property
    def label(self) -> str:
        sizes = sorted(set(self.dims))
        n = "" if self.ones else "n="
        shape = f"{len(self.dims)}x{n}{sizes[0]}" if len(sizes) == 1 else f"{len(self.dims)} mixed {sizes[0]}..{sizes[-1]}"
        rows = f" rows={self.rows}" if self.family == "factor_update" else ""
        return f"{shape}{rows} {str(self.dtype).removeprefix('torch.')}"


def _factor_update_flops(case: Case) -> float:
    return sum(2.0 * case.rows * n**2 for n in case.sides)


def _cholesky_flops(case: Case) -> float:
    return sum(float(n) ** 3 for n in case.sides)  # potrf n^3/3 + inverse 2n^3/3


def _eigen_flops(case: Case) -> float:
    return sum(9.0 * float(n) ** 3 for n in case.sides)  # tridiagonalization + QR sweeps, rough


def _precondition_flops(case: Case) -> float:
    return sum(2.0 * d * (d + 1) * (2 * d + 1) for d in case.dims)  # G^-1 (grad A^-1)


def _precondition_eigen_flops(case: Case) -> float:
    return 2 * _precondition_flops(case)  # into the eigenbasis and back


FLOPS: dict[str, Callable] = {
    "factor_update": _factor_update_flops,
    "damped_inverse": _cholesky_flops,
    "eigen_decompose": _eigen_flops,
    "precondition_inverse": _precondition_flops,
    "precondition_eigen": _precondition_eigen_flops,
    "eigen_adam": _precondition_eigen_flops,  # the same four GEMMs; Adam's moments are one pass
}
VENDOR = {"factor_update": "gemm", "damped_inverse": "cholesky loop", "eigen_decompose": "eigh loop"}


def _spd(n: int, device) -> torch.Tensor:
    x = torch.randn(n, 2 * n + 8, device=device)
    return (x @ x.T) / x.shape[1]


def _cholesky_loop(factors: list[torch.Tensor], damping: float) -> Callable:
    """Per layer ``cholesky_inverse(cholesky(F + damping I))``; ``cholesky_ex`` (no error check,
    so no host sync per layer on CUDA): the fastest plain loop, not a strawman."""
    eye = {n: damping * torch.eye(n, device=factors[0].device) for n in {f.shape[0] for f in factors}}
    return lambda: [torch.cholesky_inverse(torch.linalg.cholesky_ex(f + eye[f.shape[0]]).L) for f in factors]


def make_workload(case: Case, device) -> tuple[Callable, Callable, Callable | None]:
    """Returns (native, reference, vendor or None) closures over the same freshly drawn inputs."""
    dims, dev = case.dims, device
    if case.family == "factor_update":
        xs = [torch.randn(case.rows, d, device=dev).to(case.dtype) for d in dims]
        fs = [torch.zeros(n, n, device=dev) for n in case.sides]
        plain = [torch.zeros(d, d, device=dev) for d in dims]  # the GEMM's own d x d targets
        kw = dict(decay=0.95, scales=1.0 / max(1, case.rows), append_ones=case.ones)

        def gemm():
            for f, x in zip(plain, xs):
                xf = x.to(f.dtype)
                f.addmm_(xf.T, xf, beta=kw["decay"], alpha=kw["scales"])

        return (lambda: ops.factor_update_(fs, xs, **kw), lambda: reference.factor_update_(fs, xs, **kw), gemm)
    factors = [_spd(n, dev) for n in case.sides]
    if case.family == "damped_inverse":
        return (lambda: ops.damped_inverse(factors, 1e-3), lambda: reference.damped_inverse(factors, 1e-3),
                _cholesky_loop(factors, 1e-3))
    if case.family == "eigen_decompose":
        return (lambda: ops.eigen_decompose(factors), lambda: reference.eigen_decompose(factors),
                lambda: [torch.linalg.eigh(f) for f in factors])
    grads = [torch.randn(d, d + 1, device=dev).to(case.dtype) for d in dims]
    g_factors = [_spd(d, dev) for d in dims]
    if case.family == "precondition_inverse":
        a_inv, _ = ops.damped_inverse(factors, 1e-3)
        g_inv, _ = ops.damped_inverse(g_factors, 1e-3)
        return (
            lambda: ops.precondition_inverse(g_inv, grads, a_inv),
            lambda: reference.precondition_inverse(g_inv, grads, a_inv),
            None,
        )
    la, qa, _ = ops.eigen_decompose(factors)
    lg, qg, _ = ops.eigen_decompose(g_factors)
    if case.family == "eigen_adam":
        moments = [[torch.zeros(d, d + 1, device=dev) for d in dims] for _ in range(2)]
        steps = [torch.zeros((), device=dev) for _ in dims]
        args = (qg, grads, qa, *moments, steps, torch.tensor(True, device=dev), 0.9, 0.999, 1e-8)
        return (lambda: ops.eigen_adam_(*args), lambda: reference.eigen_adam_(*args), None)
    args = (qg, lg, grads, qa, la, 1e-3)
    return (lambda: ops.precondition_eigen(*args), lambda: reference.precondition_eigen(*args), None)


def large_rows_cases() -> list[Case]:
    """Factor updates with 65536 rows: one or two layers of every size, 20 or 50 small layers;
    then 64 small factors through both inversions."""
    cases = []
    for d in FACTOR_DIMS:
        for layers in (1, 2) + ((20, 50) if d <= SMALL_LAYER_MAX else ()):
            cases.append(Case("factor_update", [d] * layers, LARGE_ROWS, torch.float32))
    for family in ("damped_inverse", "eigen_decompose"):
        cases += [Case(family, [n] * SMALL_N_COUNT, 0, torch.float32, ones=False) for n in SMALL_N]
    return cases + routing_boundary_cases()


def routing_boundary_cases() -> list[Case]:
    """Pairs of factor updates on either side of a CUDA routing limit of
    csrc/cuda/factor_update.cu (the fused kernel takes layers of side <= 256 and rows <= 1024;
    cuBLAS + mirror the others): 1024 vs 1025 rows, and sides 256 vs 257, at 1, 8 and 32 layers."""
    cases = []
    for layers in (1, 8, 32):
        for d in (31, 127, 255):  # factor sides 32, 128, 256
            cases += [Case("factor_update", [d] * layers, rows, torch.float32) for rows in (1024, 1025)]
        cases += [Case("factor_update", [d] * layers, 256, torch.float32) for d in (255, 256)]  # sides 256, 257
    return cases


def sweep(quick: bool, device_type: str) -> list[Case]:
    """Layer-count x size grid per family, plus a mixed-size 'model' per family."""
    if quick:
        dims_grid, layer_counts, rows_grid, dtypes = [16, 64, 256], [1, 10], [256], [torch.float32]
        mixed, mixed_rows = [64, 128, 256, 512, 256, 128, 10], 256
    elif device_type == "cuda":  # where the cliffs are: up to 65536 rows, 1-2 big or 20-50 small layers
        dims_grid, layer_counts = [16] + FACTOR_DIMS, [1, 2, 20, 50]
        rows_grid, dtypes = [256, 8192, LARGE_ROWS], [torch.float32, torch.bfloat16]
        mixed, mixed_rows = [784, 1024, 1024, 512, 512, 256, 256, 128, 64, 10] * 2, 8192
    else:  # ~8 min on 2 CPU cores
        dims_grid, layer_counts = [16, 64, 256, 1024, 4096], [1, 10, 100]
        rows_grid, dtypes = [256, 8192], [torch.float32, torch.bfloat16]
        mixed, mixed_rows = [784, 1024, 1024, 512, 512, 256, 256, 128, 64, 10] * 2, 8192
    cases = []
    for family in FLOPS:
        family_dtypes = dtypes if family in ("factor_update", "precondition_inverse", "precondition_eigen", "eigen_adam") else [torch.float32]
        family_rows = rows_grid if family == "factor_update" else [0]
        for dtype in family_dtypes:
            for rows in family_rows:
                for d in dims_grid:
                    for layers in layer_counts:
                        if not _too_big(family, d, layers, rows, device_type):
                            cases.append(Case(family, [d] * layers, rows, dtype))
            cases.append(Case(family, mixed, mixed_rows if family == "factor_update" else 0, dtype))
    if quick:  # one low-precision input case keeps the bf16 path honest
        cases.append(Case("factor_update", [256] * 10, 256, torch.bfloat16))
    elif device_type == "cuda":  # the batched small-factor inversions of --large-rows
        cases += [c for c in large_rows_cases() if c.family != "factor_update"]
    return cases


def _too_big(family: str, d: int, layers: int, rows: int, device_type: str = "cpu") -> bool:
    """Skips grid points whose total work would take minutes: on a 2-core CPU (~50 GFLOP/s) the
    caps are small; a GPU (~50 TFLOP/s for GEMM, far less for eigh) gets ~100x more, and the
    inputs of one call must stay well inside its memory."""
    work = layers * d**3 if family != "factor_update" else layers * rows * d * d
    limit = {"factor_update": 2e11, "eigen_decompose": 2e10}.get(family, 1e11)
    if device_type == "cuda":
        limit *= 100
        if family == "factor_update" and layers * rows * d * 4 > 16e9:  # float32 inputs, bytes
            return True
    return work > limit


def run(cases: list[Case], device, min_run_time: float) -> list[dict]:
    rows = []
    for i, case in enumerate(cases):
        torch.manual_seed(i)
        native, ref, vendor = make_workload(case, device)
        t_native = median_seconds(native, min_run_time)
        t_ref = median_seconds(ref, min_run_time)
        t_vendor = median_seconds(vendor, min_run_time) if vendor is not None else None
        flops = FLOPS[case.family](case)
        rows.append(
            dict(
                family=case.family,
                case=case.label,
                layers=len(case.dims),
                max_dim=max(case.dims),
                rows=case.rows,
                native_ms=t_native * 1e3,
                reference_ms=t_ref * 1e3,
                vendor=VENDOR.get(case.family) if vendor is not None else None,
                vendor_ms=t_vendor * 1e3 if t_vendor is not None else None,
                native_gflops=flops / t_native / 1e9,
                speedup=t_ref / t_native,
                vendor_speedup=t_vendor / t_native if t_vendor is not None else None,
            )
        )
        versus = f", {VENDOR[case.family]} {t_vendor / t_native:.2f}x" if t_vendor is not None else ""
        print(f"[{i + 1}/{len(cases)}] {case.family} {case.label}: reference {t_ref / t_native:.2f}x{versus}",
              file=sys.stderr, flush=True)
        del native, ref, vendor
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next case's inputs may need the memory
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| family | case | native ms | reference ms | vendor | vendor ms | native GFLOP/s | reference / native | vendor / native |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        vendor_ms = f"{r['vendor_ms']:.3f}" if r["vendor_ms"] is not None else ""
        vendor_x = f"{r['vendor_speedup']:.2f}x" if r["vendor_speedup"] is not None else ""
        lines.append(
            f"| {r['family']} | {r['case']} | {r['native_ms']:.3f} | {r['reference_ms']:.3f} | {r['vendor'] or ''} "
            f"| {vendor_ms} | {r['native_gflops']:.1f} | {r['speedup']:.2f}x | {vendor_x} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    families = list(dict.fromkeys(r["family"] for r in rows))
    tallest = max(sum(r["family"] == f for r in rows) for f in families)
    fig, axes = plt.subplots(1, len(families), figsize=(4.5 * len(families), 1.5 + 0.22 * tallest), squeeze=False)
    for ax, family in zip(axes[0], families):
        sel = [r for r in rows if r["family"] == family]
        y = range(len(sel))
        ax.barh([i - 0.2 for i in y], [r["speedup"] for r in sel], height=0.4, label="reference / native")
        if any(r["vendor_speedup"] is not None for r in sel):
            ax.barh([i + 0.2 for i in y], [r["vendor_speedup"] or 0.0 for r in sel], height=0.4,
                    label=f"{sel[0]['vendor']} / native")
        ax.set_yticks(list(y), [r["case"] for r in sel])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_yaxis()  # table order, top to bottom
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(family, fontsize=9)
        ax.set_xlabel("time / native time (> 1: native faster)")
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sweep, < 2 min on 2 CPU cores")
    parser.add_argument("--large-rows", action="store_true",
                        help="only the 65536-row factor updates and the 64-small-factor inversions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick and args.large_rows:
        parser.error("--quick and --large-rows are separate sweeps; pick one")
    device = torch.device(args.device)
    if args.large_rows:
        cases = [c for c in large_rows_cases()
                 if c.family != "factor_update" or not _too_big(c.family, c.dims[0], len(c.dims), c.rows, device.type)]
    else:
        cases = sweep(args.quick, device.type)
    min_run_time = args.min_run_time or (0.05 if args.quick or args.large_rows else 0.2)
    rows = run(cases, device, min_run_time)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"ops-{device.type}{'-quick' if args.quick else ''}{'-large-rows' if args.large_rows else ''}"
    env = environment(device)
    (args.out / f"{stem}.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    plot(rows, args.out / f"{stem}.png")
    print(f"\n{stem}: torch {env['torch']}, {env.get('gpu', env['cpu'])}, {env['threads']} threads, {env['date']}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
