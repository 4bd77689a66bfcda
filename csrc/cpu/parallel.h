// Layer-level parallelism for the CPU implementations.
#pragma once

#include <ATen/Parallel.h>

#include <cstddef>

namespace kfac::cpu {

// Below this many flops per layer an ATen call is too small to split across threads, so layers
// run one per thread instead; above it, layers run one after another and each call is threaded.
constexpr double kSplitAcrossLayersBelowFlops = 1e7;

// Calls fn(i) for i in [0, n). fn must only write state owned by index i.
template <typename Fn>
void for_each_layer(size_t n, double largest_layer_flops, const Fn& fn) {
  if (n > 1 && largest_layer_flops < kSplitAcrossLayersBelowFlops) {
    at::parallel_for(0, static_cast<int64_t>(n), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) fn(static_cast<size_t>(i));
    });
  } else {
    for (size_t i = 0; i < n; ++i) fn(i);
  }
}

}  // namespace kfac::cpu
