"""Calls every op on CUDA on small random inputs and checks the results against the CPU
implementation: every kernel path and dtype pair, factor sides on both sides of each routing
limit, zero rows, NaN / non-PD / overflowing factors, more layers than one launch table holds, a
non-default stream, and CUDA graph capture (replay equals eager; the inversions refuse capture
and leave the process usable). Small on purpose: bench/gpu_check.sh runs it under
compute-sanitizer (memcheck, racecheck, initcheck, synccheck).

    python bench/cuda_smoke.py        # the GPU
    python bench/cuda_smoke.py cpu    # checks this script itself without a GPU (CUDA-only parts skipped)
"""

import os
import sys

import torch

# The device under test; `python bench/cuda_smoke.py cpu` checks the script itself without a GPU.
DEVICE = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")

from kfac_ext import ops  # noqa: E402
from kfac_ext.ops import Status  # noqa: E402

X_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
FACTOR_DTYPES = (torch.float32, torch.float64)
# Relative (Frobenius) error allowed between two arithmetic paths (CPU vs CUDA) in a dtype: the
# problems here are well conditioned (SPD factors with condition numbers ~30, sums over <= 1100
# rows), so 1000 ulps covers summation order and fused multiply-adds on either side.
TOL = {dtype: 1000 * torch.finfo(dtype).eps for dtype in (torch.float32, torch.float64)}
FAILURES: list[str] = []  # every failed check: the script runs them all, then reports
# (d, append_ones), one call: factor sides 1, 18, 31, 32, 33, 64, 255, 256 go through the fused
# kernel (dbar <= 256 and rows <= 1024); 257, 511, 512, 513 and 700 through cuBLAS + the mirror
# kernel (700: more elements than its 64 blocks cover at once)
FACTOR_SHAPES = ((1, False), (17, True), (31, False), (31, True), (33, False), (63, True), (255, False), (255, True),
                 (257, False), (510, True), (512, False), (512, True), (700, False))
NAN_AT = (1, 11)  # a fused and a GEMM factor that get a stale NaN before a decay-0 update
MANY = 70  # more layers than one launch table holds (kernels launch once per chunk)
# stream and graph checks: eight fused-kernel layers (sides 18..256) and one cuBLAS layer (601)
MIXED_DIMS = (17, 31, 33, 64, 100, 128, 200, 255, 600)


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def spd(n, dtype):
    x = torch.randn(n, 2 * n + 3, dtype=torch.float64)
    m = (x @ x.T) / x.shape[1]
    return ((m + m.T) / 2).to(dtype)  # exactly symmetric


def cpu(tensors):
    return [t.cpu() for t in tensors]


def on_device(tensors):
    # copy=True: on DEVICE=cpu, .to() returns the same tensor, and an in-place update of both
    # copies would hit one tensor twice and compare it with itself
    return [t.to(DEVICE, copy=True) for t in tensors]


def expect(ok, message):
    """Records a failed check and carries on, so one failure does not hide the checks after it."""
    if not ok:
        FAILURES.append(message)
        print(f"FAIL: {message}", flush=True)


def check(report, name, err, tol):
    report[name] = err
    expect(err < tol, f"{name}: relative error {err:.2e} >= {tol:.1e}")


def factor_update_both(fs, xs, **kw):
    """Runs factor_update_ on the CPU tensors and on device copies; returns the device factors."""
    fs_dev = on_device(fs)
    ops.factor_update_(fs, xs, **kw)
    ops.factor_update_(fs_dev, on_device(xs), **kw)
    expect(all(torch.equal(f, f.T) for f in fs_dev), "factor_update: not exactly symmetric")
    return fs_dev


def check_factor_update(report):
    dims, ones = [d for d, _ in FACTOR_SHAPES], [o for _, o in FACTOR_SHAPES]
    for f_dtype in FACTOR_DTYPES:
        for x_dtype in X_DTYPES:
            decay = 0.0 if x_dtype == torch.float16 else 0.9
            xs = [torch.randn(37, d).to(x_dtype) for d in dims]
            fs = [spd(d + o, f_dtype) for d, o in zip(dims, ones)]
            if decay == 0.0:
                for i in NAN_AT:
                    fs[i][3, 2] = float("nan")  # stale NaNs that decay 0 must drop
            got = factor_update_both(fs, xs, decay=decay, scales=0.5, append_ones=ones)
            name = f"factor_update F={f_dtype} x={x_dtype} decay={decay}"
            check(report, name, max(rel_err(g, c) for g, c in zip(got, fs)), TOL[f_dtype])
        # zero rows: F <- decay F exactly (the ones column adds nothing either: its count is 0)
        for decay in (0.9, 0.0):
            xs = [torch.empty(0, d, dtype=f_dtype) for d in dims]
            start = [spd(d + o, f_dtype) for d, o in zip(dims, ones)]
            fs = [f.clone() for f in start]
            got = factor_update_both(fs, xs, decay=decay, scales=0.5, append_ones=ones)
            check(report, f"factor_update F={f_dtype} rows=0 decay={decay}",
                  max(rel_err(g, c) for g, c in zip(got, fs)), TOL[f_dtype])
            check(report, f"factor_update CPU F={f_dtype} rows=0 decay={decay}: F vs decay F",
                  max(rel_err(c, decay * s) for c, s in zip(fs, start)), 4 * torch.finfo(f_dtype).eps)
        # many layers in one call: more fused layers than one launch table holds, and every
        # tenth with 1100 rows (so cuBLAS); then more GEMM layers than one mirror table holds
        for count, rows in ((MANY, lambda i: 1100 if i % 10 == 0 else 5 + i % 3), (170, lambda i: 1025)):
            sizes = [1 + i % 9 for i in range(count)]
            xs = [torch.randn(rows(i), d, dtype=f_dtype) for i, d in enumerate(sizes)]
            fs = [spd(d + (i % 2), f_dtype) for i, d in enumerate(sizes)]
            got = factor_update_both(fs, xs, decay=0.5, scales=[1.0 / (i + 1) for i in range(count)],
                                     append_ones=[bool(i % 2) for i in range(count)])
            check(report, f"factor_update F={f_dtype} {count} layers", max(rel_err(g, c) for g, c in zip(got, fs)), TOL[f_dtype])


def check_inversion_and_preconditioning(report, dtype):
    tol = TOL[dtype]
    # damped inverse: small kernel (<= 64), large ATen path, NaN and non-PD factors
    factors = [spd(n, dtype) for n in (1, 7, 64, 65, 130)]
    factors += [torch.full((5, 5), float("nan"), dtype=dtype), -torch.eye(9, dtype=dtype)]
    gpu = on_device(factors)
    inv_c, st_c = ops.damped_inverse(factors, 1e-3)
    inv_g, st_g = ops.damped_inverse(gpu, 1e-3)
    expect(torch.equal(st_c, st_g.cpu()), f"damped_inverse status {st_c} vs {st_g}")
    check(report, f"damped_inverse {dtype}", max(rel_err(g, c) for g, c in zip(inv_g[:5], inv_c[:5])), tol)
    expect(all(int((g != 0).sum()) == 0 for g in inv_g[5:]), "failed inverses must be zeros")
    # more small factors than one launch table of the small-Cholesky kernel holds
    many = [spd(1 + i % 8, dtype) for i in range(100)]
    (inv_m, st_m), (inv_mc, st_mc) = ops.damped_inverse(on_device(many), 1e-3), ops.damped_inverse(many, 1e-3)
    expect(torch.equal(st_m.cpu(), st_mc), "damped_inverse status, 100 factors")
    check(report, f"damped_inverse {dtype} 100 factors", max(rel_err(g, c) for g, c in zip(inv_m, inv_mc)), tol)
    # eigen + both preconditioners
    lam, q, st = ops.eigen_decompose(gpu[:5])
    expect(int(st.sum()) == 0, f"eigen_decompose status {st}")
    recon = [qi @ torch.diag(li) @ qi.T for li, qi in zip(lam, q)]
    check(report, f"eigen_decompose {dtype}", max(rel_err(r, f) for r, f in zip(recon, factors[:5])), tol)
    grads = [torch.randn(m, n, dtype=dtype) for m, n in ((1, 7), (64, 65), (130, 7))]
    g_side, a_side = (0, 2, 4), (1, 3, 1)  # factor sizes 1, 64, 130 and 7, 65, 7
    qg, lg = [q[i] for i in g_side], [lam[i] for i in g_side]
    qa, la = [q[i] for i in a_side], [lam[i] for i in a_side]
    damping = [1e-2, 1e-3, 0.5]
    out_g = ops.precondition_eigen(qg, lg, on_device(grads), qa, la, damping)
    out_c = ops.precondition_eigen(cpu(qg), cpu(lg), grads, cpu(qa), cpu(la), damping)
    check(report, f"precondition_eigen {dtype}", max(rel_err(g, c) for g, c in zip(out_g, out_c)), tol)
    # eigen_adam: the CUDA path (ATen, the flag read on the device) against the CPU loop, a
    # taken step then a skipped one; the middle layer without Q_A (a diagonal A)
    moments = [[torch.rand(m, n, dtype=dtype) + 0.5 for m, n in ((1, 7), (64, 65), (130, 7))] for _ in range(2)]
    steps = [torch.tensor(float(t)) for t in (0, 3, 11)]
    qa_opt = [qa[0], None, qa[2]]
    state_g = [on_device(moments[0]), on_device(moments[1]), on_device(steps)]
    state_c = [[t.clone() for t in moments[0]], [t.clone() for t in moments[1]], [t.clone() for t in steps]]
    for keep in (True, False):
        out_g = ops.eigen_adam_(qg, on_device(grads), qa_opt, *state_g,
                                torch.tensor(keep, device=DEVICE), 0.9, 0.99, 1e-8)
        out_c = ops.eigen_adam_(cpu(qg), grads, [None if t is None else t.cpu() for t in qa_opt], *state_c,
                                torch.tensor(keep), 0.9, 0.99, 1e-8)
        worst = max(rel_err(g, c) for g, c in zip(out_g + state_g[0] + state_g[1], out_c + state_c[0] + state_c[1]))
        expect(all(g.item() == c.item() for g, c in zip(state_g[2], state_c[2])), f"eigen_adam steps keep={keep}")
        check(report, f"eigen_adam {dtype} keep={keep}", worst, tol)
    grad = torch.randn(1, 7, dtype=dtype)
    pi_g = ops.precondition_inverse([inv_g[0]], [grad.to(DEVICE)], [inv_g[1]])
    pi_c = ops.precondition_inverse([inv_c[0]], [grad], [inv_c[1]])
    check(report, f"precondition_inverse {dtype}", rel_err(pi_g[0], pi_c[0]), tol)
    # many layers in one call, the last a batched entry (3 same-shape layers, a leading k)
    shapes = [(1 + i % 5, 1 + (i * 3) % 7) for i in range(MANY)]
    lefts = [torch.randn(m, m, dtype=dtype) for m, _ in shapes] + [torch.randn(3, 6, 6, dtype=dtype)]
    mats = [torch.randn(m, n, dtype=dtype) for m, n in shapes] + [torch.randn(3, 6, 4, dtype=dtype)]
    rights = [torch.randn(n, n, dtype=dtype) for _, n in shapes] + [torch.randn(3, 4, 4, dtype=dtype)]
    got = ops.kron_matmul(on_device(lefts), on_device(mats), on_device(rights))
    want = ops.kron_matmul(lefts, mats, rights)
    check(report, f"kron_matmul {dtype} {MANY} layers + a batched entry", max(rel_err(g, c) for g, c in zip(got, want)), tol)
    vals = [torch.rand(t.shape[:-1], dtype=dtype) for t in lefts], [torch.rand(t.shape[:-1], dtype=dtype) for t in rights]
    got = ops.precondition_eigen(on_device(lefts), on_device(vals[0]), on_device(mats), on_device(rights),
                                 on_device(vals[1]), 0.1)
    want = ops.precondition_eigen(lefts, vals[0], mats, rights, vals[1], 0.1)
    check(report, f"precondition_eigen {dtype} {MANY} layers + a batched entry", max(rel_err(g, c) for g, c in zip(got, want)), tol)


def check_overflow(report):
    # pre-solve: the damped value 3.7e38 overflows float32; the float64 retry succeeds
    inv, st = ops.damped_inverse([torch.tensor([[1.7e38]], device=DEVICE)], 2e38)
    expect(int(st[0]) == Status.OK_AFTER_FP64_RETRY, f"overflow retry status {int(st[0])}")
    check(report, "damped_inverse float32 overflow retry", rel_err(inv[0], torch.tensor([[1 / 3.7e38]])), 1e-4)
    # post-solve: the inverse of 1e-39 (subnormal) is 1e39, past float32's range, even from the
    # float64 retry; small kernel (1x1) and ATen path (65x65). Status and values as on CPU.
    for factor in (torch.tensor([[1e-39]]), torch.eye(65) * 1e-39):
        inv_c, st_c = ops.damped_inverse([factor], 0.0)
        inv_g, st_g = ops.damped_inverse([factor.to(DEVICE)], 0.0)
        n = factor.shape[0]
        expect(int(st_g[0]) in (Status.OK_AFTER_FP64_RETRY, Status.FAILED), f"post-solve overflow {n}x{n}: status {int(st_g[0])}")
        expect(torch.equal(st_c, st_g.cpu()), f"post-solve overflow {n}x{n}: status {st_g} vs CPU {st_c}")
        check(report, f"damped_inverse float32 post-solve overflow {n}x{n}: values vs CPU",
              rel_err(inv_g[0], inv_c[0]), TOL[torch.float32])
        report[f"damped_inverse float32 post-solve overflow {n}x{n} ({Status(int(st_g[0])).name})"] = 0.0


def stream_inputs():
    xs = [torch.randn(37, d) for d in MIXED_DIMS]
    fs = [spd(d + 1, torch.float32) for d in MIXED_DIMS]
    factors = [spd(n, torch.float32) for n in (7, 64, 130)]
    grads = [torch.randn(130, 7)]
    return xs, fs, factors, grads


def run_all(xs, fs, factors, grads):
    """Every op once, on the current stream; returns the outputs (fs is updated in place)."""
    ops.factor_update_(fs, xs, decay=0.9, scales=0.5, append_ones=True)
    inv, st_inv = ops.damped_inverse(factors, 1e-3)
    lam, q, st_eig = ops.eigen_decompose(factors)
    pe = ops.precondition_eigen([q[2]], [lam[2]], grads, [q[0]], [lam[0]], 1e-2)
    km = ops.kron_matmul([inv[2]], grads, [inv[0]])
    return [*fs, *inv, st_inv, *lam, st_eig, *pe, *km]


def check_stream(report):
    """On a non-default stream, behind a sleep: an op that launched on another stream would run
    before its inputs were written there and come out wrong."""
    inputs = stream_inputs()
    want = run_all(*[[t.clone() for t in group] for group in inputs])
    staged = [on_device(group) for group in inputs]  # device copies, so the writes below are async
    dev = [[torch.zeros_like(t) for t in group] for group in staged]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time on s before the inputs are written
        for group, values in zip(dev, staged):
            for t, v in zip(group, values):
                t.copy_(v)
        got = run_all(*dev)
    s.synchronize()
    errors = [rel_err(g, w) for g, w in zip(got, want)]  # eigenvectors are not compared: signs are free
    for i, err in enumerate(errors):
        expect(err < TOL[torch.float32], f"non-default stream: output {i} relative error {err:.2e}")
    report["all ops on a non-default stream"] = max(errors)


def check_graphs(report):
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        print("CUDA graphs: skipped (PYTORCH_NO_CUDA_MEMORY_CACHING=1: capture needs the caching allocator)")
        return
    torch.manual_seed(1)
    xs = on_device([torch.randn(37, d) for d in MIXED_DIMS])  # fused kernel and cuBLAS + mirror
    fs = on_device([spd(d + 1, torch.float32) for d in MIXED_DIMS])
    lam, q, _ = ops.eigen_decompose(on_device([spd(n, torch.float32) for n in (7, 130)]))
    lefts, mats, rights = on_device([torch.randn(130, 130)]), on_device([torch.randn(130, 7)]), on_device([torch.randn(7, 7)])

    def captured():
        ops.factor_update_(fs, xs, decay=0.9, scales=0.5, append_ones=True)
        return ops.kron_matmul(lefts, mats, rights) + ops.precondition_eigen([q[1]], [lam[1]], mats, [q[0]], [lam[0]], 1e-2)

    side = torch.cuda.Stream()  # warm-up on a side stream, as the PyTorch docs show
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            captured()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = captured()
    worst = 0.0
    for trial in range(2):  # fresh inputs each replay: the graph must read them, not a copy
        new_x, new_f = [torch.randn(37, d) for d in MIXED_DIMS], [spd(d + 1, torch.float32) for d in MIXED_DIMS]
        new_m = [torch.randn(130, 7)]
        for t, v in zip(xs + fs + mats, new_x + new_f + new_m):
            t.copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        eager_f = on_device(new_f)
        ops.factor_update_(eager_f, on_device(new_x), decay=0.9, scales=0.5, append_ones=True)
        eager_m = on_device(new_m)
        eager = ops.kron_matmul(lefts, eager_m, rights) + ops.precondition_eigen([q[1]], [lam[1]], eager_m, [q[0]], [lam[0]], 1e-2)
        for name, got, want in (("factor_update_", fs, eager_f), ("kron_matmul/precondition_eigen", outs, eager)):
            err = max(rel_err(g, w) for g, w in zip(got, want))
            expect(err < TOL[torch.float32], f"CUDA graph replay {trial}: {name} differs from eager by {err:.2e}")
            worst = max(worst, err)
    report["CUDA graph replay vs eager (factor_update_, kron_matmul, precondition_eigen)"] = worst

    factors = on_device([spd(n, torch.float32) for n in (7, 130)])
    for name, call in (("damped_inverse", lambda: ops.damped_inverse(factors, 1e-3)),
                       ("eigen_decompose", lambda: ops.eigen_decompose(factors))):
        caught = None
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                factors[0] * 2  # something captured besides the refusal: no empty-graph warning
                try:
                    call()
                except RuntimeError as e:
                    caught = e
        except RuntimeError as e:
            raise AssertionError(f"{name} under capture broke the capture instead of refusing first: {e}") from e
        expect(caught is not None, f"{name} ran under CUDA graph capture; it must refuse (it synchronizes)")
        message = str(caught)
        expect("capture" in message and name in message, f"{name} under capture: unclear message {message!r}")
        # the process is still usable: the same op, eagerly, as on CPU
        if name == "damped_inverse":
            (inv, st), (inv_c, st_c) = call(), ops.damped_inverse(cpu(factors), 1e-3)
            expect(torch.equal(st.cpu(), st_c), f"damped_inverse after a refused capture: status {st}")
            err = max(rel_err(g, c) for g, c in zip(inv, inv_c))
        else:
            lam, q, st = call()
            expect(int(st.sum()) == 0, f"eigen_decompose after a refused capture: status {st}")
            err = max(rel_err(qi @ torch.diag(li) @ qi.T, f) for li, qi, f in zip(lam, q, factors))
        expect(err < TOL[torch.float32], f"{name} after a refused capture: relative error {err:.2e}")
        report[f"{name} refuses capture, then runs eagerly"] = err


def run_section(name, fn, *args):
    """Runs one group of checks; an exception is recorded as a failure and the next group runs."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - reported below, the script exits nonzero
        expect(False, f"{name} raised {type(e).__name__}: {e}")


def main() -> int:
    torch.manual_seed(0)
    report = {}
    run_section("factor_update", check_factor_update, report)
    for dtype in FACTOR_DTYPES:
        run_section(f"inversion and preconditioning {dtype}", check_inversion_and_preconditioning, report, dtype)
    run_section("overflow", check_overflow, report)
    if DEVICE.type == "cuda":
        run_section("non-default stream", check_stream, report)
        run_section("CUDA graphs", check_graphs, report)
        torch.cuda.synchronize()
    else:
        print("non-default stream and CUDA graph checks: skipped on cpu")
    for name, err in report.items():
        print(f"{name:80s} max rel err vs CPU {err:.2e}")
    if FAILURES:
        print(f"cuda_smoke on {DEVICE}: {len(FAILURES)} FAILED:\n  " + "\n  ".join(FAILURES))
        return 1
    print(f"cuda_smoke on {DEVICE}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
