"""factor_update_: F <- decay F + scale xbar^T xbar, xbar = [x, 1], vs float64 math."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import TOL, random_spd, rel_err, replace, requires_cuda

import kfac_ext.reference as reference
from kfac_ext import ops

OPS = ("factor_update",)

ROWS = [1, 7, 256, 1000]
DIMS = [1, 3, 17, 64, 65, 200, 333]  # 200, 333: the CPU op's GEMM in 3 and 4 column panels
X_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FACTOR_DTYPES = [torch.float32, torch.float64]


def expected(old: torch.Tensor, x: torch.Tensor, decay: float, scale: float, append_ones: bool):
    """The update in float64 from the inputs as given (a low-precision x is already rounded)."""
    xbar = x.to(torch.float64)
    if append_ones:
        xbar = torch.cat([xbar, torch.ones_like(xbar[:, :1])], dim=1)
    return decay * old.to(torch.float64) + scale * (xbar.T @ xbar)


def make_layer(rows, d, append_ones, x_dtype, factor_dtype, device):
    x = torch.randn(rows, d, device=device).to(x_dtype)
    old = random_spd(d + append_ones, factor_dtype, device)
    return old, x


def check_update(rows, d, append_ones, decay, x_dtype, factor_dtype, device):
    old, x = make_layer(rows, d, append_ones, x_dtype, factor_dtype, device)
    factor, scale = old.clone(), 1.0 / rows
    ops.factor_update_([factor], [x], decay=decay, scales=scale, append_ones=append_ones)
    assert factor.dtype == factor_dtype and factor.shape == old.shape
    assert torch.equal(factor, factor.T)
    assert rel_err(factor, expected(old, x, decay, scale, append_ones)) < TOL[factor_dtype]


@pytest.mark.parametrize("rows,d", list(itertools.product(ROWS, DIMS)))
@pytest.mark.parametrize("append_ones", [False, True])
@pytest.mark.parametrize("decay", [0.0, 0.95])
def test_matches_float64_all_shapes(device, rows, d, append_ones, decay):
    check_update(rows, d, append_ones, decay, torch.float32, torch.float32, device)


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES)
@pytest.mark.parametrize(
    "rows,d,append_ones,decay", [(7, 65, True, 0.95), (1000, 17, False, 0.0), (1, 200, True, 0.0)]
)
def test_matches_float64_all_dtypes(device, rows, d, append_ones, decay, x_dtype, factor_dtype):
    check_update(rows, d, append_ones, decay, x_dtype, factor_dtype, device)


@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES)
@pytest.mark.parametrize("decay", [0.0, 0.95])
def test_many_layers_in_one_call(device, factor_dtype, decay):
    shapes = [(7, 3, True), (256, 65, False), (1, 1, True), (1000, 200, True), (33, 17, False),
              (7, 3, True)]  # the last repeats the first: same-size layers in one call
    layers = [make_layer(r, d, a, torch.float32, factor_dtype, device) for r, d, a in shapes]
    factors = [old.clone() for old, _ in layers]
    scales = [1.0 / r for r, _, _ in shapes]
    append = [a for _, _, a in shapes]
    ops.factor_update_(factors, [x for _, x in layers], decay=decay, scales=scales, append_ones=append)
    for factor, (old, x), scale, a in zip(factors, layers, scales, append):
        assert torch.equal(factor, factor.T)
        assert rel_err(factor, expected(old, x, decay, scale, a)) < TOL[factor_dtype]


# The CUDA routing (csrc/cuda/factor_update.cu): layers of side <= 256 and rows <= 1024 go through
# one launch of the fused multi-layer kernel; larger layers take cuBLAS + one mirror launch. A launch table holds 60 fused entries and 160 mirror entries: more launch in chunks.
# These cases reach each path on CUDA and pin the same semantics on CPU.
FUSED_SHAPES = [(0, 5, True), (1, 1, True), (1, 31, False), (37, 32, False), (33, 63, True),
                (1024, 127, True), (200, 255, True), (5, 256, False), (64, 17, True)]


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES)
@pytest.mark.parametrize("decay", [0.0, 0.95])
def test_fused_small_layers(device, x_dtype, factor_dtype, decay):
    """Nine small layers in one call (CUDA: the fused kernel), with a cuBLAS-sized layer beside
    them (1025 rows): partial tiles, one row, zero rows, sides 1..256, every dtype pair."""
    shapes = FUSED_SHAPES + [(1025, 40, True)]
    layers = [make_layer(r, d, a, x_dtype, factor_dtype, device) for r, d, a in shapes]
    factors = [old.clone() for old, _ in layers]
    if decay == 0.0:
        factors[2][0, 0] = factors[-1][1, 3] = float("nan")  # stale values that decay 0 drops
    scales = [0.5 / max(r, 1) for r, _, _ in shapes]
    append = [a for *_, a in shapes]
    ops.factor_update_(factors, [x for _, x in layers], decay=decay, scales=scales, append_ones=append)
    for factor, (old, x), scale, a in zip(factors, layers, scales, append):
        assert torch.equal(factor, factor.T)
        want = expected(old, x, decay, scale, a)
        if not want.any():  # zero rows and decay 0: exactly zero (a relative error is 0 / 0)
            assert not factor.any()
        else:
            assert rel_err(factor, want) < TOL[factor_dtype]


@pytest.mark.parametrize("count,rows", [(130, 9), (170, 1025)], ids=["130 fused", "170 cuBLAS"])
@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES)
def test_more_layers_than_one_launch_table(device, count, rows, factor_dtype):
    """More layers than one launch table holds: 130 small layers (CUDA: fused, three chunks of at
    most 60) or 170 layers of 1025 rows (cuBLAS, mirrored in two chunks of at most 160); each
    layer's result must land in its own factor."""
    shapes = [(rows, 1 + i % 9, bool(i % 2)) for i in range(count)]
    layers = [make_layer(r, d, a, torch.float32, factor_dtype, device) for r, d, a in shapes]
    factors = [old.clone() for old, _ in layers]
    scales = [1.0 / (i + 1) for i in range(count)]
    append = [a for *_, a in shapes]
    ops.factor_update_(factors, [x for _, x in layers], decay=0.5, scales=scales, append_ones=append)
    for factor, (old, x), scale, a in zip(factors, layers, scales, append):
        assert torch.equal(factor, factor.T)
        assert rel_err(factor, expected(old, x, 0.5, scale, a)) < TOL[factor_dtype]


@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES)
@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_zero_rows_decays_only(device, factor_dtype, decay):
    """rows = 0 on both paths (eight small layers and a large one): F <- decay F, the ones column
    and its corner included (they gain scale * 0)."""
    sides = [2, 9, 17, 32, 33, 64, 100, 256, 300]
    old = [random_spd(n, factor_dtype, device) for n in sides]
    factors = [f.clone() for f in old]
    xs = [torch.empty(0, n - 1, dtype=factor_dtype, device=device) for n in sides]
    ops.factor_update_(factors, xs, decay=decay, scales=0.5, append_ones=True)
    for factor, f in zip(factors, old):
        if decay == 0.0:
            assert not factor.any()
        else:
            assert rel_err(factor, decay * f.double()) <= 4 * torch.finfo(factor_dtype).eps


@pytest.mark.parametrize("append_ones", [False, True])
@pytest.mark.parametrize("d", [17, 200])
def test_zero_decay_drops_stale_nan_and_inf(device, append_ones, d):
    rows = 9
    old, x = make_layer(rows, d, append_ones, torch.float32, torch.float32, device)
    factor = old.clone()
    factor[0, 0] = factor[3, 5] = factor[-1, -1] = float("nan")
    factor[-1, 0] = factor[2, -1] = float("inf")
    ops.factor_update_([factor], [x], decay=0.0, scales=0.5, append_ones=append_ones)
    assert torch.isfinite(factor).all()
    assert rel_err(factor, expected(old, x, 0.0, 0.5, append_ones)) < TOL[torch.float32]


@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES)
@pytest.mark.parametrize("decay", [0.0, 0.95])
def test_homogeneous_coordinate_is_last(device, factor_dtype, decay):
    """The corner gains scale * rows and the ones row/column gains scale * column sums of x."""
    rows, d, scale = 37, 5, 0.3
    old, x = make_layer(rows, d, True, torch.float64, factor_dtype, device)
    factor = old.clone()
    ops.factor_update_([factor], [x], decay=decay, scales=scale, append_ones=True)
    old, factor = old.double(), factor.double()
    colsum = x.double().sum(0)
    tol = TOL[factor_dtype]
    assert math.isclose(factor[d, d].item(), decay * old[d, d].item() + scale * rows, rel_tol=tol)
    assert rel_err(factor[:d, d], decay * old[:d, d] + scale * colsum) < tol
    assert rel_err(factor[d, :d], decay * old[d, :d] + scale * colsum) < tol


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES)
@pytest.mark.parametrize("decay", [0.0, 0.95])
def test_matches_reference(device, x_dtype, factor_dtype, decay):
    shapes = [(7, 3, True), (256, 64, False), (1, 1, True), (1000, 65, True)]
    layers = [make_layer(r, d, a, x_dtype, factor_dtype, device) for r, d, a in shapes]
    kwargs = dict(decay=decay, scales=[0.5, 0.25, 2.0, 1e-3], append_ones=[a for *_, a in shapes])
    native = [old.clone() for old, _ in layers]
    ref = [old.clone() for old, _ in layers]
    ops.factor_update_(native, [x for _, x in layers], **kwargs)
    reference.factor_update_(ref, [x for _, x in layers], **kwargs)
    for n, r in zip(native, ref):
        assert rel_err(n, r) < TOL[factor_dtype]


def opcheck_args(device, x_dtype=torch.float32):
    factors = [random_spd(4, device=device), random_spd(5, device=device)]
    xs = [torch.randn(6, 3, device=device).to(x_dtype), torch.randn(2, 5, device=device).to(x_dtype)]
    return (factors, xs, 0.9, [0.5, 0.25], [True, False])


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, x_dtype):
    torch.library.opcheck(torch.ops.kfac_ext.factor_update, opcheck_args(device, x_dtype))


# ---- bad inputs: each names the op and the argument -------------------------------------------


def good_args(device):
    return dict(
        factors=[random_spd(4, device=device), random_spd(3, device=device)],
        xs=[torch.randn(5, 3, device=device), torch.randn(6, 3, device=device)],
        decay=0.9,
        scales=[0.5, 0.25],
        append_ones=[True, False],
    )


BAD = {
    "factor 1-D": ("factors", 1, lambda f: f[0], RuntimeError, r"factor_update: factors\[1\] must be 2-D"),
    "x 3-D": ("xs", 1, lambda x: x[None], RuntimeError, r"factor_update: xs\[1\] must be 2-D"),
    "non-square factor": ("factors", 1, lambda f: f[:, :2].contiguous(), RuntimeError,
                          r"factor_update: factors\[1\] must be square"),
    "d mismatch": ("xs", 1, lambda x: torch.randn(6, 4, device=x.device), RuntimeError,
                   r"factor_update: factors\[1\] has shape \[3, 3\] but xs\[1\] has 4 columns"),
    "d mismatch with ones": ("xs", 0, lambda x: torch.randn(5, 4, device=x.device), RuntimeError,
                             r"factor_update: factors\[0\] .* plus the appended ones column"),
    "xs too short": ("xs", None, lambda xs: xs[:1], RuntimeError,
                     r"factor_update: xs has 1 entries but factors has 2"),
    "scales too long": ("scales", None, lambda s: s + [1.0], ValueError,
                        r"scales has 3 entries but there are 2 layers"),
    "append_ones too short": ("append_ones", None, lambda a: a[:1], ValueError,
                              r"append_ones has 1 entries but there are 2 layers"),
    "int x": ("xs", 1, lambda x: x.to(torch.int32), RuntimeError,
              r"factor_update: xs\[1\] must be float32, float64, bfloat16 or float16, got Int"),
    "int factor": ("factors", 0, lambda f: f.to(torch.int64), RuntimeError,
                   r"factor_update: factors\[0\] must be float32 or float64, got Long"),
    "bf16 factor": ("factors", 1, lambda f: f.to(torch.bfloat16), RuntimeError,
                    r"factor_update: factors\[1\] must be float32 or float64, got BFloat16"),
    "mixed factor dtypes": ("factors", 1, lambda f: f.double(), RuntimeError,
                            r"factor_update: factors\[1\] has dtype Double but factors\[0\] has Float"),
    "mixed x dtypes": ("xs", 1, lambda x: x.half(), RuntimeError,
                       r"factor_update: xs\[1\] has dtype Half but xs\[0\] has Float"),
    "transposed factor": ("factors", 1, lambda f: torch.randn_like(f).T, RuntimeError,
                          r"factor_update: factors\[1\] must be contiguous"),
    "transposed x": ("xs", 1, lambda x: torch.randn(3, 6, device=x.device).T, RuntimeError,
                     r"factor_update: xs\[1\] must be contiguous"),
    "negative scale": ("scales", 1, lambda s: -1.0, RuntimeError,
                       r"factor_update: scales\[1\] must be finite and >= 0, got -1"),
    "nan scale": ("scales", 1, lambda s: math.nan, RuntimeError,
                  r"factor_update: scales\[1\] must be finite and >= 0, got nan"),
    "inf scale": ("scales", 0, lambda s: math.inf, RuntimeError,
                  r"factor_update: scales\[0\] must be finite and >= 0, got inf"),
    "decay > 1": ("decay", None, lambda _: 1.5, RuntimeError, r"factor_update: decay must be in \[0, 1\], got 1.5"),
    "decay < 0": ("decay", None, lambda _: -0.1, RuntimeError, r"factor_update: decay must be in \[0, 1\], got -0.1"),
    "nan decay": ("decay", None, lambda _: math.nan, RuntimeError, r"factor_update: decay must be in \[0, 1\], got nan"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_input(device, case):
    field, index, make, error, match = case
    args = replace(good_args(device), field, index, make)
    before = [f.clone() for f in args["factors"]]
    with pytest.raises(error, match=match):
        ops.factor_update_(**args)
    for f, b in zip(args["factors"], before):  # a rejected call changes nothing
        assert torch.equal(f, b)


def test_empty_lists():
    with pytest.raises(ValueError, match=r"factor_update: factors must hold at least one tensor"):
        ops.factor_update_([], [], decay=0.5, scales=1.0, append_ones=False)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("field,index", [("factors", 1), ("xs", 0), ("xs", 1)])
def test_mixed_devices(field, index):
    args = replace(good_args("cpu"), field, index, lambda t: t.cuda())
    with pytest.raises(RuntimeError, match=rf"factor_update: {field}\[{index}\] is on cuda"):
        ops.factor_update_(**args)
