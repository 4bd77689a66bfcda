#include "aten/kronecker.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/where.h>

#include <cmath>
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

namespace {

void check_eigenbasis_side(std::string_view op, std::string_view arg, size_t i, const at::Tensor& q,
                           int64_t size, const at::Tensor& ref) {
  check_square(op, arg, i, q);
  check_contiguous(op, arg, i, q);
  check_same_device(op, arg, i, q, ref);
  check_factor_dtype(op, arg, i, q);
  check_same_dtype(op, arg, i, q, "g_eigenvectors", ref);
  check_dims(op, i, std::string(arg) + ".size(0)", q.size(0), size);
}

// A tensor shaped like grads[i], contiguous, on ref's device, with dtype_ref's dtype (the
// eigenvectors' for a moment, the gradient's for a direction).
void check_moment(std::string_view op, std::string_view arg, size_t i, const at::Tensor& t,
                  const at::Tensor& grad, const at::Tensor& ref, const at::Tensor& dtype_ref) {
  TORCH_CHECK(t.sizes() == grad.sizes(), op, ": ", arg, "[", i, "] has shape ", t.sizes(),
              " but grads[", i, "] has shape ", grad.sizes());
  check_contiguous(op, arg, i, t);
  check_same_device(op, arg, i, t, ref);
  TORCH_CHECK(t.scalar_type() == dtype_ref.scalar_type(), op, ": ", arg, "[", i, "] has dtype ",
              t.scalar_type(), " but must have ", dtype_ref.scalar_type(),
              &dtype_ref == &ref ? " (the eigenvectors' dtype)" : " (the gradient's dtype)");
}

void check_unit_interval(std::string_view op, std::string_view arg, double value) {
  TORCH_CHECK(value >= 0.0 && value < 1.0, op, ": ", arg, " must be in [0, 1), got ", value);
}

}  // namespace

void check_eigen_adam_args(at::TensorList g_eigenvectors, at::TensorList grads,
                           const c10::List<std::optional<at::Tensor>>& a_eigenvectors,
                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                           at::TensorList steps, const at::Tensor& keep, double beta1,
                           double beta2, double eps, at::TensorList directions) {
  constexpr std::string_view op = "eigen_adam";
  const size_t n = grads.size();
  check_not_empty(op, "grads", n);
  check_same_length(op, "g_eigenvectors", g_eigenvectors.size(), "grads", n);
  check_same_length(op, "a_eigenvectors", a_eigenvectors.size(), "grads", n);
  check_same_length(op, "exp_avgs", exp_avgs.size(), "grads", n);
  check_same_length(op, "exp_avg_sqs", exp_avg_sqs.size(), "grads", n);
  check_same_length(op, "steps", steps.size(), "grads", n);
  check_same_length(op, "directions", directions.size(), "grads", n);
  check_unit_interval(op, "beta1", beta1);
  check_unit_interval(op, "beta2", beta2);
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0, op, ": eps must be finite and > 0, got ", eps);
  const at::Tensor& ref = g_eigenvectors[0];
  TORCH_CHECK(keep.dim() == 0 && keep.scalar_type() == at::kBool, op,
              ": keep must be a 0-d bool tensor, got ", keep.scalar_type(), " of shape ",
              keep.sizes());
  TORCH_CHECK(keep.device() == ref.device(), op, ": keep is on ", keep.device(),
              " but the first factor is on ", ref.device(), "; all tensors must share one device");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& grad = grads[i];
    check_rank(op, "grads", i, grad, 2);
    check_contiguous(op, "grads", i, grad);
    check_same_device(op, "grads", i, grad, ref);
    check_input_dtype(op, "grads", i, grad);
    check_same_dtype(op, "grads", i, grad, "grads", grads[0]);
    check_eigenbasis_side(op, "g_eigenvectors", i, g_eigenvectors[i], grad.size(0), ref);
    const std::optional<at::Tensor> q_a = a_eigenvectors.get(i);
    if (q_a.has_value()) check_eigenbasis_side(op, "a_eigenvectors", i, *q_a, grad.size(1), ref);
    check_moment(op, "exp_avgs", i, exp_avgs[i], grad, ref, ref);
    check_moment(op, "exp_avg_sqs", i, exp_avg_sqs[i], grad, ref, ref);
    TORCH_CHECK(steps[i].dim() == 0 && steps[i].scalar_type() == at::kFloat, op, ": steps[", i,
                "] must be a 0-d float32 tensor, got ", steps[i].scalar_type(), " of shape ",
                steps[i].sizes());
    check_same_device(op, "steps", i, steps[i], ref);
    check_moment(op, "directions", i, directions[i], grad, ref, grad);
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
                         const std::optional<at::Tensor>& a_eigenvectors) {
  const at::Tensor g = grad.to(g_eigenvectors.scalar_type());
  const at::Tensor right = a_eigenvectors ? at::matmul(g, *a_eigenvectors) : g;
  return at::matmul(g_eigenvectors.mT(), right).contiguous();
}

void divide_by_damped_eigenvalues_aten(const at::Tensor& rotated, const at::Tensor& g_eigenvalues,
                                       const at::Tensor& a_eigenvalues, double damping) {
  rotated.div_(at::mul(g_eigenvalues.unsqueeze(-1), a_eigenvalues.unsqueeze(-2)).add_(damping));
}

void from_eigenbasis(at::Tensor out, const at::Tensor& g_eigenvectors, const at::Tensor& rotated,
                     const std::optional<at::Tensor>& a_eigenvectors) {
  const at::Tensor right = a_eigenvectors ? at::matmul(rotated, a_eigenvectors->mT()) : rotated;
  if (out.scalar_type() == g_eigenvectors.scalar_type()) {
    at::matmul_out(out, g_eigenvectors, right);
  } else {
    out.copy_(at::matmul(g_eigenvectors, right));
  }
}

at::Tensor adam_in_eigenbasis_aten(const at::Tensor& rotated, const at::Tensor& exp_avg,
                                   const at::Tensor& exp_avg_sq, const at::Tensor& step,
                                   const at::Tensor& keep, double beta1, double beta2, double eps) {
  // A skipped step lerps each moment toward itself: exactly unchanged, with no host read.
  exp_avg.lerp_(at::where(keep, rotated, exp_avg), 1.0 - beta1);
  exp_avg_sq.lerp_(at::where(keep, rotated * rotated, exp_avg_sq), 1.0 - beta2);
  step.add_(keep);
  const at::Tensor t = step.to(at::kDouble).clamp_min(1.0);  // never stepped: m = 0, any t will do
  const at::Tensor c1 = (1.0 - at::pow(beta1, t)).to(exp_avg.scalar_type());
  const at::Tensor c2 = (1.0 - at::pow(beta2, t)).to(exp_avg.scalar_type());
  return (exp_avg / c1) / ((exp_avg_sq / c2).sqrt() + eps);
}

}  // namespace kfac
