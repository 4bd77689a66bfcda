// Host-side argument checks shared by every op. Each message names the op, the argument (with
// its list index), what was expected and what came, so a user can fix the call without reading
// the source. Kernels never see a tensor that did not pass these.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <string_view>

namespace kfac {

inline bool is_factor_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble;
}

inline bool is_input_dtype(at::ScalarType t) {
  return is_factor_dtype(t) || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_not_empty(std::string_view op, std::string_view arg, size_t size) {
  TORCH_CHECK(size > 0, op, ": ", arg, " must hold at least one tensor, got an empty list");
}

inline void check_same_length(std::string_view op, std::string_view arg, size_t size,
                              std::string_view ref_arg, size_t ref_size) {
  TORCH_CHECK(size == ref_size, op, ": ", arg, " has ", size, " entries but ", ref_arg, " has ",
              ref_size, "; they must have one entry per layer");
}

inline void check_rank(std::string_view op, std::string_view arg, size_t i, const at::Tensor& t,
                       int64_t rank) {
  TORCH_CHECK(t.dim() == rank, op, ": ", arg, "[", i, "] must be ", rank, "-D, got shape ",
              t.sizes());
}

inline void check_square(std::string_view op, std::string_view arg, size_t i, const at::Tensor& t) {
  check_rank(op, arg, i, t, 2);
  TORCH_CHECK(t.size(0) == t.size(1), op, ": ", arg, "[", i, "] must be square, got shape ",
              t.sizes());
}

inline void check_contiguous(std::string_view op, std::string_view arg, size_t i,
                             const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, "[", i,
              "] must be contiguous (call .contiguous() first), got strides ", t.strides());
}

inline void check_factor_dtype(std::string_view op, std::string_view arg, size_t i,
                               const at::Tensor& t) {
  TORCH_CHECK(is_factor_dtype(t.scalar_type()), op, ": ", arg, "[", i,
              "] must be float32 or float64, got ", t.scalar_type());
}

inline void check_input_dtype(std::string_view op, std::string_view arg, size_t i,
                              const at::Tensor& t) {
  TORCH_CHECK(is_input_dtype(t.scalar_type()), op, ": ", arg, "[", i,
              "] must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_dtype(std::string_view op, std::string_view arg, size_t i,
                             const at::Tensor& t, std::string_view ref_arg,
                             const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", arg, "[", i, "] has dtype ",
              t.scalar_type(), " but ", ref_arg, "[0] has ", ref.scalar_type(),
              "; one call takes one dtype per argument");
}

inline void check_same_device(std::string_view op, std::string_view arg, size_t i,
                              const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, "[", i, "] is on ", t.device(),
              " but the first factor is on ", ref.device(), "; all tensors must share one device");
}

inline void check_finite_nonnegative(std::string_view op, std::string_view arg, size_t i,
                                     double value) {
  TORCH_CHECK(std::isfinite(value) && value >= 0.0, op, ": ", arg, "[", i,
              "] must be finite and >= 0, got ", value);
}

}  // namespace kfac
