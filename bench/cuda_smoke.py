"""Calls every op once on CUDA on small random inputs (every kernel path, both dtypes, NaN and
non-PD factors) and checks the results against the CPU implementation. Small on purpose: this is
what bench/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck)."""

import sys

import torch

# The device under test; `python bench/cuda_smoke.py cpu` checks the script itself without a GPU.
DEVICE = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")

from kfac_ext import ops


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def spd(n, dtype):
    x = torch.randn(n, 2 * n + 3, dtype=torch.float64)
    return ((x @ x.T) / x.shape[1]).to(dtype)


def main() -> int:
    torch.manual_seed(0)
    report = {}
    for dtype in (torch.float32, torch.float64):
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        worst = {}
        # factor update: kernel path (d <= 511), ATen path (d + 1 > 512), bf16 inputs, ones on/off
        dims, ones = [1, 17, 65, 600], [True, False, True, True]
        for x_dtype, decay in ((dtype, 0.9), (torch.bfloat16, 0.9), (torch.float16, 0.0)):
            xs = [torch.randn(37, d).to(x_dtype) for d in dims]
            fs = [spd(d + o, dtype) for d, o in zip(dims, ones)]
            if decay == 0.0:
                fs[1][0, 1] = float("nan")  # a stale NaN that decay 0 must drop
            # copy=True: on DEVICE=cpu, .to() returns the same tensor, and the two in-place
            # updates below would hit one tensor twice and compare it with itself
            fs_gpu = [f.to(DEVICE, copy=True) for f in fs]
            ops.factor_update_(fs, xs, decay=decay, scales=0.5, append_ones=ones)
            ops.factor_update_(fs_gpu, [x.to(DEVICE) for x in xs], decay=decay, scales=0.5, append_ones=ones)
            worst[f"factor_update {dtype} x={x_dtype} decay={decay}"] = max(rel_err(g, c) for g, c in zip(fs_gpu, fs))
            assert all(torch.equal(f, f.T) for f in fs_gpu), "factor_update: not exactly symmetric"
        # damped inverse: small kernel (<= 64), large ATen path, NaN and non-PD factors; in
        # float32 a 1x1 whose damped value overflows: the kernel fails, the float64 retry succeeds
        factors = [spd(n, dtype) for n in (1, 7, 64, 65, 130)]
        if dtype == torch.float32:
            overflow = torch.tensor([[1.7e38]])
            inv_o, st_o = ops.damped_inverse([overflow.to(DEVICE)], 2e38)
            assert int(st_o[0]) == 1, f"overflow retry status {int(st_o[0])}"  # OK_AFTER_FP64_RETRY
            worst["damped_inverse float32 overflow retry"] = rel_err(inv_o[0], torch.tensor([[1 / 3.7e38]]))
        factors += [torch.full((5, 5), float("nan"), dtype=dtype), -torch.eye(9, dtype=dtype)]
        gpu = [f.to(DEVICE) for f in factors]
        inv_c, st_c = ops.damped_inverse(factors, 1e-3)
        inv_g, st_g = ops.damped_inverse(gpu, 1e-3)
        assert torch.equal(st_c, st_g.cpu()), f"damped_inverse status {st_c} vs {st_g}"
        worst[f"damped_inverse {dtype}"] = max(rel_err(g, c) for g, c in zip(inv_g[:5], inv_c[:5]))
        assert all(int((g != 0).sum()) == 0 for g in inv_g[5:]), "failed inverses must be zeros"
        # eigen + both preconditioners
        lam, q, st = ops.eigen_decompose(gpu[:5])
        assert int(st.sum()) == 0
        recon = [qi @ torch.diag(li) @ qi.T for li, qi in zip(lam, q)]
        worst[f"eigen_decompose {dtype}"] = max(rel_err(r, f) for r, f in zip(recon, factors[:5]))
        grads = [torch.randn(m, n, dtype=dtype) for m, n in ((1, 7), (64, 65), (130, 7))]
        g_side, a_side = (0, 2, 4), (1, 3, 1)  # factor sizes 1, 64, 130 and 7, 65, 7
        qg, lg = [q[i] for i in g_side], [lam[i] for i in g_side]
        qa, la = [q[i] for i in a_side], [lam[i] for i in a_side]
        out_g = ops.precondition_eigen(qg, lg, [g.to(DEVICE) for g in grads], qa, la, [1e-2, 1e-3, 0.5])
        out_c = ops.precondition_eigen(
            [t.cpu() for t in qg], [t.cpu() for t in lg], grads, [t.cpu() for t in qa], [t.cpu() for t in la], [1e-2, 1e-3, 0.5]
        )
        worst[f"precondition_eigen {dtype}"] = max(rel_err(g, c) for g, c in zip(out_g, out_c))
        grad = torch.randn(1, 7, dtype=dtype)
        pi_g = ops.precondition_inverse([inv_g[0]], [grad.to(DEVICE)], [inv_g[1]])
        pi_c = ops.precondition_inverse([inv_c[0]], [grad], [inv_c[1]])
        worst[f"precondition_inverse {dtype}"] = rel_err(pi_g[0], pi_c[0])
        for name, err in worst.items():
            assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"
        report.update(worst)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    for name, err in report.items():
        print(f"{name:50s} max rel err vs CPU {err:.2e}")
    print(f"cuda_smoke on {DEVICE}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
