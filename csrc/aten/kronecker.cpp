#include "aten/kronecker.h"

#include <ATen/ops/mm.h>

#include "checks.h"

namespace kfac {

namespace {

void check_matrix(std::string_view op, std::string_view arg, size_t i, const at::Tensor& t,
                  const at::Tensor& device_ref) {
  check_rank(op, arg, i, t, 2);
  check_contiguous(op, arg, i, t);
  check_same_device(op, arg, i, t, device_ref);
}

void check_dims(std::string_view op, size_t i, std::string_view what, int64_t got,
                int64_t expected) {
  TORCH_CHECK(got == expected, op, ": layer ", i, ": ", what, " is ", got, " but must be ",
              expected);
}

}  // namespace

void check_kron_matmul_args(at::TensorList lefts, at::TensorList mats, at::TensorList rights) {
  constexpr std::string_view op = "kron_matmul";
  check_not_empty(op, "lefts", lefts.size());
  check_same_length(op, "mats", mats.size(), "lefts", lefts.size());
  check_same_length(op, "rights", rights.size(), "lefts", lefts.size());
  for (size_t i = 0; i < lefts.size(); ++i) {
    check_matrix(op, "lefts", i, lefts[i], lefts[0]);
    check_matrix(op, "mats", i, mats[i], lefts[0]);
    check_matrix(op, "rights", i, rights[i], lefts[0]);
    check_factor_dtype(op, "lefts", i, lefts[i]);
    check_same_dtype(op, "lefts", i, lefts[i], "lefts", lefts[0]);
    check_same_dtype(op, "rights", i, rights[i], "lefts", lefts[0]);
    check_input_dtype(op, "mats", i, mats[i]);
    check_same_dtype(op, "mats", i, mats[i], "mats", mats[0]);
    check_dims(op, i, "lefts.size(1)", lefts[i].size(1), mats[i].size(0));
    check_dims(op, i, "rights.size(1)", rights[i].size(1), mats[i].size(1));
  }
}

void check_precondition_eigen_args(at::TensorList g_eigenvectors, at::TensorList g_eigenvalues,
                                   at::TensorList grads, at::TensorList a_eigenvectors,
                                   at::TensorList a_eigenvalues, at::ArrayRef<double> damping) {
  constexpr std::string_view op = "precondition_eigen";
  const size_t n = grads.size();
  check_not_empty(op, "grads", n);
  check_same_length(op, "g_eigenvectors", g_eigenvectors.size(), "grads", n);
  check_same_length(op, "g_eigenvalues", g_eigenvalues.size(), "grads", n);
  check_same_length(op, "a_eigenvectors", a_eigenvectors.size(), "grads", n);
  check_same_length(op, "a_eigenvalues", a_eigenvalues.size(), "grads", n);
  check_same_length(op, "damping", damping.size(), "grads", n);
  const at::Tensor& ref = g_eigenvectors[0];
  for (size_t i = 0; i < n; ++i) {
    check_matrix(op, "grads", i, grads[i], ref);
    check_input_dtype(op, "grads", i, grads[i]);
    check_same_dtype(op, "grads", i, grads[i], "grads", grads[0]);
    check_finite_nonnegative(op, "damping", i, damping[i]);
    const int64_t rows = grads[i].size(0), cols = grads[i].size(1);
    const std::pair<std::string_view, const at::Tensor*> vectors[] = {
        {"g_eigenvectors", &g_eigenvectors[i]}, {"a_eigenvectors", &a_eigenvectors[i]}};
    const std::pair<std::string_view, const at::Tensor*> values[] = {
        {"g_eigenvalues", &g_eigenvalues[i]}, {"a_eigenvalues", &a_eigenvalues[i]}};
    const int64_t sizes[] = {rows, cols};
    for (int side = 0; side < 2; ++side) {
      const auto& [vname, q] = vectors[side];
      const auto& [lname, lambda] = values[side];
      check_square(op, vname, i, *q);
      check_matrix(op, vname, i, *q, ref);
      check_factor_dtype(op, vname, i, *q);
      check_same_dtype(op, vname, i, *q, "g_eigenvectors", ref);
      check_rank(op, lname, i, *lambda, 1);
      check_contiguous(op, lname, i, *lambda);
      check_same_device(op, lname, i, *lambda, ref);
      check_same_dtype(op, lname, i, *lambda, "g_eigenvectors", ref);
      check_dims(op, i, std::string(vname) + ".size(0)", q->size(0), sizes[side]);
      check_dims(op, i, std::string(lname) + ".size(0)", lambda->size(0), sizes[side]);
    }
  }
}

at::Tensor kron_matmul_one(const at::Tensor& left, const at::Tensor& mat, const at::Tensor& right) {
  const at::Tensor c = mat.to(left.scalar_type());
  const int64_t m = left.size(0), p = c.size(0), q = c.size(1), n = right.size(0);
  const bool left_first = m * p * q + m * q * n <= p * q * n + m * p * n;
  const at::Tensor out = left_first ? at::mm(at::mm(left, c), right.t())
                                    : at::mm(left, at::mm(c, right.t()));
  return out.to(mat.scalar_type());
}

at::Tensor to_eigenbasis(const at::Tensor& g_eigenvectors, const at::Tensor& grad,
                         const at::Tensor& a_eigenvectors) {
  const at::Tensor g = grad.to(g_eigenvectors.scalar_type());
  return at::mm(g_eigenvectors.t(), at::mm(g, a_eigenvectors));
}

at::Tensor from_eigenbasis(const at::Tensor& g_eigenvectors, const at::Tensor& rotated,
                           const at::Tensor& a_eigenvectors, at::ScalarType out_dtype) {
  return at::mm(g_eigenvectors, at::mm(rotated, a_eigenvectors.t())).to(out_dtype);
}

}  // namespace kfac
