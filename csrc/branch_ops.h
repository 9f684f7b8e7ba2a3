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

#include <initializer_list>
#include <utility>
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

inline void check_vectors(std::initializer_list<std::pair<const Tensor*, const char*>> ts, int64_t K,
                          at::ScalarType acc) {
  for (const auto& [t, what] : ts) check_vector(*t, K, acc, what);
}

inline Groups check_bn_act_fwd(const Tensor& y, const Tensor& weight, const Tensor& bias, const OptTensor& rm,
                               const OptTensor& rv, bool batch_stats, at::IntArrayRef groups, int64_t mean_group) {
  check_3d(y, "y");
  const int64_t K = y.size(1);
  const auto acc = acc_type_of(y.scalar_type());
  check_vectors({{&weight, "weight"}, {&bias, "bias"}}, K, acc);
  check_running(rm, rv, batch_stats, K, acc);
  return make_groups(groups.vec(), mean_group, K);
}

// Returns, per group, the index into grad_outs of its gradient (-1: none).
inline std::vector<int> check_bn_act_bwd(at::TensorList grad_outs, const Tensor& y, const Tensor& weight,
                                         const Tensor& bias, const Tensor& mean, const Tensor& invstd,
                                         const OptTensor& grad_chmean, const Groups& g) {
  check_3d(y, "y");
  const int64_t B = y.size(0), K = y.size(1), n = y.size(2);
  check_vectors({{&weight, "weight"}, {&bias, "bias"}, {&mean, "mean"}, {&invstd, "invstd"}}, K,
                acc_type_of(y.scalar_type()));
  // grad_outs[j] belongs to the j-th written (non-mean) group
  std::vector<int> source(g.num, -1);
  for (int i = 0, j = 0; i < g.num; ++i)
    if (i != g.mean_group && j < static_cast<int>(grad_outs.size())) source[i] = j++;
  for (int i = 0; i < g.num; ++i) {
    if (source[i] < 0) continue;
    const Tensor& go = grad_outs[source[i]];
    TORCH_CHECK(go.dim() == 3 && go.size(0) == B && go.size(1) == g.start[i + 1] - g.start[i] && go.size(2) == n,
                "rga_kernels: bn_act_bwd: grad_outs[", source[i], "] must be (", B, ", ",
                g.start[i + 1] - g.start[i], ", ", n, "), got ", go.sizes());
    TORCH_CHECK(go.scalar_type() == y.scalar_type() && go.device() == y.device(),
                "rga_kernels: bn_act_bwd: gradient ", go.scalar_type(), " on ", go.device(), " where y is ",
                y.scalar_type(), " on ", y.device());
  }
  if (grad_chmean.has_value())
    TORCH_CHECK(grad_chmean->dim() == 3 && grad_chmean->size(0) == B && grad_chmean->size(1) == 1 &&
                    grad_chmean->size(2) == n && grad_chmean->scalar_type() == y.scalar_type(),
                "rga_kernels: bn_act_bwd: grad_chmean must be (", B, ", 1, ", n, ") of y's dtype");
  return source;
}

inline void check_gate_fwd(const Tensor& h, const Tensor& h_weight, const Tensor& h_bias, const Tensor& h_mean,
                           const Tensor& h_invstd, const Tensor& w2, const Tensor& l_weight, const Tensor& l_bias,
                           const OptTensor& l_rm, const OptTensor& l_rv, bool batch_stats) {
  check_3d(h, "h");
  const int64_t Kh = h.size(1);
  const auto acc = acc_type_of(h.scalar_type());
  check_vectors({{&h_weight, "h_weight"}, {&h_bias, "h_bias"}, {&h_mean, "h_mean"}, {&h_invstd, "h_invstd"}}, Kh,
                acc);
  TORCH_CHECK(w2.numel() == Kh && w2.is_contiguous() && w2.scalar_type() == acc, "rga_kernels: gate_fwd: w2 must hold ",
              Kh, " contiguous ", acc, " values, got ", w2.sizes(), " ", w2.scalar_type());
  check_vectors({{&l_weight, "l_weight"}, {&l_bias, "l_bias"}}, 1, acc);
  check_running(l_rm, l_rv, batch_stats, 1, acc);
}

inline void check_gate_bwd(const Tensor& grad_out, const Tensor& target, const Tensor& a) {
  check_3d(grad_out, "grad_out");
  check_3d(target, "target");
  TORCH_CHECK(grad_out.sizes() == target.sizes(), "rga_kernels: gate_bwd: grad_out ", grad_out.sizes(),
              " and target ", target.sizes(), " differ");
  const int64_t B = target.size(0), n = target.size(2);
  TORCH_CHECK(a.dim() == 3 && a.size(0) == B && a.size(1) == 1 && a.size(2) == n, "rga_kernels: gate_bwd: a must be (",
              B, ", 1, ", n, "), got ", a.sizes());
  TORCH_CHECK(grad_out.scalar_type() == target.scalar_type(), "rga_kernels: gate_bwd: grad_out dtype ",
              grad_out.scalar_type(), " differs from target's ", target.scalar_type());
}

inline void check_head_bwd(const Tensor& grad_s, const Tensor& l, const Tensor& l_weight, const Tensor& l_mean,
                           const Tensor& l_invstd, const Tensor& h, const Tensor& h_weight, const Tensor& h_bias,
                           const Tensor& h_mean, const Tensor& h_invstd, const Tensor& w2) {
  check_3d(h, "h");
  const int64_t B = h.size(0), Kh = h.size(1), n = h.size(2);
  const auto acc = acc_type_of(h.scalar_type());
  check_vectors({{&h_weight, "h_weight"}, {&h_bias, "h_bias"}, {&h_mean, "h_mean"}, {&h_invstd, "h_invstd"}}, Kh,
                acc);
  check_vectors({{&l_weight, "l_weight"}, {&l_mean, "l_mean"}, {&l_invstd, "l_invstd"}}, 1, acc);
  TORCH_CHECK(w2.numel() == Kh && w2.is_contiguous() && w2.scalar_type() == acc, "rga_kernels: head_bwd: w2 must hold ",
              Kh, " contiguous ", acc, " values");
  TORCH_CHECK(l.is_contiguous() && l.numel() == B * n && grad_s.is_contiguous() && grad_s.numel() == B * n &&
                  l.scalar_type() == h.scalar_type() && grad_s.scalar_type() == h.scalar_type(),
              "rga_kernels: head_bwd: l and grad_s must be contiguous (", B, ", 1, ", n, ") tensors of h's dtype");
}

constexpr int kMaxCounters = 8;

// num_batches_tracked counters (int64 scalars) that a kernel increments.
inline void check_counters(at::TensorList counters, const Tensor& like) {
  TORCH_CHECK(counters.size() <= kMaxCounters, "rga_kernels: at most ", kMaxCounters, " counters, got ",
              counters.size());
  for (const auto& c : counters)
    TORCH_CHECK(c.scalar_type() == at::kLong && c.numel() == 1 && c.device() == like.device(),
                "rga_kernels: counters must be one-element int64 tensors on ", like.device());
}

inline void check_gate_apply(const Tensor& target, const Tensor& a) {
  check_3d(target, "target");
  TORCH_CHECK(a.dim() == 3 && a.size(0) == target.size(0) && a.size(1) == 1 && a.size(2) == target.size(2),
              "rga_kernels: gate_apply: a must be (", target.size(0), ", 1, ", target.size(2), "), got ", a.sizes());
}

// Outputs of bn_act_fwd: one contiguous (B, k_i (+P), n) tensor per written group, an empty
// tensor for the mean group; mean/invstd (K,); chmean (B, 1, n) or empty.
struct BnActOutputs {
  std::vector<Tensor> outs;
  Tensor mean, invstd, chmean;
  int64_t prefix_channels = 0;
};

// channels_last: each output's storage is (B, n, k) (returned as its (B, k, n) transpose), the
// layout the next GEMM reads as one (B*n, k) matrix.
inline BnActOutputs alloc_bn_act(const Tensor& y, const Groups& g, const OptTensor& prefix, bool channels_last) {
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
      const int64_t c = k + o.prefix_channels;
      o.outs.push_back(channels_last ? at::empty({B, n, c}, y.options()).transpose(1, 2)
                                     : at::empty({B, c, n}, y.options()));
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
