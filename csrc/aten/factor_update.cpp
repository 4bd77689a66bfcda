#include "aten/factor_update.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/triu.h>

#include "checks.h"

namespace kfac {

void check_factor_update_args(at::TensorList factors, at::TensorList xs, double decay,
                              at::ArrayRef<double> scales, const c10::List<bool>& append_ones) {
  constexpr std::string_view op = "factor_update";
  check_not_empty(op, "factors", factors.size());
  check_same_length(op, "xs", xs.size(), "factors", factors.size());
  check_same_length(op, "scales", scales.size(), "factors", factors.size());
  check_same_length(op, "append_ones", append_ones.size(), "factors", factors.size());
  TORCH_CHECK(std::isfinite(decay) && decay >= 0.0 && decay <= 1.0, op,
              ": decay must be in [0, 1], got ", decay);
  for (size_t i = 0; i < factors.size(); ++i) {
    const at::Tensor& f = factors[i];
    const at::Tensor& x = xs[i];
    check_square(op, "factors", i, f);
    check_factor_dtype(op, "factors", i, f);
    check_same_dtype(op, "factors", i, f, "factors", factors[0]);
    check_contiguous(op, "factors", i, f);
    check_same_device(op, "factors", i, f, factors[0]);
    check_rank(op, "xs", i, x, 2);
    check_input_dtype(op, "xs", i, x);
    check_same_dtype(op, "xs", i, x, "xs", xs[0]);
    check_contiguous(op, "xs", i, x);
    check_same_device(op, "xs", i, x, factors[0]);
    check_finite_nonnegative(op, "scales", i, scales[i]);
    const int64_t expected = x.size(1) + (append_ones.get(i) ? 1 : 0);
    TORCH_CHECK(f.size(0) == expected, op, ": factors[", i, "] has shape ", f.sizes(),
                " but xs[", i, "] has ", x.size(1), " columns",
                append_ones.get(i) ? " plus the appended ones column" : "", ", so the factor must be ",
                expected, " x ", expected);
  }
}

namespace {

// target <- decay * target + scale * value, where decay == 0 overwrites (a stale NaN or inf in
// the old factor must not survive a reset: 0 * NaN is NaN).
void ema_(const at::Tensor& target, const at::Tensor& value, double decay, double scale) {
  if (decay == 0.0) {
    target.copy_(value).mul_(scale);
  } else {
    target.mul_(decay).add_(value, scale);
  }
}

}  // namespace

void factor_update_one_aten(const at::Tensor& factor, const at::Tensor& x, double decay,
                            double scale, bool append_ones) {
  const int64_t d = x.size(1);
  const at::Tensor xf = x.to(factor.scalar_type());
  if (!append_ones) {
    // beta == 0 makes addmm ignore the old values entirely, NaN included.
    factor.addmm_(xf.t(), xf, /*beta=*/decay, /*alpha=*/scale);
    return;
  }
  // The d x d block is a strided view: a GEMM into it is ~1.6x slower (measured, MKL, d = 1024)
  // than into a fresh matrix plus one elementwise epilogue.
  ema_(factor.narrow(0, 0, d).narrow(1, 0, d), at::mm(xf.t(), xf), decay, scale);
  // Only the upper half of the ones row/column: the caller's mirror writes the other half.
  ema_(factor.narrow(0, 0, d).select(1, d), at::sum(xf, 0), decay, scale);
  const at::Tensor corner = factor.narrow(0, d, 1).narrow(1, d, 1);
  ema_(corner, at::full_like(corner, static_cast<double>(x.size(0))), decay, scale);
}

void mirror_upper_aten(const at::Tensor& factor) {
  factor.copy_(at::triu(factor) + at::triu(factor, 1).mT());
}

}  // namespace kfac
