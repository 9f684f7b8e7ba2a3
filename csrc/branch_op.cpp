// One RGA branch, forward and backward, as two ops (rga_kernels::branch_fwd / branch_bwd) for
// the cpp and cuda backends: the GEMMs through ATen (cuBLAS / the CPU BLAS), the hand-written
// kernels of branch.cpp / branch_cuda.cu between them through the dispatcher (so a CPU tensor
// runs the CPU kernels and a CUDA tensor the CUDA ones). The same sequence as
// rga_kernels/_branch_chain.py's _forward/_backward (read that first: it is the commented version);
// here in C++ because an eager GPU step is host-bound and a Python call per kernel costs more
// than the kernel at RGA's sizes.
//
// Saved tensors travel as one list, indexed by Saved below; absent ones are empty tensors.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "branch_op.h"
#include "branch_ops.h"
#include "relation.h"

namespace rga_kernels {
namespace branch {
namespace {

// The kernels, called through the dispatcher (device dispatch, one profiler scope per kernel).
using BnActFwd = std::tuple<std::vector<Tensor>, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, bool, double, double,
    at::IntArrayRef, int64_t, const OptTensor&, bool);
using BnStats = std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, at::TensorList, bool,
                                           double, double);
using GateApply = Tensor(const Tensor&, const Tensor&);
using BnActBwd = std::tuple<Tensor, Tensor, Tensor>(at::TensorList, const Tensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, const Tensor&, bool, const OptTensor&, int64_t,
                                                    at::IntArrayRef);
using GateFwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                           const OptTensor&, const OptTensor&, bool, double, double);
using GateBwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&);
using HeadBwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool);

template <typename F>
c10::TypedOperatorHandle<F> kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}

Tensor empty_like_nothing(const Tensor& like) { return at::empty({0}, like.options()); }

OptTensor opt(const Tensor& t) { return t.defined() && t.numel() > 0 ? OptTensor(t) : OptTensor(); }

// Adjacent, contiguous tensors of one storage as one (sum rows, cols) matrix (a view), else a cat.
Tensor flat_rows(at::TensorList ts, int64_t cols) {
  int64_t rows = 0;
  bool adjacent = true;
  const auto size = ts[0].element_size();
  const char* next = static_cast<const char*>(ts[0].data_ptr());
  for (const auto& t : ts) {
    rows += t.numel() / cols;
    if (!t.is_contiguous() || t.scalar_type() != ts[0].scalar_type() || t.data_ptr() != next ||
        !t.storage().is_alias_of(ts[0].storage()))
      adjacent = false;
    next = static_cast<const char*>(t.data_ptr()) + t.numel() * size;
  }
  if (ts.size() == 1) return ts[0].reshape({rows, cols});
  if (adjacent && (ts[0].storage_offset() + rows * cols) * static_cast<int64_t>(size) <=
                      static_cast<int64_t>(ts[0].storage().nbytes()))
    return ts[0].as_strided({rows, cols}, {cols, 1});
  std::vector<Tensor> parts;
  for (const auto& t : ts) parts.push_back(t.reshape({-1, cols}));
  return at::cat(parts);
}

Tensor as_dtype(const Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// The embedding GEMM E = W_e . inp (B, K, n). The channel branch's input is the transpose of a
// contiguous (B, n, D) tensor: one GEMM over all B*n rows, E comes out transposed (a view; the
// kernels read any layout). Otherwise a batched GEMM with the weight broadcast (stride 0).
bool rows_major(const Tensor& inp) { return inp.transpose(1, 2).is_contiguous(); }

Tensor embed(const Tensor& inp, const Tensor& we) {
  const int64_t B = inp.size(0), D = inp.size(1), n = inp.size(2);
  if (rows_major(inp))
    return at::mm(inp.transpose(1, 2).reshape({B * n, D}), we.t()).view({B, n, we.size(0)}).transpose(1, 2);
  return at::matmul(we, inp);
}

// (B, c, n) <-> (B*n, c) for tensors stored channels-last ((B, n, c) in memory): views.
Tensor rows_of(const Tensor& t) { return t.transpose(1, 2).reshape({t.size(0) * t.size(2), t.size(1)}); }
Tensor from_rows(const Tensor& rows, int64_t B, int64_t n) {
  return rows.view({B, n, rows.size(1)}).transpose(1, 2);
}

// Gradients of embed: returns (d_inp, dWe); with `accumulate` (the gate's gradient of the same
// input), d_inp is added into it in place, in the GEMM.
std::tuple<Tensor, Tensor> embed_backward(const Tensor& grad_e, const Tensor& inp, const Tensor& we,
                                          const Tensor& accumulate) {
  const int64_t B = inp.size(0), D = inp.size(1), n = inp.size(2), K = we.size(0);
  if (rows_major(inp) && grad_e.transpose(1, 2).is_contiguous()) {
    const Tensor ge = grad_e.transpose(1, 2).reshape({B * n, K});
    const Tensor x = inp.transpose(1, 2).reshape({B * n, D});
    Tensor d_w = at::mm(ge.t(), x);
    if (accumulate.defined() && accumulate.transpose(1, 2).is_contiguous()) {
      Tensor acc = accumulate.transpose(1, 2).view({B * n, D});
      acc.addmm_(ge, we);
      return {accumulate, d_w};
    }
    Tensor d_x = at::mm(ge, we).view({B, n, D}).transpose(1, 2);
    return {accumulate.defined() ? d_x.add_(accumulate) : d_x, d_w};
  }
  if (accumulate.defined() && accumulate.is_contiguous()) {
    auto r = at::convolution_backward(grad_e, inp, we.unsqueeze(-1), c10::nullopt, {1}, {0}, {1}, false, {0}, 1,
                                      {false, true, false});
    Tensor acc = accumulate;
    acc.baddbmm_(we.t().expand({B, D, K}), grad_e);
    return {acc, std::get<1>(r).squeeze(-1)};
  }
  auto r = at::convolution_backward(grad_e, inp, we.unsqueeze(-1), c10::nullopt, {1}, {0}, {1}, false, {0}, 1,
                                    {true, true, false});
  Tensor d_x = std::get<0>(r);
  return {accumulate.defined() ? d_x.add_(accumulate) : d_x, std::get<1>(r).squeeze(-1)};
}

}  // namespace

std::tuple<Tensor, Tensor, std::vector<Tensor>> branch_fwd(
    const Tensor& inp, const OptTensor& target, at::TensorList emb_w, at::TensorList emb_bn_w,
    at::TensorList emb_bn_b, const OptTensor& rel_w, const OptTensor& rel_bn_w, const OptTensor& rel_bn_b,
    const Tensor& w1, const Tensor& h_bn_w, const Tensor& h_bn_b, const Tensor& w2, const Tensor& l_bn_w,
    const Tensor& l_bn_b, at::TensorList running, at::TensorList counters, at::IntArrayRef groups, int64_t theta_idx,
    int64_t phi_idx, int64_t mean_group, bool relation, bool batch_stats, double momentum, double eps) {
  TORCH_CHECK(inp.dim() == 3, "rga_kernels: branch_fwd: inp must be (B, D, n), got ", inp.sizes());
  TORCH_CHECK(running.size() == 8, "rga_kernels: branch_fwd: 8 running-statistics entries expected");
  static auto bn_act_fwd = kernel<BnActFwd>("rga_kernels::bn_act_fwd");
  static auto bn_stats = kernel<BnStats>("rga_kernels::bn_stats");
  static auto gate_fwd = kernel<GateFwd>("rga_kernels::gate_fwd");
  static auto gate_apply = kernel<GateApply>("rga_kernels::gate_apply");
  const auto dt = inp.scalar_type();
  const int64_t D = inp.size(1);
  const Tensor nothing = empty_like_nothing(inp);  // one placeholder for every absent entry
  std::vector<Tensor> s(kNumSaved, nothing);
  std::vector<Tensor> outs;
  Tensor chmean;
  if (!groups.empty()) {
    s[kWe] = as_dtype(flat_rows(emb_w, D), dt);
    s[kEw] = flat_rows(emb_bn_w, 1).view({-1});
    s[kEb] = flat_rows(emb_bn_b, 1).view({-1});
    s[kE] = embed(inp, s[kWe]);
    auto r = bn_act_fwd.call(s[kE], s[kEw], s[kEb], opt(running[0]), opt(running[1]), batch_stats, momentum, eps,
                             groups, mean_group, c10::nullopt, false);
    outs = std::get<0>(r);
    s[kEMean] = std::get<1>(r);
    s[kEInvstd] = std::get<2>(r);
    chmean = std::get<3>(r);
  }
  Tensor y;
  if (relation) {
    const Tensor theta = theta_idx < 0 ? inp : outs[theta_idx];
    const Tensor phi = phi_idx < 0 ? inp : outs[phi_idx];
    if (theta_idx >= 0) s[kTheta] = theta;
    if (phi_idx >= 0) s[kPhi] = phi;
    s[kWrel] = as_dtype(rel_w->flatten(1), dt);
    auto [z, pt, qt] = relation_fwd(theta, phi, s[kWrel]);
    s[kZ] = z;
    s[kPt] = pt;
    s[kQt] = qt;
    const OptTensor prefix = mean_group >= 0 ? OptTensor(chmean) : OptTensor();
    // y = [mean(g), z] stored channels-last: the W1 GEMM reads it as one (B*n, width) matrix
    auto r = bn_act_fwd.call(z, *rel_bn_w, *rel_bn_b, opt(running[2]), opt(running[3]), batch_stats, momentum, eps,
                             {z.size(1)}, -1, prefix, true);
    y = std::get<0>(r)[0];
    s[kZMean] = std::get<1>(r);
    s[kZInvstd] = std::get<2>(r);
  } else {
    y = chmean;
  }
  s[kY] = y;
  s[kW1] = as_dtype(w1.flatten(1), dt);
  const int64_t B = inp.size(0), n = inp.size(2);
  s[kH] = from_rows(at::mm(rows_of(y), s[kW1].t()), B, n);  // (B, h, n), channels-last
  std::tie(s[kHMean], s[kHInvstd]) =
      bn_stats.call(s[kH], opt(running[4]), opt(running[5]), counters, batch_stats, momentum, eps);
  std::tie(s[kA], s[kL], s[kLMean], s[kLInvstd]) =
      gate_fwd.call(s[kH], h_bn_w, h_bn_b, s[kHMean], s[kHInvstd], w2.flatten(1), l_bn_w, l_bn_b, opt(running[6]),
                    opt(running[7]), batch_stats, momentum, eps);
  Tensor out = gate_apply.call(target.has_value() ? *target : inp, s[kA]);
  return {out, s[kA], s};
}

// Returns (d_inp, d_target (empty when target is inp), dWe (K, D), d emb BN weight, bias (K,),
// dWrel (M, 2n), d rel BN weight, bias, dW1 (h, width), d h BN weight, bias, dW2 (1, h), d l BN
// weight, bias); absent ones are empty.
std::vector<Tensor> branch_bwd(const Tensor& grad_out, const Tensor& inp, const OptTensor& target,
                               at::TensorList emb_w, const OptTensor& rel_w, const OptTensor& rel_bn_w,
                               const OptTensor& rel_bn_b, const Tensor& w1, const Tensor& h_bn_w, const Tensor& h_bn_b,
                               const Tensor& w2, const Tensor& l_bn_w, at::TensorList saved, at::IntArrayRef groups,
                               int64_t theta_idx, int64_t phi_idx, int64_t mean_group, bool relation,
                               bool batch_stats) {
  TORCH_CHECK(saved.size() == kNumSaved, "rga_kernels: branch_bwd: ", kNumSaved, " saved tensors expected");
  static auto bn_act_bwd = kernel<BnActBwd>("rga_kernels::bn_act_bwd");
  static auto gate_bwd = kernel<GateBwd>("rga_kernels::gate_bwd");
  static auto head_bwd = kernel<HeadBwd>("rga_kernels::head_bwd");
  const auto& s = saved;
  const Tensor& tgt = target.has_value() ? *target : inp;
  auto [grad_target, grad_s] = gate_bwd.call(grad_out, tgt, s[kA]);
  auto [grad_h, grad_w2, grad_hw, grad_hb, grad_lw, grad_lb] =
      head_bwd.call(grad_s, s[kL], l_bn_w, s[kLMean], s[kLInvstd], s[kH], h_bn_w, h_bn_b, s[kHMean], s[kHInvstd],
                    w2.flatten(1), batch_stats);
  // H = W1 . y with y, H and grad_h stored channels-last: two plain GEMMs
  const int64_t B = inp.size(0), n = inp.size(2);
  const Tensor grad_h_rows = rows_of(grad_h);
  const Tensor grad_w1 = at::mm(grad_h_rows.t(), rows_of(s[kY]));
  const Tensor grad_y = from_rows(at::mm(grad_h_rows, s[kW1]), B, n);
  const Tensor nothing = empty_like_nothing(inp);
  std::vector<Tensor> r(15, nothing);
  Tensor d_inp;
  std::vector<Tensor> emb_grads;
  if (relation) {
    const Tensor grad_z_in = mean_group >= 0 ? grad_y.narrow(1, 1, grad_y.size(1) - 1) : grad_y;
    auto [grad_z, grad_rw, grad_rb] = bn_act_bwd.call({grad_z_in}, s[kZ], *rel_bn_w, *rel_bn_b, s[kZMean],
                                                      s[kZInvstd], batch_stats, c10::nullopt, -1, {s[kZ].size(1)});
    r[6] = grad_rw;
    r[7] = grad_rb;
    const Tensor theta = theta_idx < 0 ? inp : s[kTheta];
    const Tensor phi = phi_idx < 0 ? inp : s[kPhi];
    auto [d_theta, d_phi, d_wrel] = relation_bwd(grad_z, theta, phi, s[kWrel], s[kPt], s[kQt]);
    r[5] = d_wrel;
    if (theta_idx < 0) {
      d_inp = at::add(d_theta, d_phi);
    } else if (theta_idx == phi_idx) {
      emb_grads.push_back(at::add(d_theta, d_phi));
    } else {
      emb_grads = {d_theta, d_phi};
    }
  }
  if (!groups.empty()) {
    const OptTensor grad_chmean = mean_group >= 0 ? OptTensor(grad_y.narrow(1, 0, 1)) : OptTensor();
    auto [grad_e, grad_ew, grad_eb] = bn_act_bwd.call(emb_grads, s[kE], s[kEw], s[kEb], s[kEMean], s[kEInvstd],
                                                      batch_stats, grad_chmean, mean_group, groups);
    // the gate's gradient of inp (when inp is the gated tensor) is added inside the GEMM
    const Tensor acc = !target.has_value() ? grad_target : Tensor();
    auto [d_x, grad_we] = embed_backward(grad_e, inp, s[kWe], acc);
    d_inp = d_inp.defined() ? d_inp.add_(d_x) : d_x;
    r[2] = grad_we;
    r[3] = grad_ew;
    r[4] = grad_eb;
    if (target.has_value()) r[1] = grad_target;
  } else if (target.has_value()) {
    r[1] = grad_target;
  } else {
    d_inp = d_inp.defined() ? d_inp.add_(grad_target) : grad_target;
  }
  r[0] = d_inp.defined() ? d_inp : nothing;
  r[8] = grad_w1;
  r[9] = grad_hw;
  r[10] = grad_hb;
  r[11] = grad_w2;
  r[12] = grad_lw;
  r[13] = grad_lb;
  // In the flat parameter order of rga_kernels/branch_spec.py's flatten, each gradient
  // shaped and typed like its parameter: d_inp, d_target, then per embedding the conv weight,
  // BN weight and BN bias gradients, the relation conv and BN, W1 and its BN, W2 and its BN.
  std::vector<Tensor> out{r[0], r[1]};
  const int64_t ng = static_cast<int64_t>(emb_w.size());
  if (ng > 0) {
    std::vector<int64_t> sizes;
    for (const auto& w : emb_w) sizes.push_back(w.size(0));
    const auto dw = r[2].split_with_sizes(sizes);
    for (int64_t i = 0; i < ng; ++i) out.push_back(as_dtype(dw[i].view(emb_w[i].sizes()), emb_w[i].scalar_type()));
    for (const auto& t : r[3].split_with_sizes(sizes)) out.push_back(t);
    for (const auto& t : r[4].split_with_sizes(sizes)) out.push_back(t);
  }
  out.push_back(relation ? as_dtype(r[5].view(rel_w->sizes()), rel_w->scalar_type()) : r[5]);
  out.push_back(r[6]);
  out.push_back(r[7]);
  out.push_back(as_dtype(r[8].view(w1.sizes()), w1.scalar_type()));
  out.push_back(r[9]);
  out.push_back(r[10]);
  out.push_back(as_dtype(r[11].view(w2.sizes()), w2.scalar_type()));
  out.push_back(r[12]);
  out.push_back(r[13]);
  return out;
}

}  // namespace branch
}  // namespace rga_kernels

TORCH_LIBRARY_FRAGMENT(rga_kernels, m) {
  m.def(
      "branch_fwd(Tensor inp, Tensor? target, Tensor[] emb_w, Tensor[] emb_bn_w, Tensor[] emb_bn_b, Tensor? rel_w, "
      "Tensor? rel_bn_w, Tensor? rel_bn_b, Tensor w1, Tensor h_bn_w, Tensor h_bn_b, Tensor w2, Tensor l_bn_w, "
      "Tensor l_bn_b, Tensor(a!)[] running, Tensor(b!)[] counters, int[] groups, int theta, int phi, "
      "int mean_group, bool relation, "
      "bool batch_stats, float momentum, float eps) -> (Tensor, Tensor, Tensor[])");
  m.def(
      "branch_bwd(Tensor grad_out, Tensor inp, Tensor? target, Tensor[] emb_w, Tensor? rel_w, Tensor? rel_bn_w, "
      "Tensor? rel_bn_b, Tensor w1, Tensor h_bn_w, Tensor h_bn_b, Tensor w2, Tensor l_bn_w, Tensor[] saved, "
      "int[] groups, int theta, int phi, int mean_group, bool relation, bool batch_stats) -> Tensor[]");
}

// Device-generic: the kernels it calls dispatch on the tensors' device.
TORCH_LIBRARY_IMPL(rga_kernels, CompositeExplicitAutograd, m) {
  m.impl("branch_fwd", &rga_kernels::branch::branch_fwd);
  m.impl("branch_bwd", &rga_kernels::branch::branch_bwd);
}
