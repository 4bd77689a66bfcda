"""Every layer kind of :mod:`kfac_ext.layers` against a hand-written float64 computation.

The expected factors never use the preconditioner's hooks: each case runs its own forward with
the block's input rows and output kept (``retain_grad``), backpropagates the loss, and builds
``A = Σ ā āᵀ / rows`` and ``G = Σ g gᵀ`` (``"empirical"``, ``reduction="sum"``: per-term gradients
are the loss's own) for K-FAC-expand (every position a row) and K-FAC-reduce (activations averaged,
gradients summed over positions). Then, with one layer and one example, K-FAC equals the exact
Fisher block where the theory says it must (type-2, float64).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_ext.capture
from kfac_ext import KFAC, KFACPreconditioner
from kfac_ext.layers import find_blocks
from kfac_ext.losses import make_loss

F64 = torch.float64


def ones_col(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)


def factor_from(rows_a: torch.Tensor, rows_g: torch.Tensor, approx: str):
    """``rows_a`` ``[N, T, a]`` (with the ones column), ``rows_g`` ``[N, T, g]`` -> (A, G)."""
    if approx == "reduce":
        rows_a, rows_g = rows_a.mean(1), rows_g.sum(1)
    else:
        rows_a, rows_g = rows_a.reshape(-1, rows_a.shape[-1]), rows_g.reshape(-1, rows_g.shape[-1])
    return rows_a.T @ rows_a / rows_a.shape[0], rows_g.T @ rows_g


def captured(model, loss_of, approx="expand", **kwargs):
    """The factors the preconditioner captures for one step of ``loss_of(model)`` ("empirical",
    sum): ``{block name: (A, G)}``."""
    precond = KFACPreconditioner(model, loss=None, fisher_type="empirical", reduction="sum", kfac_approx=approx,
                                 factor_dtype=F64, inv_dtype=F64, **kwargs)
    loss_of(model).backward()
    precond.step()
    precond.remove_hooks()
    return precond.factors()


def assert_factors(got, name, expected):
    a, g = got[name]
    torch.testing.assert_close(a, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, expected[1], rtol=1e-12, atol=1e-12)


# ---- Linear on [B, T, d] and convolutions: expand and reduce ---------------------------------


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_linear_on_sequences(approx):
    torch.manual_seed(0)
    lin, head = nn.Linear(5, 4).double(), nn.Linear(4, 3).double()
    model = nn.Sequential(lin, nn.Tanh(), head)
    x, y = torch.randn(3, 6, 5, dtype=F64), torch.randn(3, 6, 3, dtype=F64)
    got = captured(model, lambda m: ((m(x) - y) ** 2).sum(), approx)

    s = F.linear(x, lin.weight, lin.bias)
    s.retain_grad()
    ((head(torch.tanh(s)) - y) ** 2).sum().backward()
    assert_factors(got, "0", factor_from(ones_col(x), s.grad, approx))


def conv_patches(x: torch.Tensor, kernel: int, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """``[N, L, C·k]`` patches of a 1-d convolution, by explicit slicing."""
    x = F.pad(x, (padding, padding))
    span = dilation * (kernel - 1) + 1
    starts = range(0, x.shape[-1] - span + 1, stride)
    return torch.stack([x[:, :, t:t + span:dilation].reshape(x.shape[0], -1) for t in starts], 1)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv1d(approx):
    torch.manual_seed(1)
    conv = nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2).double())
    x = torch.randn(5, 3, 11, dtype=F64)
    model(x)
    y = torch.randn(5, 2, dtype=F64)
    got = captured(model, lambda m: ((m(x) - y) ** 2).sum(), approx)

    s = conv(x)
    s.retain_grad()
    ((model[3](torch.tanh(s).flatten(1)) - y) ** 2).sum().backward()
    patches = conv_patches(x, 3, 2, 1, 2)
    assert patches.shape[1] == s.shape[-1]
    assert_factors(got, "0", factor_from(ones_col(patches), s.grad.transpose(1, 2), approx))


def test_conv2d_reduce():
    """Conv2d: patches by explicit loops over output pixels, reduced over them."""
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=1, bias=False).double()
    x = torch.randn(4, 2, 5, 6, dtype=F64)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten())
    y = torch.randn_like(model(x))
    got = captured(model, lambda m: ((m(x) - y) ** 2).sum(), "reduce")

    s = conv(x)
    s.retain_grad()
    ((torch.tanh(s).flatten(1) - y) ** 2).sum().backward()
    xp = F.pad(x, (1, 1, 1, 1))
    patches = torch.stack([xp[:, :, i:i + 2, 2 * j:2 * j + 3].reshape(4, -1)
                           for i in range(s.shape[2]) for j in range(s.shape[3])], 1)
    assert_factors(got, "0", factor_from(patches, s.grad.flatten(2).transpose(1, 2), "reduce"))


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=1), (4, 2, 5, 6)),
    (nn.Conv2d(3, 2, 3, dilation=2, padding=2, stride=2), (3, 3, 9, 7)),
    (nn.Conv2d(2, 2, 3, padding="same", dilation=(1, 2)), (2, 2, 6, 5)),
    (nn.Conv2d(2, 2, 3, padding="valid"), (2, 5, 5)),  # unbatched
    (nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2), (5, 3, 11)),
])
@pytest.mark.parametrize("stride, offset", [(3, 0), (7, 5), (1, 0)])
def test_sampled_conv_patches_are_the_picked_im2col_rows(conv, shape, stride, offset):
    """A factor that takes every k-th row builds only those patches (not all of im2col's): the
    same rows, in the same order, as the explicit patches of every output position."""
    block = find_blocks(nn.Sequential(conv.double())).blocks[0]
    x = torch.randn(shape, dtype=F64)
    if conv.padding == "same":
        x_padded = F.pad(x, (2, 2, 1, 1))
    else:
        x_padded = x if isinstance(conv.padding, str) else F.pad(x, sum(([p, p] for p in conv.padding[::-1]), []))
    out = conv(x)
    batched = x_padded if x.dim() == 4 or isinstance(conv, nn.Conv1d) else x_padded.unsqueeze(0)
    if isinstance(conv, nn.Conv1d):
        batched = batched.unsqueeze(2)
    kh, kw = (1, conv.kernel_size[0]) if isinstance(conv, nn.Conv1d) else conv.kernel_size
    dh, dw = (1, conv.dilation[0]) if isinstance(conv, nn.Conv1d) else conv.dilation
    sh, sw = (1, conv.stride[0]) if isinstance(conv, nn.Conv1d) else conv.stride
    height, width = (1, out.shape[-1]) if isinstance(conv, nn.Conv1d) else out.shape[-2:]
    explicit = torch.stack([batched[:, :, i * sh:i * sh + dh * (kh - 1) + 1:dh,
                                    j * sw:j * sw + dw * (kw - 1) + 1:dw].reshape(batched.shape[0], -1)
                            for i in range(height) for j in range(width)], 1).reshape(-1, block.a_dim - 1)
    picks = []
    got = block.sampled_activation_rows(x, lambda n: picks.append(n) or slice(offset, None, stride))
    assert picks == [explicit.shape[0]]
    assert torch.equal(got, explicit[offset::stride]) and got.is_contiguous()
    assert torch.equal(block.sampled_activation_rows(x, lambda n: None), explicit)


# ---- Hugging Face Conv1D -----------------------------------------------------------------------


def test_hf_conv1d_is_a_transposed_linear():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(3)
    layer = pytorch_utils.Conv1D(4, 5).double()  # nf=4 outputs, nx=5 inputs: weight [5, 4]
    nn.init.normal_(layer.bias)
    x, y = torch.randn(3, 2, 5, dtype=F64), torch.randn(3, 2, 4, dtype=F64)
    got = captured(layer, lambda m: ((m(x) - y) ** 2).sum())
    s = x @ layer.weight + layer.bias
    s.retain_grad()
    ((s - y) ** 2).sum().backward()
    assert_factors(got, "", factor_from(ones_col(x), s.grad, "expand"))
    block = find_blocks(layer).blocks[0]
    assert (block.g_dim, block.a_dim) == (4, 6)
    torch.testing.assert_close(block.grad_matrix(), torch.cat([layer.weight.grad.T, layer.bias.grad[:, None]], 1))


# ---- Embedding: diagonal A ----------------------------------------------------------------------


def test_embedding_diagonal_a_and_dense_g():
    torch.manual_seed(4)
    emb, head = nn.Embedding(7, 3).double(), nn.Linear(3, 2).double()
    model = nn.Sequential(emb, head)
    ids = torch.tensor([[0, 2, 2, 5], [6, 2, 0, 0]])
    y = torch.randn(2, 4, 2, dtype=F64)
    got = captured(model, lambda m: ((m(ids) - y) ** 2).sum())

    s = emb(ids)
    s.retain_grad()
    ((head(s) - y) ** 2).sum().backward()
    a, g = got["0"]
    assert a.shape == (7,)  # never a dense vocab x vocab matrix
    onehot = F.one_hot(ids.reshape(-1), 7).to(F64)
    torch.testing.assert_close(torch.diag(a), onehot.T @ onehot / 8, rtol=0, atol=0)
    torch.testing.assert_close(g, s.grad.reshape(-1, 3).T @ s.grad.reshape(-1, 3), rtol=1e-12, atol=1e-12)


def test_embedding_update_is_g_inverse_grad_a_inverse():
    """The update of an embedding block is ``(G + √γ)⁻¹ ∇W̄ (A + √γ)⁻¹`` with ``W̄ = Wᵀ``,
    ``A`` diagonal: each token's row scaled by its own damped frequency."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Linear(3, 4)).double()
    ids, y = torch.randint(0, 6, (5, 3)), torch.randint(0, 4, (5, 3))
    for inversion in ("cholesky", "eigen"):
        precond = KFACPreconditioner(model, "cross_entropy", inversion=inversion, damping=1e-2,
                                     factor_dtype=F64, inv_dtype=F64)
        model.zero_grad()
        F.cross_entropy(model(ids).reshape(-1, 4), y.reshape(-1)).backward()
        raw = model[0].weight.grad.T.clone()
        precond.step()
        a, g = precond.factors()["0"]
        eye = torch.eye(3, dtype=F64)
        expected = torch.linalg.solve(g + 0.1 * eye, raw) / (a + 0.1)
        torch.testing.assert_close(model[0].weight.grad.T, expected, rtol=1e-9, atol=1e-12)
        precond.remove_hooks()


# ---- MultiheadAttention ------------------------------------------------------------------------


def manual_attention(mha: nn.MultiheadAttention, query, key, value, attn_mask=None):
    """MHA by hand (batch-first inputs, no dropout). Returns the output and, per block, its
    (input, output) with the outputs' ``retain_grad``."""
    e, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    q, k, v = query @ wq.T + bq, key @ wk.T + bk, value @ wv.T + bv
    for t in (q, k, v):
        t.retain_grad()

    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], h, e // h).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(e // h)
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf"))
    context = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(query.shape[0], query.shape[1], e)
    out = context @ mha.out_proj.weight.T + mha.out_proj.bias
    out.retain_grad()
    return out, dict(q=(query, q), k=(key, k), v=(value, v), out_proj=(context.detach(), out))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", ["self", "cross", "kdim-vdim", "causal"])
def test_multihead_attention_blocks(case, approx):
    torch.manual_seed(6)
    e, b, lq, lk = 6, 3, 4, 5
    kdim = vdim = 4 if case == "kdim-vdim" else None
    mha = nn.MultiheadAttention(e, 2, batch_first=True, kdim=kdim, vdim=vdim).double()
    nn.init.normal_(mha.in_proj_bias)
    query = torch.randn(b, lq, e, dtype=F64)
    key = query if case in ("self", "causal") else torch.randn(b, lk, kdim or e, dtype=F64)
    value = key if case != "kdim-vdim" else torch.randn(b, lk, vdim, dtype=F64)
    mask = nn.Transformer.generate_square_subsequent_mask(lq, dtype=F64).isinf() if case == "causal" else None
    y = torch.randn(b, lq, e, dtype=F64)

    def loss_of(m):
        return ((m(query, key, value, attn_mask=mask, need_weights=False)[0] - y) ** 2).sum()

    got = captured(mha, loss_of, approx)
    out, outputs = manual_attention(mha, query, key, value, mask)
    torch.testing.assert_close(out, mha(query, key, value, attn_mask=mask, need_weights=False)[0])
    ((out - y) ** 2).sum().backward()
    assert set(got) == {"q", "k", "v", "out_proj"}
    for name, (x, s) in outputs.items():
        assert_factors(got, name, factor_from(ones_col(x), s.grad, approx))


def test_multihead_attention_grad_written_to_packed_rows():
    """The update of q, k, v goes to their rows of ``in_proj_weight`` / ``in_proj_bias``."""
    torch.manual_seed(7)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).double()
    precond = KFACPreconditioner(mha, loss="mse", output_fn=lambda out: out[0], inversion="cholesky",
                                 factor_dtype=F64, inv_dtype=F64)
    x = torch.randn(2, 3, 4, dtype=F64)
    F.mse_loss(mha(x, x, x)[0], torch.randn(2, 3, 4, dtype=F64)).backward()
    raw_w, raw_b = mha.in_proj_weight.grad.clone(), mha.in_proj_bias.grad.clone()
    precond.step()
    inverses = precond.inverses.records
    for i, name in enumerate("qkv"):
        rows = slice(4 * i, 4 * i + 4)
        wbar = torch.cat([raw_w[rows], raw_b[rows, None]], 1)
        expected = inverses[name][1].matrix @ wbar @ inverses[name][0].matrix
        torch.testing.assert_close(mha.in_proj_weight.grad[rows], expected[:, :4], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(mha.in_proj_bias.grad[rows], expected[:, 4], rtol=1e-10, atol=1e-12)


def test_attention_tap_restores_linear_even_on_error():
    mha = nn.MultiheadAttention(4, 2)
    KFACPreconditioner(mha, loss="mse", output_fn=lambda out: out[0])
    original = F.linear
    with pytest.raises((RuntimeError, AssertionError)):
        mha(torch.randn(3, 2, 4), torch.randn(3, 2, 5), torch.randn(3, 2, 4))  # wrong key size
    assert F.linear is original
    mha(torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4))
    assert F.linear is original


# ---- one layer: K-FAC is the exact Fisher block where the theory says so ------------------------
#
# The reference never goes through kfac_ext.losses (whose Hessian square root type-2 K-FAC itself
# uses): it is the Hessian of the loss as the user computes it (F.cross_entropy / F.mse_loss with
# their reduction) w.r.t. all the model's outputs, by double backward, between the Jacobians of
# the outputs w.r.t. the block's W̄ (a generalised Gauss-Newton block: the Fisher of these
# likelihoods). Every case has N = 3 examples, so that a mean's 1/M is exercised; the examples'
# terms differ (through a fixed offset per example added to the logits) where the block's input
# must be the same in every example for K-FAC to be exact.

N_EXAMPLES = 3


def user_loss(loss_name: str, reduction: str, targets: torch.Tensor):
    """The loss as a user writes it, a function of the model's output."""
    if loss_name == "cross_entropy":
        return lambda z: F.cross_entropy(z, targets, reduction=reduction)
    return lambda z: F.mse_loss(z, targets, reduction=reduction)


def exact_block_fisher(model, block, x, loss_fn) -> torch.Tensor:
    """``Jᵀ (∇²_z L) J`` for the block's ``vec(W̄)`` (row-major): ``J = ∂z/∂vec(W̄)`` of every
    element of ``z = model(x)``, ``L = loss_fn(z)`` differentiated twice by autograd (double backward)."""
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    w_name = names[id(block.weight)]
    b_name = names[id(block.bias)] if block.bias is not None else None

    def outputs(w, b):
        replaced = {w_name: w} | ({b_name: b} if b_name else {})
        return torch.func.functional_call(model, replaced, (x,))

    z = model(x).detach()
    d = z.numel()
    b0 = block.bias.detach() if block.bias is not None else torch.zeros(0, dtype=F64)
    jw, jb = torch.autograd.functional.jacobian(outputs, (block.weight.detach(), b0))
    jw, jb = jw.reshape(d, *block.weight.shape), jb.reshape(d, *b0.shape)
    jac = torch.stack([block.matrix(jw[o], jb[o] if b_name else None).reshape(-1) for o in range(d)])  # [d, g·a]
    hessian = torch.autograd.functional.hessian(loss_fn, z).reshape(d, d)
    return jac.T @ hessian @ jac


def kfac_block(model, name, x, loss_name, targets, approx="expand", reduction="mean"):
    """Block ``name`` and its type-2 ``G ⊗ A`` after one step on ``user_loss(...)(model(x))``."""
    precond = KFACPreconditioner(model, loss_name, reduction=reduction, fisher_type="type-2", kfac_approx=approx,
                                 factor_dtype=F64, inv_dtype=F64)
    user_loss(loss_name, reduction, targets)(model(x)).backward()
    precond.step()
    precond.remove_hooks()
    model.zero_grad()
    block = next(b for b in precond.blocks if b.name == name)
    a, g = precond.factors()[name]
    return block, torch.kron(g, torch.diag(a) if a.dim() == 1 else a)


class Offset(nn.Module):
    """``fn(inner(x)) + offset``: ``[N, D]`` logits, with a fixed offset per example (a buffer), so
    that examples with the same input to ``inner`` still have different loss curvatures."""

    def __init__(self, inner, fn, classes: int):
        super().__init__()
        self.inner, self.fn = inner, fn
        self.register_buffer("offset", 2 * torch.randn(N_EXAMPLES, classes, dtype=F64))

    def forward(self, x):
        return self.fn(self.inner(x)) + self.offset


def classes_of(n: int) -> torch.Tensor:
    return torch.randint(0, n, (N_EXAMPLES,))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_fisher_embedding_one_token(reduction):
    torch.manual_seed(8)
    model = Offset(nn.Embedding(5, 4).double(), lambda z: z, 4)
    x, y = torch.tensor([3] * N_EXAMPLES), classes_of(4)
    block, kfac = kfac_block(model, "inner", x, "cross_entropy", y, reduction=reduction)
    exact = exact_block_fisher(model, block, x, user_loss("cross_entropy", reduction, y))
    torch.testing.assert_close(kfac, exact, rtol=1e-10, atol=1e-12)


def test_exact_fisher_hf_conv1d_one_input():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(9)
    layer = pytorch_utils.Conv1D(3, 4).double()
    nn.init.normal_(layer.bias)
    model = Offset(layer, lambda z: z, 3)
    x, y = torch.randn(1, 4, dtype=F64).expand(N_EXAMPLES, 4), classes_of(3)
    block, kfac = kfac_block(model, "inner", x, "cross_entropy", y)
    exact = exact_block_fisher(model, block, x, user_loss("cross_entropy", "mean", y))
    torch.testing.assert_close(kfac, exact, rtol=1e-10, atol=1e-12)


def test_exact_fisher_conv1d_reduce_with_mean_pooling_not_expand():
    """A convolution followed by mean pooling is the reduce setting: K-FAC-reduce is exact when
    every example has the same input, K-FAC-expand is not (Eschenhagen et al. 2023, §3)."""
    torch.manual_seed(10)
    model = Offset(nn.Conv1d(2, 3, 3).double(), lambda z: z.mean(-1), 3)
    x, y = torch.randn(1, 2, 7, dtype=F64).expand(N_EXAMPLES, 2, 7), classes_of(3)
    block, reduce = kfac_block(model, "inner", x, "cross_entropy", y, approx="reduce")
    exact = exact_block_fisher(model, block, x, user_loss("cross_entropy", "mean", y))
    torch.testing.assert_close(reduce, exact, rtol=1e-10, atol=1e-12)
    _, expand = kfac_block(model, "inner", x, "cross_entropy", y, approx="expand")
    assert (expand - exact).abs().max() > 1e-3 * exact.abs().max()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_fisher_linear_expand_per_position_mse(reduction):
    """A Linear applied per position with a per-position loss of constant Hessian (squared error)
    is the expand setting: K-FAC-expand is exact, here for three different inputs (F.mse_loss's
    mean divides by N·T·D: its per-example term carries 1/(T·D), and M = N)."""
    torch.manual_seed(11)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(N_EXAMPLES, 5, 3, dtype=F64), torch.randn(N_EXAMPLES, 5, 2, dtype=F64)
    block, expand = kfac_block(model, "", x, "mse", y, reduction=reduction)
    exact = exact_block_fisher(model, block, x, user_loss("mse", reduction, y))
    torch.testing.assert_close(expand, exact, rtol=1e-10, atol=1e-12)


def test_exact_fisher_attention_one_token():
    """One token: attention is linear in v (softmax over one key is 1), so the v and out_proj
    blocks are exact (the same token in every example), and q, k carry no curvature (G = 0)."""
    torch.manual_seed(12)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).double()
    nn.init.normal_(mha.in_proj_bias)
    model = Offset(mha, lambda out: out, 4)
    model.forward = lambda x, inner=mha, offset=model.offset: (
        inner(x, x, x, need_weights=False)[0].reshape(N_EXAMPLES, -1) + offset)
    x, y = torch.randn(1, 1, 4, dtype=F64).expand(N_EXAMPLES, 1, 4), classes_of(4)
    precond = KFACPreconditioner(model, "cross_entropy", fisher_type="type-2", factor_dtype=F64, inv_dtype=F64)
    loss_fn = user_loss("cross_entropy", "mean", y)
    loss_fn(model(x)).backward()
    precond.step()
    factors = precond.factors()
    for block in precond.blocks:
        a, g = factors[block.name]
        if block.name in ("inner.q", "inner.k"):
            assert g.abs().max() < 1e-12
            continue
        with precond.pause():  # its forwards are no micro-batches of the preconditioner's
            exact = exact_block_fisher(model, block, x, loss_fn)
        torch.testing.assert_close(torch.kron(g, a), exact, rtol=1e-9, atol=1e-12)


# ---- [B, T, C] logits: masks and the token count ------------------------------------------------


class TokenModel(nn.Module):
    def __init__(self, vocab=6, dim=4):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, ids, labels=None):
        return self.head(torch.tanh(self.emb(ids)))


def type2_g_by_hand(model, ids, counted: torch.Tensor, reduction: str) -> torch.Tensor:
    """G of the head for token cross-entropy, by backpropagating every Hessian square-root column
    restricted to the counted tokens; w = 1/M for a token mean."""
    h = torch.tanh(model.emb(ids))
    s = model.head(h)
    probs = s.detach().softmax(-1)
    m = int(counted.sum())
    g = torch.zeros(6, 6, dtype=F64)
    for k in range(6):
        col = probs[..., k:k + 1].sqrt() * (F.one_hot(torch.tensor(k), 6).to(F64) - probs) * counted[..., None]
        grad = col.reshape(-1, 6)  # the head's output gradient for the surrogate Σ col·s is col
        g += grad.T @ grad
    return g / m if reduction == "mean" else g


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_token_cross_entropy_counts_only_labelled_tokens(reduction):
    torch.manual_seed(13)
    model = TokenModel().double()
    ids = torch.randint(0, 6, (3, 5))
    labels = torch.randint(0, 6, (3, 5))
    labels[0, 3:] = -100
    labels[2, 0] = -100
    counted = labels != -100
    precond = KFACPreconditioner(model, "cross_entropy", reduction=reduction, fisher_type="type-2",
                                 factor_dtype=F64, inv_dtype=F64)
    logits = model(ids, labels=labels)
    F.cross_entropy(logits.reshape(-1, 6), labels.reshape(-1), reduction=reduction).backward()
    precond.step()
    assert precond.capture.terms == int(counted.sum())
    torch.testing.assert_close(precond.factors()["head"][1], type2_g_by_hand(model, ids, counted, reduction),
                               rtol=1e-12, atol=1e-14)


def test_token_cross_entropy_empirical_g_is_scaled_by_token_count():
    """"empirical" with a token-mean loss: per-token gradients are M·∂L/∂s (M counted tokens),
    G = (1/M) Σ g gᵀ = M Σ h hᵀ — the same convention as a per-example mean."""
    torch.manual_seed(14)
    model = TokenModel().double()
    ids, labels = torch.randint(0, 6, (2, 4)), torch.randint(0, 6, (2, 4))
    labels[1, 2:] = -100
    precond = KFACPreconditioner(model, "cross_entropy", fisher_type="empirical", factor_dtype=F64, inv_dtype=F64)
    s = model(ids, labels=labels)
    s.retain_grad()
    F.cross_entropy(s.reshape(-1, 6), labels.reshape(-1)).backward()
    precond.step()
    m = int((labels != -100).sum())
    h = s.grad.reshape(-1, 6)
    torch.testing.assert_close(precond.factors()["head"][1], m * h.T @ h, rtol=1e-12, atol=1e-14)


def test_mc_samples_nothing_at_ignored_positions():
    loss = make_loss("cross_entropy")
    logits = torch.randn(2, 3, 5, dtype=F64)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    v = loss.sample_output_grads(logits, torch.Generator().manual_seed(0), mask)
    assert v.shape == logits.shape
    assert torch.all(v[~mask] == 0) and torch.all(v[mask].abs().sum(-1) > 0)
    cols = loss.hessian_sqrt(logits, mask)
    assert cols.shape == (5, 2, 3, 5) and torch.all(cols[:, ~mask] == 0)
    hessian = torch.einsum("kntc,kntd->ntcd", cols, cols)
    p = logits.softmax(-1)
    torch.testing.assert_close(hessian[mask], (torch.diag_embed(p) - p[..., :, None] * p[..., None, :])[mask])


# ---- parameters as people hold them --------------------------------------------------------------


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.mid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 9, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mid(self.emb(ids))))


def test_tied_weights_go_to_the_base_optimizer_with_a_reason():
    precond = KFACPreconditioner(Tied(), "cross_entropy")
    assert [b.name for b in precond.blocks] == ["mid"]
    reasons = dict(precond.unregistered)
    assert "tied" in reasons["emb"] and "out" in reasons["emb"]
    assert "tied" in reasons["out"] and "emb" in reasons["out"]


def test_frozen_bias_has_no_ones_column_and_no_grad():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    opt = KFAC(model, update="sgd", lr=0.1, loss="cross_entropy")
    precond = opt.preconditioner
    assert [(b.name, b.a_dim, b.has_bias) for b in precond.blocks] == [("0", 3, False)]
    assert ("2", "weight is frozen") in precond.unregistered
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert model[0].bias.grad is None
    assert precond.factors()["0"][0].shape == (3, 3)


def test_skip_layers_takes_regular_expressions_and_types():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
    precond = KFACPreconditioner(model, "mse", skip_layers=(r"layers\.\d+\.self_attn", nn.LayerNorm))
    assert [b.name for b in precond.blocks] == [f"layers.{i}.linear{j}" for i in range(2) for j in (1, 2)]
    reasons = dict(precond.unregistered)
    assert reasons["layers.0.self_attn"] == reasons["layers.1.norm2"] == "skipped by skip_layers"


def test_max_factor_dim_leaves_huge_sides_out_and_memory_is_reported():
    model = nn.Sequential(nn.Embedding(5000, 8), nn.Linear(8, 16), nn.Linear(16, 5000))
    precond = KFACPreconditioner(model, "cross_entropy", max_factor_dim=1024)
    assert [b.name for b in precond.blocks] == ["0", "1"]  # the embedding's A is a vector
    assert dict(precond.unregistered)["2"] == "G would be 5000x5000, above max_factor_dim=1024"
    ids = torch.randint(0, 5000, (4, 3))
    F.cross_entropy(model(ids).reshape(-1, 5000), torch.randint(0, 5000, (12,))).backward()
    precond.step()
    usage = precond.memory_usage()
    factors = 4 * (5000 + 8 * 8 + 9 * 9 + 16 * 16)
    # eigen with Tikhonov damping keeps the inverse Q diag(1 / (λ + d)) Qᵀ of each side (a diagonal
    # A: its reciprocal)
    inverses = 4 * (5000 + 64 + 81 + 256)
    assert usage == dict(factors=factors, inverses=inverses, total=factors + inverses)


def test_kfac_accepts_param_groups_with_weight_decay():
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    decay = [model[0].weight, model[2].weight]
    no_decay = [model[0].bias, model[1].weight, model[1].bias, model[2].bias]
    opt = KFAC([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], update="sgd",
               model=model, lr=0.05, loss="cross_entropy", kl_clip=None)
    norm_before = model[1].weight.detach().clone()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    grad_norm = model[1].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model[1].weight, norm_before - 0.05 * grad_norm)  # plain SGD, no decay
    with pytest.raises(TypeError, match="model="):
        KFAC(model.parameters(), update="sgd", lr=0.1, loss="cross_entropy")
    with pytest.raises(ValueError, match="not in params"):
        KFAC([model[0].weight], update="sgd", model=model, lr=0.1, loss="cross_entropy")


# ---- capture that does what the user meant ----------------------------------------------------


def type2_factors_of_one_batch(model, x, y, fisher_type="type-2") -> dict:
    """The float64 factors (type-2 unless told) of one plain step on ``(x, y)`` (hooks removed
    after)."""
    precond = KFACPreconditioner(model, "cross_entropy", fisher_type=fisher_type, factor_dtype=F64)
    F.cross_entropy(model(x), y).backward()
    precond.step()
    precond.remove_hooks()
    model.zero_grad()
    return {k: (a.clone(), g.clone()) for k, (a, g) in precond.factors().items()}


def test_pause_and_eval_and_no_grad_forwards_are_not_captured():
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=F64), torch.randint(0, 2, (6,))
    expected = type2_factors_of_one_batch(model, x, y)

    precond = KFACPreconditioner(model, "cross_entropy", fisher_type="type-2", factor_dtype=F64)
    with precond.pause():
        model(torch.randn(9, 3, dtype=F64))  # a logging forward
    with torch.no_grad():
        model(torch.randn(9, 3, dtype=F64))
    model.eval()
    model(torch.randn(9, 3, dtype=F64))
    model.train()
    F.cross_entropy(model(x), y).backward()
    precond.step()
    assert precond.stats["factor_updates"] == 1
    for name, (a, g) in precond.factors().items():
        torch.testing.assert_close(a, expected[name][0], rtol=0, atol=0)
        torch.testing.assert_close(g, expected[name][1], rtol=0, atol=0)


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_accumulation_equals_one_big_batch(fisher_type):
    """Micro-batches are reduced as they come (the activations are not kept until step()), and
    the step's factors equal those of the concatenated batch (float64). Under "empirical" the
    hooks see the gradients of loss / k: the weight k²·M undoes it (k = 3 here)."""
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(12, 3, dtype=F64), torch.randint(0, 2, (12,))
    expected = type2_factors_of_one_batch(model, x, y, fisher_type)

    acc = KFACPreconditioner(model, "cross_entropy", fisher_type=fisher_type, factor_dtype=F64,
                             grad_accumulation_steps=3)
    for chunk_x, chunk_y in zip(x.chunk(3), y.chunk(3)):
        (F.cross_entropy(model(chunk_x), chunk_y) / 3).backward()
        assert all(len(v) == 1 for v in acc.capture.pending_a.values())  # only this micro-batch is held
        stats = acc.capture.statistics  # the micro-batches before this one: in the factors, no sums held
        assert not stats.holds_sums()
    acc.step()
    for name, (a, g) in acc.factors().items():
        torch.testing.assert_close(a, expected[name][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g, expected[name][1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_undeclared_micro_batches_average_like_one_big_batch(fisher_type):
    """Micro-batches the preconditioner was not told about (grad_accumulation_steps left at 1,
    three forwards and backwards of their own mean losses before step()): each forward counts as
    one micro-batch and the factors are their mean, so the step's factors equal those of the
    concatenated batch. Each goes into the factors as the next begins (a sampled backward's G,
    under type-2, as that backward ends), so no sums are held beside the factors."""
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(12, 3, dtype=F64), torch.randint(0, 2, (12,))
    expected = type2_factors_of_one_batch(model, x, y, fisher_type)
    precond = KFACPreconditioner(model, "cross_entropy", fisher_type=fisher_type, factor_dtype=F64)
    for chunk_x, chunk_y in zip(x.chunk(3), y.chunk(3)):
        F.cross_entropy(model(chunk_x), chunk_y).backward()
    stats = precond.capture.statistics
    assert stats.forwards == 3 and not stats.holds_sums()
    precond.step()
    for name, (a, g) in precond.factors().items():
        torch.testing.assert_close(a, expected[name][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g, expected[name][1], rtol=1e-12, atol=1e-14)


def _accumulated_step(precond, model, chunks, k):
    model.zero_grad()
    for chunk_x, chunk_y in chunks:
        (F.cross_entropy(model(chunk_x), chunk_y) / k).backward()
    return bool(precond.step())


@pytest.mark.parametrize("case", ["fewer micro-batches than declared", "a non-finite micro-batch"])
def test_folded_micro_batches_weigh_what_they_hold(case):
    """Under gradient accumulation each micro-batch goes into the factors as the next begins:
    its mean (the factors of one step on it alone) weighs (1-ρ)/k, the old factor ρ (0 in the
    first step), and step() divides by what the finite micro-batches add up to. So a step that
    ran fewer micro-batches than declared (k = 4, 2 then 3 here) averages the ones it ran, and a
    micro-batch with a NaN input is left out of the factors (its step is skipped, nothing moves
    to NaN). Float64, type-2 (no sampling)."""
    torch.manual_seed(23)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(20, 3, dtype=F64), torch.randint(0, 2, (20,))
    chunks = list(zip(x.chunk(5), y.chunk(5)))
    means = [type2_factors_of_one_batch(model, cx, cy) for cx, cy in chunks]
    k = 4 if case.startswith("fewer") else 3
    first, second = (chunks[:2], chunks[2:]) if case.startswith("fewer") else (chunks[:3], chunks[2:])
    if case == "a non-finite micro-batch":
        bad_x = second[1][0].clone()
        bad_x[0, 0] = float("nan")
        second[1] = (bad_x, second[1][1])
        kept = [2, 4]
    else:
        kept = [2, 3, 4]
    precond = KFACPreconditioner(model, "cross_entropy", fisher_type="type-2", factor_dtype=F64,
                                 grad_accumulation_steps=k)
    rho = precond.factor_decay
    assert _accumulated_step(precond, model, first, k)
    expected = {name: [sum(means[i][name][s] for i in range(len(first))) / len(first) for s in (0, 1)]
                for name in means[0]}
    for name, (a, g) in precond.factors().items():
        torch.testing.assert_close(a, expected[name][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g, expected[name][1], rtol=1e-12, atol=1e-14)

    nonfinite = case == "a non-finite micro-batch"
    with pytest.warns(RuntimeWarning, match="non-finite") if nonfinite else contextlib.nullcontext():
        ok = _accumulated_step(precond, model, second, k)
    assert ok != nonfinite
    total = rho + (1 - rho) * len(kept) / k
    for name, (a, g) in precond.factors().items():
        for side, factor in enumerate((a, g)):
            want = (rho * expected[name][side] + (1 - rho) / k * sum(means[i][name][side] for i in kept)) / total
            torch.testing.assert_close(factor, want, rtol=1e-12, atol=1e-14)
    stats = precond.stats
    assert stats["factor_updates"] == 2  # the second step's finite micro-batches went in
    assert stats["skipped_factor_updates"] == 1 - ok  # the step with a NaN, skipped


@pytest.mark.parametrize("factor_decay", [0.95, 0.0])
def test_the_users_backward_folds_its_sums_past_the_budget(monkeypatch, factor_decay):
    """Empirical factors in one process: once ``HELD_SUM_BYTES`` of A and G sums are held in the
    user's backward they go into the factors, not held to step(); below it (a small model's
    sums, by default) they wait for step(). The factors are the same either way (float64, two
    steps: the second folds into the old factors)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batches = [(torch.randn(16, 3, dtype=F64), torch.randint(0, 2, (16,))) for _ in range(2)]
    factors = []
    for budget in (kfac_ext.capture.HELD_SUM_BYTES, 1):
        monkeypatch.setattr(kfac_ext.capture, "HELD_SUM_BYTES", budget)
        precond = KFACPreconditioner(model, "cross_entropy", fisher_type="empirical", factor_dtype=F64,
                                     factor_decay=factor_decay)
        precond.capture.held_gradient_bytes = 1  # every hook's rows (and inputs) reduced at once
        for x, y in batches:
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            assert precond.capture.statistics.holds_sums() == (budget > 1)
            precond.step()
        factors.append(precond.factors())
        precond.remove_hooks()
    for name in factors[0]:
        for held, folded in zip(factors[0][name], factors[1][name]):
            torch.testing.assert_close(folded, held, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical"])
def test_gradient_rows_are_reduced_as_the_backward_goes(fisher_type):
    """Output-gradient rows are not held to the end of the micro-batch: past
    ``held_gradient_bytes`` of them they are reduced (after every hook here, with a 1-byte
    budget), with the inputs of the layers whose backward has begun, and a sampled backward's
    rest as it ends — by default too; a sampled backward's sums go into A and G at once, so none
    are held through the user's backward either. The factors equal those of every row held
    until step() (float64)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(16, 3, dtype=F64), torch.randint(0, 2, (16,))
    factors = []
    for held in (None, 1, "default"):
        precond = KFACPreconditioner(model, "cross_entropy", fisher_type=fisher_type, factor_dtype=F64, seed=0)
        if held != "default":
            precond.capture.held_gradient_bytes = held
        sums_held = []  # in the sampled backward, when it reaches the first layer (its rows just reduced)

        def spy_on(module, inputs, out, stats=precond.capture.statistics, seen=sums_held):
            out.register_hook(lambda grad: seen.append(bool(stats.g_sum)))

        spy = model[0].register_forward_hook(spy_on)
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        spy.remove()
        sampled = precond.capture.fisher.samples
        if sampled:  # the sampled backward ran in the forward
            assert bool(precond.capture.pending_g) == (held is None)
            assert bool(precond.capture.pending_a) == (held is None)  # the inputs too, with the rows
            assert not precond.capture.statistics.g_sum and not precond.capture.statistics.a_sum
            if held == 1:
                assert sums_held and not any(sums_held)  # each part of G went in as it was reduced
        loss.backward()
        assert bool(precond.capture.pending_g) == (held is None or held == "default" and not sampled)
        # no layer's input kept past its backward, once the budget is spent
        assert bool(precond.capture.pending_a) == (held is None or held == "default" and not sampled)
        precond.step()
        factors.append(precond.factors())
        precond.remove_hooks()
    for name in factors[0]:
        for held_to_the_end, *reduced_early in zip(*(f[name] for f in factors)):
            for early in reduced_early:
                torch.testing.assert_close(early, held_to_the_end, rtol=1e-12, atol=1e-15)


class TinyMoE(nn.Module):
    """Two experts, tokens routed by sign of their first feature: one expert may get no token."""

    def __init__(self):
        super().__init__()
        self.inp, self.experts, self.out = nn.Linear(3, 4), nn.ModuleList(nn.Linear(4, 4) for _ in range(2)), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        route = (h[:, 0] > 0).long()
        mixed = torch.zeros_like(h)
        for i, expert in enumerate(self.experts):
            picked = route == i
            mixed[picked] = expert(h[picked])  # may run on zero rows
        return self.out(mixed)


def test_an_expert_with_no_tokens_keeps_its_factors():
    torch.manual_seed(18)
    model = TinyMoE().double()
    opt = KFAC(model, update="sgd", lr=0.1, loss="cross_entropy", factor_dtype=F64)
    x, y = torch.randn(8, 3, dtype=F64), torch.randint(0, 2, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with torch.no_grad():
        model.inp.bias.fill_(-10.0)  # every token now goes to expert 0
        model.inp.weight.zero_()
    a_before = opt.preconditioner.factors()["experts.1"][0].clone()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert opt.step() is None
    assert torch.equal(opt.preconditioner.factors()["experts.1"][0], a_before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.preconditioner.stats["factor_updates"] == 2


def test_a_module_used_twice_is_weight_sharing_not_tying():
    """The same Linear applied twice (one module, two names) is preconditioned, its hooks seeing
    both uses; the same Parameter in two modules is tying, left to the base optimizer."""
    shared = nn.Linear(3, 3).double()
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(3, 2).double())
    precond = KFACPreconditioner(model, "cross_entropy", factor_dtype=F64)
    assert [b.name for b in precond.blocks] == ["0", "3"]
    x, y = torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,))
    F.cross_entropy(model(x), y).backward()
    precond.step()
    rows = ones_col(torch.cat([x, torch.tanh(shared(x)).detach()]))  # both uses: 8 rows
    torch.testing.assert_close(precond.factors()["0"][0], rows.T @ rows / 8, rtol=1e-12, atol=1e-14)
