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
  factor.narrow(0, 0, d).narrow(1, 0, d).addmm_(xf.t(), xf, /*beta=*/decay, /*alpha=*/scale);
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
