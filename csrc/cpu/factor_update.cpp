// Factor update on CPU: one ATen GEMM per layer plus a fused epilogue, layers in parallel when
// they are small. Semantics are documented in kfac_ext/ops.py::factor_update_.
#include <torch/library.h>

#include <algorithm>

#include "aten/factor_update.h"
#include "cpu/parallel.h"

namespace kfac::cpu {

void factor_update(at::TensorList factors, at::TensorList xs, double decay,
                   at::ArrayRef<double> scales, c10::List<bool> append_ones) {
  check_factor_update_args(factors, xs, decay, scales, append_ones);
  double largest = 0;
  for (const at::Tensor& f : factors) {
    largest = std::max(largest, 2.0 * f.size(0) * f.size(0) * static_cast<double>(xs[0].size(0)));
  }
  for_each_layer(factors.size(), largest, [&](size_t i) {
    factor_update_one_aten(factors[i], xs[i], decay, scales[i], append_ones.get(i));
  });
}

}  // namespace kfac::cpu

TORCH_LIBRARY_IMPL(kfac_ext, CPU, m) { m.impl("factor_update", &kfac::cpu::factor_update); }
