// Factor update on CUDA: F <- decay F + scale xbar^T xbar for every layer of a call in ONE launch.
// Each block computes one 32x32 tile of the upper triangle (tiles below the diagonal are never
// computed), reads xbar through a loader that supplies the virtual ones column, applies the EMA
// epilogue to the upper element and mirrors it, so the result is exactly symmetric. Layers larger
// than kMaxKernelDim go through ATen's GEMM (cuBLAS) with the same epilogue.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "aten/factor_update.h"
#include "cuda/layer_table.cuh"

namespace kfac::cuda {

namespace {

constexpr int kTile = 32;        // output tile is kTile x kTile
constexpr int kRowsPerStep = 32;  // rows of x staged in shared memory per step
constexpr int kThreadRows = 8;    // blockDim = (kTile, kThreadRows); each thread owns 4 outputs
constexpr int kOutputsPerThread = kTile / kThreadRows;
// Above this, cuBLAS GEMM (full square, then mirrored) beats this simple tiled kernel.
constexpr int64_t kMaxKernelDim = 512;

struct FactorEntry {
  const void* x;   // [rows, d] row-major
  void* factor;    // [dbar, dbar] row-major
  int64_t rows;
  int64_t d;
  int64_t dbar;    // d + 1 when the ones column is appended, else d
  int64_t tiles_per_side;
  int64_t first_block;
  double scale;
};

// Element (row, col) of xbar = [x, 1], zero outside the matrix (so partial tiles need no branches
// in the inner loop).
template <typename acc_t, typename in_t>
__device__ inline acc_t load_xbar(const FactorEntry& e, int64_t row, int64_t col) {
  if (row >= e.rows || col >= e.dbar) return acc_t(0);
  if (col == e.d) return acc_t(1);  // the homogeneous coordinate, last
  return to_acc<acc_t>(static_cast<const in_t*>(e.x)[row * e.d + col]);
}

// Linear tile index -> (tile_i, tile_j) with tile_i <= tile_j, row by row.
__device__ inline void upper_tile(int64_t index, int64_t per_side, int64_t& ti, int64_t& tj) {
  ti = 0;
  while (index >= per_side - ti) {
    index -= per_side - ti;
    ++ti;
  }
  tj = ti + index;
}

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kTile * kThreadRows)
    factor_update_kernel(const FactorEntry* entries, int n_entries, double decay) {
  __shared__ acc_t xi[kRowsPerStep][kTile];
  __shared__ acc_t xj[kRowsPerStep][kTile];
  const FactorEntry e = entries[layer_of_block(entries, n_entries, blockIdx.x)];
  int64_t ti, tj;
  upper_tile(blockIdx.x - e.first_block, e.tiles_per_side, ti, tj);
  const int64_t i0 = ti * kTile, j0 = tj * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTile + tx;

  acc_t acc[kOutputsPerThread] = {};
  for (int64_t k0 = 0; k0 < e.rows; k0 += kRowsPerStep) {
    // Coalesced staging: consecutive threads read consecutive columns of one row.
    for (int s = tid; s < kRowsPerStep * kTile; s += kTile * kThreadRows) {
      const int r = s / kTile, c = s % kTile;
      xi[r][c] = load_xbar<acc_t, in_t>(e, k0 + r, i0 + c);
      xj[r][c] = load_xbar<acc_t, in_t>(e, k0 + r, j0 + c);
    }
    __syncthreads();
#pragma unroll 8
    for (int r = 0; r < kRowsPerStep; ++r) {
      const acc_t b = xj[r][tx];
#pragma unroll
      for (int o = 0; o < kOutputsPerThread; ++o) acc[o] += xi[r][ty + o * kThreadRows] * b;
    }
    __syncthreads();
  }

  acc_t* f = static_cast<acc_t*>(e.factor);
  const auto scale = static_cast<acc_t>(e.scale);
  const auto beta = static_cast<acc_t>(decay);
#pragma unroll
  for (int o = 0; o < kOutputsPerThread; ++o) {
    const int64_t i = i0 + ty + o * kThreadRows, j = j0 + tx;
    if (i >= e.dbar || j >= e.dbar || i > j) continue;  // upper triangle only
    // The corner sums rows ones: exact, as on CPU (a float32 sum of ones stalls at 2^24).
    const bool corner = e.dbar > e.d && i == e.d && j == e.d;
    const acc_t sum = corner ? static_cast<acc_t>(e.rows) : acc[o];
    // decay == 0 overwrites: a stale NaN in the old factor must not survive (0 * NaN = NaN).
    const acc_t value = decay == 0.0 ? scale * sum : beta * f[i * e.dbar + j] + scale * sum;
    f[i * e.dbar + j] = value;
    f[j * e.dbar + i] = value;
  }
}

void launch_factor_update(const std::vector<FactorEntry>& entries, int64_t blocks,
                          const at::Tensor& x0, const at::Tensor& f0, double decay) {
  const at::Tensor table = upload_table(entries, f0.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 threads(kTile, kThreadRows);
  const int n = static_cast<int>(entries.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "factor_update", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(f0.scalar_type(), "factor_update", [&] {
      factor_update_kernel<in_t, scalar_t>
          <<<blocks, threads, 0, stream>>>(table_ptr<FactorEntry>(table), n, decay);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

void factor_update(at::TensorList factors, at::TensorList xs, double decay,
                   at::ArrayRef<double> scales, c10::List<bool> append_ones) {
  check_factor_update_args(factors, xs, decay, scales, append_ones);
  const c10::cuda::CUDAGuard guard(factors[0].device());
  std::vector<FactorEntry> entries;
  int64_t blocks = 0;
  for (size_t i = 0; i < factors.size(); ++i) {
    const int64_t dbar = factors[i].size(0);
    if (dbar > kMaxKernelDim) {
      factor_update_one_aten(factors[i], xs[i], decay, scales[i], append_ones.get(i));
      mirror_upper_aten(factors[i]);
      continue;
    }
    const int64_t per_side = (dbar + kTile - 1) / kTile;
    if (per_side == 0) continue;
    entries.push_back({xs[i].data_ptr(), factors[i].data_ptr(), xs[i].size(0), xs[i].size(1), dbar,
                       per_side, blocks, scales[i]});
    blocks += per_side * (per_side + 1) / 2;
  }
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "factor_update: ", blocks,
              " tiles exceed one launch's grid");
  if (!entries.empty()) launch_factor_update(entries, blocks, xs[0], factors[0], decay);
}

}  // namespace kfac::cuda

TORCH_LIBRARY_IMPL(kfac_ext, CUDA, m) { m.impl("factor_update", &kfac::cuda::factor_update); }
