// Factor update on CUDA: F <- decay F + scale xbar^T xbar per layer, routed by shape.
//
// * Fused path: every layer of the call with dbar <= kMaxFusedDim and rows <= kMaxFusedRows in ONE
//   launch of a tiled kernel (32x32 tiles of the upper triangle, xbar read through a loader that
//   supplies the virtual ones column, EMA epilogue, mirrored write).
// * GEMM path (cuBLAS through ATen) for the other layers: x^T x written straight into the factor's
//   d x d block with the EMA as beta (cuBLAS takes the strided view, no temporary), the ones column
//   from a column sum, the corner from the row count; then ONE mirror launch for all GEMM layers
//   makes every factor exactly symmetric.
// Routing, measured on an H200 (bench/RESULTS.md, bench_ops.py --large-rows, 2026-12-04): at
// rows <= 1024 and sides <= 256 the fused launch beats the GEMM path by 4-50x, at any layer count
// (8 fused layers: 0.02-0.12 ms; 7 layers through cuBLAS: 0.47-0.64 ms, about 70 us of host-side
// ATen calls per layer), and right at the row limit (32 layers of side 256: 0.31 ms at 1024 rows,
// 2.38 ms at 1025). So a call no longer needs 8 small layers to fuse. The fused kernel does not
// split rows across blocks, so at 65536 rows cuBLAS wins; where between 1025 and 65536 rows the
// two cross (about 2K rows for side 256 by the two regimes' slopes) is not measured yet, so the
// row and side limits stay where they were measured to be right.
// Every check and every allocation happens before the first write, so an error (a bad argument,
// out of memory) leaves every factor as it was.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "aten/factor_update.h"
#include "cuda/layer_table.cuh"

namespace kfac::cuda {

namespace {

constexpr int kTile = 32;         // output tile is kTile x kTile
constexpr int kRowsPerStep = 32;  // rows of x staged in shared memory per step
constexpr int kThreadRows = 8;    // blockDim = (kTile, kThreadRows); each thread owns 4 outputs
constexpr int kOutputsPerThread = kTile / kThreadRows;
constexpr int64_t kMaxFusedDim = 256;
constexpr int64_t kMaxFusedRows = 1024;

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
    factor_update_kernel(const __grid_constant__ LayerTable<FactorEntry> table, double decay) {
  __shared__ acc_t xi[kRowsPerStep][kTile];
  __shared__ acc_t xj[kRowsPerStep][kTile];
  const FactorEntry& e = table.entries[layer_of_block(table, blockIdx.x)];
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
    // The corner sums rows ones, from the row count (a float32 sum of ones stalls at 2^24),
    // by the one precision rule of aten/factor_update.h.
    const bool corner = e.dbar > e.d && i == e.d && j == e.d;
    const acc_t increment = corner ? corner_increment<acc_t>(e.scale, e.rows) : scale * acc[o];
    // decay == 0 overwrites: a stale NaN in the old factor must not survive (0 * NaN = NaN).
    const acc_t value = decay == 0.0 ? increment : beta * f[i * e.dbar + j] + increment;
    f[i * e.dbar + j] = value;
    f[j * e.dbar + i] = value;
  }
}

struct MirrorEntry {
  void* factor;  // [n, n] row-major
  int64_t n;
  int64_t first_block;
};

constexpr int kMirrorThreads = 256;

// F[i, j] = F[j, i] for i > j: the strict lower triangle from the upper one, every factor of the
// table in one launch (a grid-stride loop over each factor's n x n elements).
template <typename T>
__global__ void __launch_bounds__(kMirrorThreads)
    mirror_upper_kernel(const __grid_constant__ LayerTable<MirrorEntry> table) {
  const MirrorEntry& e = table.entries[layer_of_block(table, blockIdx.x)];
  T* f = static_cast<T*>(e.factor);
  const int64_t count = e.n * e.n;
  const int64_t first = (blockIdx.x - e.first_block) * kMirrorThreads + threadIdx.x;
  const int64_t stride = int64_t(kMirrorThreads) * 64;  // each entry gets up to 64 blocks
  for (int64_t idx = first; idx < count; idx += stride) {
    const int64_t i = idx / e.n, j = idx % e.n;
    if (i > j) f[idx] = f[j * e.n + i];
  }
}

int64_t mirror_blocks(const MirrorEntry& e) {
  const int64_t need = (e.n * e.n + kMirrorThreads - 1) / kMirrorThreads;
  return std::min<int64_t>(need, 64);
}

void check_grid(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "factor_update: ", blocks,
              " thread blocks exceed one launch's grid");
}

void launch_fused(const std::vector<FactorEntry>& entries, const at::Tensor& x0,
                  const at::Tensor& f0, double decay) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 threads(kTile, kThreadRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "factor_update", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(f0.scalar_type(), "factor_update", [&] {
      launch_in_chunks(
          entries, [](const FactorEntry& e) { return e.tiles_per_side * (e.tiles_per_side + 1) / 2; },
          [&](const LayerTable<FactorEntry>& table, int64_t blocks) {
            check_grid(blocks);
            factor_update_kernel<in_t, scalar_t><<<blocks, threads, 0, stream>>>(table, decay);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
  });
}

void launch_mirror(const std::vector<MirrorEntry>& entries, at::ScalarType dtype) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dtype, "factor_update", [&] {
    launch_in_chunks(entries, mirror_blocks, [&](const LayerTable<MirrorEntry>& table, int64_t blocks) {
      check_grid(blocks);
      mirror_upper_kernel<scalar_t><<<blocks, kMirrorThreads, 0, stream>>>(table);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// One GEMM-path layer, prepared: the input in the factor's dtype and its column sums, computed
// (allocated) before any factor is written.
struct GemmLayer {
  at::Tensor factor, x, column_sums;
  double scale;
  bool append_ones;
};

// Writes the upper triangle (and the d x d block in full) of one GEMM-path factor in place.
void apply_gemm(const GemmLayer& l, double decay) {
  const int64_t d = l.x.size(1);
  // beta == 0 makes cuBLAS ignore the old values, NaN included, as the CPU path does.
  l.factor.narrow(0, 0, d).narrow(1, 0, d).addmm_(l.x.t(), l.x, /*beta=*/decay, /*alpha=*/l.scale);
  if (!l.append_ones) return;
  const at::Tensor column = l.factor.narrow(0, 0, d).select(1, d);
  const at::Tensor corner = l.factor.narrow(0, d, 1).narrow(1, d, 1);
  // Exactly representable in the factor's dtype, so fill_ / add_ round nothing more.
  const double increment = AT_DISPATCH_FLOATING_TYPES(l.factor.scalar_type(), "factor_update", [&] {
    return static_cast<double>(corner_increment<scalar_t>(l.scale, l.x.size(0)));
  });
  if (decay == 0.0) {
    column.copy_(l.column_sums).mul_(l.scale);
    corner.fill_(increment);
  } else {
    column.mul_(decay).add_(l.column_sums, l.scale);
    corner.mul_(decay).add_(increment);
  }
}

bool fused_candidate(const at::Tensor& factor, const at::Tensor& x) {
  return factor.size(0) <= kMaxFusedDim && x.size(0) <= kMaxFusedRows;
}

}  // namespace

void factor_update(at::TensorList factors, at::TensorList xs, double decay,
                   at::ArrayRef<double> scales, c10::List<bool> append_ones) {
  check_factor_update_args(factors, xs, decay, scales, append_ones);
  const c10::cuda::CUDAGuard guard(factors[0].device());

  std::vector<FactorEntry> fused;
  std::vector<GemmLayer> gemm;
  std::vector<MirrorEntry> mirror;
  for (size_t i = 0; i < factors.size(); ++i) {
    const at::Tensor& f = factors[i];
    if (f.numel() == 0) continue;
    if (fused_candidate(f, xs[i])) {
      const int64_t per_side = (f.size(0) + kTile - 1) / kTile;
      fused.push_back({xs[i].data_ptr(), f.data_ptr(), xs[i].size(0), xs[i].size(1), f.size(0),
                       per_side, 0, scales[i]});
      continue;
    }
    const at::Tensor x = xs[i].to(f.scalar_type());
    const bool ones = append_ones.get(i);
    gemm.push_back({f, x, ones ? at::sum(x, 0) : at::Tensor(), scales[i], ones});
    mirror.push_back({f.data_ptr(), f.size(0), 0});
  }
  for (const GemmLayer& l : gemm) apply_gemm(l, decay);
  if (!mirror.empty()) launch_mirror(mirror, factors[0].scalar_type());
  if (!fused.empty()) launch_fused(fused, xs[0], factors[0], decay);
}

}  // namespace kfac::cuda

TORCH_LIBRARY_IMPL(kfac_ext, CUDA, m) { m.impl("factor_update", &kfac::cuda::factor_update); }
