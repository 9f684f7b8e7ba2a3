// The whole branch, forward and backward, in C++ (branch_op.cpp): registered as the ops
// rga_kernels::branch_fwd / branch_bwd, and called directly by the module chain (chain_op.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

namespace rga_kernels {
namespace branch {

// Saved tensors of branch_fwd, in its list's order (read by chain_op.cpp's composite_step).
enum Saved : int {
  kE, kEMean, kEInvstd, kTheta, kPhi, kZ, kPt, kQt, kZMean, kZInvstd, kY, kH, kHMean, kHInvstd,
  kL, kLMean, kLInvstd, kA, kWe, kEw, kEb, kWrel, kW1, kNumSaved
};

// Returns (target * a, a, saved); target none: inp is gated.
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> branch_fwd(
    const at::Tensor& inp, const c10::optional<at::Tensor>& target, at::TensorList emb_w, at::TensorList emb_bn_w,
    at::TensorList emb_bn_b, const c10::optional<at::Tensor>& rel_w, const c10::optional<at::Tensor>& rel_bn_w,
    const c10::optional<at::Tensor>& rel_bn_b, const at::Tensor& w1, const at::Tensor& h_bn_w,
    const at::Tensor& h_bn_b, const at::Tensor& w2, const at::Tensor& l_bn_w, const at::Tensor& l_bn_b,
    at::TensorList running, at::TensorList counters, at::IntArrayRef groups, int64_t theta_idx, int64_t phi_idx,
    int64_t mean_group, bool relation, bool batch_stats, double momentum, double eps);

// Returns (d_inp, d_target, then the parameter gradients in the Python side's flat order, the
// relation's three present or not); absent ones are empty tensors.
std::vector<at::Tensor> branch_bwd(const at::Tensor& grad_out, const at::Tensor& inp,
                                   const c10::optional<at::Tensor>& target, at::TensorList emb_w,
                                   const c10::optional<at::Tensor>& rel_w, const c10::optional<at::Tensor>& rel_bn_w,
                                   const c10::optional<at::Tensor>& rel_bn_b, const at::Tensor& w1,
                                   const at::Tensor& h_bn_w, const at::Tensor& h_bn_b, const at::Tensor& w2,
                                   const at::Tensor& l_bn_w, at::TensorList saved, at::IntArrayRef groups,
                                   int64_t theta_idx, int64_t phi_idx, int64_t mean_group, bool relation,
                                   bool batch_stats);

}  // namespace branch
}  // namespace rga_kernels
