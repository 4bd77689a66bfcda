// Kronecker-factored products on CPU: ATen GEMMs per entry (a layer, or a batch of same-shape
// layers as one batched GEMM), entries in parallel when small, and the work in the eigenbasis
// (the division by the eigenvalues, Adam's moments and step) fused into one pass over the
// rotated gradient.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "aten/kronecker.h"
#include "cpu/parallel.h"

namespace kfac::cpu {

namespace {

double largest_layer_flops(at::TensorList mats) {
  double largest = 0;
  for (const at::Tensor& c : mats) {
    const double m = static_cast<double>(c.size(-2)), n = static_cast<double>(c.size(-1));
    const double batch = c.dim() == 3 ? static_cast<double>(c.size(0)) : 1.0;
    largest = std::max(largest, 2.0 * batch * m * n * (m + n));
  }
  return largest;
}

// rotated[b, i, j] /= g_eigenvalues[b, i] * a_eigenvalues[b, j] + damping, in place, one pass
// (b over the batch of a batched entry; rotated is contiguous).
void divide_by_damped_eigenvalues(const at::Tensor& rotated, const at::Tensor& g_eigenvalues,
                                  const at::Tensor& a_eigenvalues, double damping) {
  AT_DISPATCH_FLOATING_TYPES(rotated.scalar_type(), "precondition_eigen", [&] {
    const int64_t batch = rotated.dim() == 3 ? rotated.size(0) : 1;
    const int64_t rows = rotated.size(-2), cols = rotated.size(-1);
    const auto gamma = static_cast<scalar_t>(damping);
    for (int64_t b = 0; b < batch; ++b) {
      scalar_t* t = rotated.data_ptr<scalar_t>() + b * rows * cols;
      const scalar_t* lg = g_eigenvalues.data_ptr<scalar_t>() + b * rows;
      const scalar_t* la = a_eigenvalues.data_ptr<scalar_t>() + b * cols;
      for (int64_t i = 0; i < rows; ++i) {
        scalar_t* row = t + i * cols;
        for (int64_t j = 0; j < cols; ++j) row[j] /= lg[i] * la[j] + gamma;
      }
    }
  });
}

// torch.lerp's formula (start + w (end - start), or end - (end - start)(1 - w) for w >= 0.5),
// so that the moments match torch's to rounding.
template <typename T>
inline T lerp(T start, T end, T weight) {
  return weight < T(0.5) ? start + weight * (end - start) : end - (end - start) * (T(1) - weight);
}

// Adam's pass over one layer's coordinates: where keep, m and v move toward g and g^2; g becomes
// m^ / (sqrt(v^) + eps). Written so that it vectorizes (the skip hoisted out of the loop; sqrt
// without errno, see CMakeLists.txt): the divisions and the square root are most of its time.
template <typename T>
inline void adam_pass(T* g, T* m, T* v, int64_t n, bool keep, T w1, T w2, T c1, T c2, T eps) {
  if (keep) {
    for (int64_t j = 0; j < n; ++j) {
      const T mj = lerp(m[j], g[j], w1), vj = lerp(v[j], g[j] * g[j], w2);
      m[j] = mj;
      v[j] = vj;
      g[j] = (mj / c1) / (std::sqrt(vj / c2) + eps);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) g[j] = (m[j] / c1) / (std::sqrt(v[j] / c2) + eps);
  }
}

// One clone per instruction set, picked when the library loads: the build targets the baseline
// x86-64, which has no 8- or 16-wide float arithmetic. Compilers without target_clones (or other
// CPUs) get the one baseline version.
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define KFAC_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef KFAC_VECTOR_CLONES
#define KFAC_VECTOR_CLONES
#endif

KFAC_VECTOR_CLONES void adam_pass_vectorized(float* g, float* m, float* v, int64_t n, bool keep, float w1,
                                        float w2, float c1, float c2, float eps) {
  adam_pass(g, m, v, n, keep, w1, w2, c1, c2, eps);
}

KFAC_VECTOR_CLONES void adam_pass_vectorized(double* g, double* m, double* v, int64_t n, bool keep,
                                         double w1, double w2, double c1, double c2, double eps) {
  adam_pass(g, m, v, n, keep, w1, w2, c1, c2, eps);
}

// One Adam step of a layer in its eigenbasis: where keep, exp_avg and exp_avg_sq move toward g
// and g^2 and step advances; rotated (g, contiguous, in place) becomes the normalized,
// bias-corrected step m^ / (sqrt(v^) + eps). Same formulas as adam_in_eigenbasis_aten.
void adam_in_eigenbasis(const at::Tensor& rotated, const at::Tensor& exp_avg,
                        const at::Tensor& exp_avg_sq, const at::Tensor& step, bool keep,
                        double beta1, double beta2, double eps) {
  float* count = step.data_ptr<float>();
  if (keep) *count += 1.0f;
  const double t = std::max(static_cast<double>(*count), 1.0);  // never stepped: m = 0
  AT_DISPATCH_FLOATING_TYPES(rotated.scalar_type(), "eigen_adam", [&] {
    const auto c1 = static_cast<scalar_t>(1.0 - std::pow(beta1, t));
    const auto c2 = static_cast<scalar_t>(1.0 - std::pow(beta2, t));
    const auto w1 = static_cast<scalar_t>(1.0 - beta1), w2 = static_cast<scalar_t>(1.0 - beta2);
    scalar_t* g = rotated.data_ptr<scalar_t>();
    scalar_t* m = exp_avg.data_ptr<scalar_t>();
    scalar_t* v = exp_avg_sq.data_ptr<scalar_t>();
    const auto epsilon = static_cast<scalar_t>(eps);
    at::parallel_for(0, rotated.numel(), 16384, [&](int64_t begin, int64_t end) {
      adam_pass_vectorized(g + begin, m + begin, v + begin, end - begin, keep, w1, w2, c1, c2, epsilon);
    });
  });
}

}  // namespace

std::vector<at::Tensor> kron_matmul(at::TensorList lefts, at::TensorList mats,
                                    at::TensorList rights) {
  check_kron_matmul_args(lefts, mats, rights);
  std::vector<at::Tensor> out(mats.size());
  for_each_layer(mats.size(), largest_layer_flops(mats),
                 [&](size_t i) { out[i] = kron_matmul_one(lefts[i], mats[i], rights[i]); });
  return out;
}

std::vector<at::Tensor> precondition_eigen(at::TensorList g_eigenvectors,
                                           at::TensorList g_eigenvalues, at::TensorList grads,
                                           at::TensorList a_eigenvectors,
                                           at::TensorList a_eigenvalues,
                                           at::ArrayRef<double> damping) {
  check_precondition_eigen_args(g_eigenvectors, g_eigenvalues, grads, a_eigenvectors,
                                a_eigenvalues, damping);
  std::vector<at::Tensor> out(grads.size());
  for_each_layer(grads.size(), 2 * largest_layer_flops(grads), [&](size_t i) {
    const at::Tensor rotated = to_eigenbasis(g_eigenvectors[i], grads[i], a_eigenvectors[i]);
    divide_by_damped_eigenvalues(rotated, g_eigenvalues[i], a_eigenvalues[i], damping[i]);
    out[i] = at::empty_like(grads[i]);
    from_eigenbasis(out[i], g_eigenvectors[i], rotated, a_eigenvectors[i]);
  });
  return out;
}

void eigen_adam(at::TensorList g_eigenvectors, at::TensorList grads,
                const c10::List<std::optional<at::Tensor>>& a_eigenvectors, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& keep,
                double beta1, double beta2, double eps, at::TensorList directions) {
  check_eigen_adam_args(g_eigenvectors, grads, a_eigenvectors, exp_avgs, exp_avg_sqs, steps, keep,
                        beta1, beta2, eps, directions);
  const bool keep_step = keep.item<bool>();  // a CPU tensor: no synchronization
  for_each_layer(grads.size(), 2 * largest_layer_flops(grads), [&](size_t i) {
    const std::optional<at::Tensor> q_a = a_eigenvectors.get(i);
    const at::Tensor rotated = to_eigenbasis(g_eigenvectors[i], grads[i], q_a);
    adam_in_eigenbasis(rotated, exp_avgs[i], exp_avg_sqs[i], steps[i], keep_step, beta1, beta2, eps);
    from_eigenbasis(directions[i], g_eigenvectors[i], rotated, q_a);
  });
}

}  // namespace kfac::cpu

TORCH_LIBRARY_IMPL(kfac_ext, CPU, m) {
  m.impl("kron_matmul", &kfac::cpu::kron_matmul);
  m.impl("precondition_eigen", &kfac::cpu::precondition_eigen);
  m.impl("eigen_adam", &kfac::cpu::eigen_adam);
}
