// Host side of the fused branch's kernels, shared by the CPU (branch.cpp) and CUDA
// (branch_cuda.cu) implementations: argument checks, output allocation and the group table.
// Nothing here launches work on a device (allocation only), so each op's launches are exactly
// the kernels its implementation records as `kernel::NAME` profiler events.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <vector>

#include "branch.h"

namespace rga_kernels {
namespace branch {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_vector(const Tensor& t, int64_t K, at::ScalarType acc, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == K && t.is_contiguous(), "rga_kernels: ", what,
              " must be a contiguous (", K, ",) vector, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, "rga_kernels: ", what, " must be ", acc,
              " (the statistics' dtype for these inputs), got ", t.scalar_type());
}

inline void check_3d(const Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 3, "rga_kernels: ", what, " must be (B, K, n), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "rga_kernels: ", what,
              " must be a floating point tensor, got ", t.scalar_type());
}

inline void check_running(const OptTensor& rm, const OptTensor& rv, bool batch_stats, int64_t K,
                          at::ScalarType acc) {
  TORCH_CHECK(rm.has_value() == rv.has_value(),
              "rga_kernels: running_mean and running_var must be given together");
  if (rm.has_value()) {
    check_vector(*rm, K, acc, "running_mean");
    check_vector(*rv, K, acc, "running_var");
  } else {
    TORCH_CHECK(batch_stats, "rga_kernels: without running statistics, batch_stats must be true");
  }
}

inline Groups make_groups(const std::vector<int64_t>& sizes, int64_t mean_group, int64_t K) {
  TORCH_CHECK(!sizes.empty() && sizes.size() <= kMaxGroups, "rga_kernels: 1 to ", kMaxGroups,
              " channel groups, got ", sizes.size());
  TORCH_CHECK(mean_group >= -1 && mean_group < static_cast<int64_t>(sizes.size()),
              "rga_kernels: mean_group ", mean_group, " out of range");
  Groups g{};
  g.num = static_cast<int>(sizes.size());
  g.mean_group = static_cast<int>(mean_group);
  int64_t start = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    TORCH_CHECK(sizes[i] > 0, "rga_kernels: empty channel group");
    g.start[i] = start;
    start += sizes[i];
  }
  g.start[sizes.size()] = start;
  TORCH_CHECK(start == K, "rga_kernels: channel groups sum to ", start, ", expected K = ", K);
  return g;
}

// Outputs of bn_act_fwd: one contiguous (B, k_i (+P), n) tensor per written group, an empty
// tensor for the mean group; mean/invstd (K,); chmean (B, 1, n) or empty.
struct BnActOutputs {
  std::vector<Tensor> outs;
  Tensor mean, invstd, chmean;
  int64_t prefix_channels = 0;
};

inline BnActOutputs alloc_bn_act(const Tensor& y, const Groups& g, const OptTensor& prefix) {
  const int64_t B = y.size(0), K = y.size(1), n = y.size(2);
  BnActOutputs o;
  if (prefix.has_value()) {
    TORCH_CHECK(g.num == 1, "rga_kernels: bn_act_fwd: a prefix needs a single channel group");
    TORCH_CHECK(prefix->dim() == 3 && prefix->size(0) == B && prefix->size(2) == n,
                "rga_kernels: bn_act_fwd: prefix must be (", B, ", P, ", n, "), got ", prefix->sizes());
    TORCH_CHECK(prefix->scalar_type() == y.scalar_type(), "rga_kernels: prefix dtype ",
                prefix->scalar_type(), " differs from y's ", y.scalar_type());
    o.prefix_channels = prefix->size(1);
  }
  for (int i = 0; i < g.num; ++i) {
    const int64_t k = g.start[i + 1] - g.start[i];
    if (i == g.mean_group) {
      o.outs.push_back(at::empty({0}, y.options()));
    } else {
      o.outs.push_back(at::empty({B, k + o.prefix_channels, n}, y.options()));
    }
  }
  const auto acc = y.options().dtype(acc_type_of(y.scalar_type()));
  o.mean = at::empty({K}, acc);
  o.invstd = at::empty({K}, acc);
  o.chmean = g.mean_group >= 0 ? at::empty({B, 1, n}, y.options()) : at::empty({0}, y.options());
  return o;
}

}  // namespace branch
}  // namespace rga_kernels
