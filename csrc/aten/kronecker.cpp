#include "aten/kronecker.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mul.h>

#include <string>

#include "checks.h"

namespace kfac {

namespace {

// An entry is one layer ([m, n] matrices) or a batch of same-shape layers ([k, m, n], and
// [k, n] eigenvalues): a batch runs as one batched GEMM instead of k GEMMs. `matrix_dims` is 2
// for matrices, 1 for eigenvalue vectors; `grad` is the entry's gradient (or middle matrix).
void check_entry_tensor(std::string_view op, std::string_view arg, size_t i, const at::Tensor& t,
                        int64_t matrix_dims, const at::Tensor& grad, const at::Tensor& device_ref) {
  TORCH_CHECK(grad.dim() == 2 || grad.dim() == 3, op, ": layer ", i,
              ": the gradient must be 2-D (a layer) or 3-D (a batch of same-shape layers), got "
              "shape ", grad.sizes());
  const int64_t batch_dims = grad.dim() - 2;
  TORCH_CHECK(t.dim() == matrix_dims + batch_dims && (batch_dims == 0 || t.size(0) == grad.size(0)),
              op, ": ", arg, "[", i, "] has shape ", t.sizes(), " but layer ", i,
              "'s gradient has shape ", grad.sizes(), "; it must be ", matrix_dims + batch_dims,
              "-D", batch_dims ? " with the same leading batch size" : "");
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
    check_entry_tensor(op, "mats", i, mats[i], 2, mats[i], lefts[0]);
    check_entry_tensor(op, "lefts", i, lefts[i], 2, mats[i], lefts[0]);
    check_entry_tensor(op, "rights", i, rights[i], 2, mats[i], lefts[0]);
    check_factor_dtype(op, "lefts", i, lefts[i]);
    check_same_dtype(op, "lefts", i, lefts[i], "lefts", lefts[0]);
    check_same_dtype(op, "rights", i, rights[i], "lefts", lefts[0]);
    check_input_dtype(op, "mats", i, mats[i]);
    check_same_dtype(op, "mats", i, mats[i], "mats", mats[0]);
    check_dims(op, i, "lefts.size(-1)", lefts[i].size(-1), mats[i].size(-2));
    check_dims(op, i, "rights.size(-1)", rights[i].size(-1), mats[i].size(-1));
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
    check_entry_tensor(op, "grads", i, grads[i], 2, grads[i], ref);
    check_input_dtype(op, "grads", i, grads[i]);
    check_same_dtype(op, "grads", i, grads[i], "grads", grads[0]);
    check_finite_nonnegative(op, "damping", i, damping[i]);
    const int64_t sizes[] = {grads[i].size(-2), grads[i].size(-1)};
    const std::pair<std::string_view, const at::Tensor*> vectors[] = {
        {"g_eigenvectors", &g_eigenvectors[i]}, {"a_eigenvectors", &a_eigenvectors[i]}};
    const std::pair<std::string_view, const at::Tensor*> values[] = {
        {"g_eigenvalues", &g_eigenvalues[i]}, {"a_eigenvalues", &a_eigenvalues[i]}};
    for (int side = 0; side < 2; ++side) {
      const auto& [vname, q] = vectors[side];
      const auto& [lname, lambda] = values[side];
      check_entry_tensor(op, vname, i, *q, 2, grads[i], ref);
      check_factor_dtype(op, vname, i, *q);
      check_same_dtype(op, vname, i, *q, "g_eigenvectors", ref);
      check_entry_tensor(op, lname, i, *lambda, 1, grads[i], ref);
      check_same_dtype(op, lname, i, *lambda, "g_eigenvectors", ref);
      check_dims(op, i, std::string(vname) + ".size(-2)", q->size(-2), sizes[side]);
      check_dims(op, i, std::string(vname) + ".size(-1)", q->size(-1), sizes[side]);
      check_dims(op, i, std::string(lname) + ".size(-1)", lambda->size(-1), sizes[side]);
    }
  }
}

at::Tensor kron_matmul_one(const at::Tensor& left, const at::Tensor& mat, const at::Tensor& right) {
  const at::Tensor c = mat.to(left.scalar_type());
  const int64_t m = left.size(-2), p = c.size(-2), q = c.size(-1), n = right.size(-2);
  const bool left_first = m * p * q + m * q * n <= p * q * n + m * p * n;
  const at::Tensor out = left_first ? at::matmul(at::matmul(left, c), right.mT())
                                    : at::matmul(left, at::matmul(c, right.mT()));
  return out.to(mat.scalar_type());
}

at::Tensor to_eigenbasis(const at::Tensor& g_eigenvectors, const at::Tensor& grad,
                         const at::Tensor& a_eigenvectors) {
  const at::Tensor g = grad.to(g_eigenvectors.scalar_type());
  return at::matmul(g_eigenvectors.mT(), at::matmul(g, a_eigenvectors)).contiguous();
}

void divide_by_damped_eigenvalues_aten(const at::Tensor& rotated, const at::Tensor& g_eigenvalues,
                                       const at::Tensor& a_eigenvalues, double damping) {
  rotated.div_(at::mul(g_eigenvalues.unsqueeze(-1), a_eigenvalues.unsqueeze(-2)).add_(damping));
}

at::Tensor from_eigenbasis(const at::Tensor& g_eigenvectors, const at::Tensor& rotated,
                           const at::Tensor& a_eigenvectors, at::ScalarType out_dtype) {
  return at::matmul(g_eigenvectors, at::matmul(rotated, a_eigenvectors.mT())).to(out_dtype);
}

}  // namespace kfac
