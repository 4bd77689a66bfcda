#include "aten/factor_update.h"


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

}  // namespace kfac
