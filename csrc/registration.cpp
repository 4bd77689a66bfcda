// Every schema of the kfac_ext library, written once. Implementations register per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL); Python fakes live in kfac_ext/ops.py.
// Conventions (pinned by tests/): a factor is square, float32 or float64, contiguous; every list
// argument holds one entry per layer; scalars per layer come as float[] lists.
#include <torch/library.h>

TORCH_LIBRARY(kfac_ext, m) {
  // factor <- decay * factor + scale * xbar^T xbar, in place, exactly symmetric. xbar = [x, 1]
  // when append_ones[i] (the homogeneous coordinate LAST), built without materialising it.
  m.def(
      "factor_update(Tensor(a!)[] factors, Tensor[] xs, float decay, float[] scales, "
      "bool[] append_ones) -> ()");
  // (F + damping I)^-1 by Cholesky; status per factor (see kfac_ext.ops.Status).
  m.def("damped_inverse(Tensor[] factors, float[] damping) -> (Tensor[], Tensor)");
  // F = Q diag(lambda) Q^T with lambda clamped >= 0; status per factor.
  m.def("eigen_decompose(Tensor[] factors) -> (Tensor[], Tensor[], Tensor)");
  // lefts[i] @ mats[i] @ rights[i]^T, i.e. (L kron R) vec(C) for row-major vec.
  m.def("kron_matmul(Tensor[] lefts, Tensor[] mats, Tensor[] rights) -> Tensor[]");
  // Q_G ((Q_G^T grad Q_A) / (lambda_G lambda_A^T + damping)) Q_A^T per layer.
  m.def(
      "precondition_eigen(Tensor[] g_eigenvectors, Tensor[] g_eigenvalues, Tensor[] grads, "
      "Tensor[] a_eigenvectors, Tensor[] a_eigenvalues, float[] damping) -> Tensor[]");
  // Adam in the Kronecker eigenbasis, one step per layer: g^ = Q_G^T grad Q_A (no Q_A: a
  // diagonal A, g^ = Q_G^T grad); where keep, m <- lerp(m, g^, 1 - beta1), v <- lerp(v, g^^2,
  // 1 - beta2), step += 1 (in place); directions <- Q_G (m^ / (sqrt(v^) + eps)) Q_A^T,
  // bias-corrected. (Written into `directions`, not returned: torch cannot functionalize a
  // custom op that both mutates and returns.)
  m.def(
      "eigen_adam(Tensor[] g_eigenvectors, Tensor[] grads, Tensor?[] a_eigenvectors, "
      "Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, Tensor(c!)[] steps, Tensor keep, "
      "float beta1, float beta2, float eps, Tensor(d!)[] directions) -> ()");
}
