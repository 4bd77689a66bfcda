// Factor update on CPU: one ATen GEMM per layer plus a fused epilogue, layers in parallel when
// they are small. Semantics are documented in kfac_ext/ops.py::factor_update_.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>

#include "aten/factor_update.h"
#include "cpu/parallel.h"

namespace kfac::cpu {

namespace {

constexpr int64_t kMirrorTile = 32;
constexpr int64_t kMinPanelWidth = 64;
constexpr int64_t kMaxPanels = 4;

// block <- decay block + scale xᵀx on and above the diagonal (below it: whatever was there,
// for mirror_upper to overwrite). BLAS has no symmetric product that ATen exposes, so wide
// blocks go as column panels j: block[:j1, j0:j1] from x[:, :j1]ᵀ x[:, j0:j1] — 5/8 of the
// full GEMM's work with four panels, measured 1.2-1.7x faster at d = 192-1024 over 2048 rows
// (bench/RESULTS.md), while panels narrower than 64 columns lose more in GEMM efficiency than
// they save.
void add_upper_gram(const at::Tensor& block, const at::Tensor& x, double decay, double scale) {
  const int64_t d = x.size(1);
  const int64_t panels = std::clamp<int64_t>(d / kMinPanelWidth, 1, kMaxPanels);
  const int64_t width = (d + panels - 1) / panels;
  for (int64_t j0 = 0; j0 < d; j0 += width) {
    const int64_t j1 = std::min(d, j0 + width);
    block.narrow(0, 0, j1).narrow(1, j0, j1 - j0).addmm_(x.narrow(1, 0, j1).t(), x.narrow(1, j0, j1 - j0),
                                                          /*beta=*/decay, /*alpha=*/scale);
  }
}

// One layer through ATen: the GEMM straight into the factor's d x d block with the EMA as
// beta (MKL takes the strided view at full speed: measured 5.9 ms vs 6.3 ms into a fresh d x d at
// d = 1024, rows = 256; beta == 0 ignores the old values, NaN included), in the factor's dtype
// (x is cast first, so bf16/fp16 inputs accumulate in at least fp32); the ones column from
// column sums, the corner = rows (in the factor's dtype: corner_increment). Only the upper triangle is meaningful afterwards:
// mirror_upper makes the factor exactly symmetric.
void factor_update_one(const at::Tensor& factor, const at::Tensor& x, double decay,
                       double scale, bool append_ones) {
  const int64_t d = x.size(1);
  const at::Tensor xf = x.to(factor.scalar_type());
  add_upper_gram(factor.narrow(0, 0, d).narrow(1, 0, d), xf, decay, scale);
  if (!append_ones) return;
  // Only the upper half of the ones row/column: the mirror writes the other half.
  const at::Tensor column = factor.narrow(0, 0, d).select(1, d);
  if (decay == 0.0) {
    column.copy_(at::sum(xf, 0)).mul_(scale);
  } else {
    column.mul_(decay).add_(at::sum(xf, 0), scale);
  }
  AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "factor_update", [&] {
    scalar_t& corner = factor.data_ptr<scalar_t>()[d * (d + 1) + d];
    const scalar_t increment = corner_increment<scalar_t>(scale, x.size(0));
    corner = decay == 0.0 ? increment : static_cast<scalar_t>(decay) * corner + increment;
  });
}

// In place, exactly symmetric: F[j, i] = F[i, j] for j > i, tile by tile so both the reads and
// the writes stay in cache.
void mirror_upper(const at::Tensor& factor) {
  AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "factor_update", [&] {
    scalar_t* f = factor.data_ptr<scalar_t>();
    const int64_t n = factor.size(0);
    const int64_t tiles = (n + kMirrorTile - 1) / kMirrorTile;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ti = begin; ti < end; ++ti) {
        const int64_t i0 = ti * kMirrorTile, i1 = std::min(n, i0 + kMirrorTile);
        for (int64_t j0 = i0; j0 < n; j0 += kMirrorTile) {
          const int64_t j1 = std::min(n, j0 + kMirrorTile);
          // Row j of the lower triangle written contiguously; its source, column j of the
          // upper one, is read with a stride (strided reads cost less than strided writes).
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t i_end = std::min(i1, j);
            for (int64_t i = i0; i < i_end; ++i) f[j * n + i] = f[i * n + j];
          }
        }
      }
    });
  });
}

}  // namespace

void factor_update(at::TensorList factors, at::TensorList xs, double decay,
                   at::ArrayRef<double> scales, c10::List<bool> append_ones) {
  check_factor_update_args(factors, xs, decay, scales, append_ones);
  double largest = 0;
  for (size_t i = 0; i < factors.size(); ++i) {
    const double n = static_cast<double>(factors[i].size(0));
    largest = std::max(largest, 2.0 * n * n * static_cast<double>(xs[i].size(0)));
  }
  for_each_layer(factors.size(), largest, [&](size_t i) {
    factor_update_one(factors[i], xs[i], decay, scales[i], append_ones.get(i));
    mirror_upper(factors[i]);
  });
}

}  // namespace kfac::cpu

TORCH_LIBRARY_IMPL(kfac_ext, CPU, m) { m.impl("factor_update", &kfac::cpu::factor_update); }
