// The relation embedding of RGA through the factorized identity Z = (A phi^T) theta + (B theta^T) phi.
//
// Shared by the CPU and the CUDA registrations: the same device-generic ATen code, so the
// path that the CPU tests exercise is the path the GPU runs. Nothing here allocates an n x n
// (or B x n x n) tensor. Low-precision inputs are computed with fp32 intermediates and fp32
// accumulation; float64 stays float64 (gradcheck).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace rga_kernels {

inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_relation_inputs(const at::Tensor& theta, const at::Tensor& phi,
                                  const at::Tensor& weight) {
  TORCH_CHECK(theta.dim() == 3 && phi.dim() == 3,
              "relation_embed: theta and phi must be (B, d, n), got ", theta.sizes(), " and ",
              phi.sizes());
  TORCH_CHECK(theta.sizes() == phi.sizes(), "relation_embed: theta ", theta.sizes(),
              " and phi ", phi.sizes(), " must have the same shape");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == 2 * theta.size(2),
              "relation_embed: weight must be (M, 2n) = (M, ", 2 * theta.size(2), "), got ",
              weight.sizes());
  TORCH_CHECK(theta.scalar_type() == phi.scalar_type() &&
                  theta.scalar_type() == weight.scalar_type(),
              "relation_embed: dtypes differ: theta ", theta.scalar_type(), ", phi ",
              phi.scalar_type(), ", weight ", weight.scalar_type());
  TORCH_CHECK(at::isFloatingType(theta.scalar_type()),
              "relation_embed: expected floating point tensors, got ", theta.scalar_type());
}

// Returns (out (B, M, n) in the input dtype, p = A phi^T (B, M, d), q = B theta^T (B, M, d)),
// p and q in the accumulation dtype; they are saved for the backward.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> relation_fwd(const at::Tensor& theta,
                                                                   const at::Tensor& phi,
                                                                   const at::Tensor& weight) {
  check_relation_inputs(theta, phi, weight);
  const auto acc = accumulate_type(theta.scalar_type());
  const int64_t n = theta.size(2);
  const at::Tensor th = theta.to(acc);
  const at::Tensor ph = phi.to(acc);
  const at::Tensor w = weight.to(acc);
  const at::Tensor a = w.narrow(1, 0, n);
  const at::Tensor b = w.narrow(1, n, n);
  // (M, n) @ (B, n, d): matmul folds the batch into one GEMM.
  at::Tensor p = a.matmul(ph.transpose(1, 2));
  at::Tensor q = b.matmul(th.transpose(1, 2));
  at::Tensor out = p.bmm(th);
  out.baddbmm_(q, ph);
  return {out.to(theta.scalar_type()), p, q};
}

// Gradients of relation_fwd's first output: (dtheta, dphi, dweight).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> relation_bwd(
    const at::Tensor& grad_out, const at::Tensor& theta, const at::Tensor& phi,
    const at::Tensor& weight, const at::Tensor& p, const at::Tensor& q) {
  check_relation_inputs(theta, phi, weight);
  const int64_t B = theta.size(0), d = theta.size(1), n = theta.size(2), M = weight.size(0);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == B && grad_out.size(1) == M &&
                  grad_out.size(2) == n,
              "relation_embed backward: grad_out must be (", B, ", ", M, ", ", n, "), got ",
              grad_out.sizes());
  TORCH_CHECK(p.sizes() == q.sizes() && p.dim() == 3 && p.size(0) == B && p.size(1) == M &&
                  p.size(2) == d,
              "relation_embed backward: saved p, q must be (", B, ", ", M, ", ", d, ")");
  const auto acc = accumulate_type(theta.scalar_type());
  const at::Tensor g = grad_out.to(acc);
  const at::Tensor th = theta.to(acc);
  const at::Tensor ph = phi.to(acc);
  const at::Tensor w = weight.to(acc);
  const at::Tensor pa = p.to(acc);
  const at::Tensor qa = q.to(acc);
  const at::Tensor a = w.narrow(1, 0, n);
  const at::Tensor b = w.narrow(1, n, n);

  const at::Tensor u = g.bmm(th.transpose(1, 2));  // (B, M, d)
  const at::Tensor v = g.bmm(ph.transpose(1, 2));  // (B, M, d)
  // dtheta = P^T G + V^T Bw, dphi = Q^T G + U^T A      (B, d, n)
  at::Tensor dtheta = pa.transpose(1, 2).bmm(g);
  dtheta.add_(v.transpose(1, 2).matmul(b));
  at::Tensor dphi = qa.transpose(1, 2).bmm(g);
  dphi.add_(u.transpose(1, 2).matmul(a));
  // dA = sum_b U_b phi_b, dBw = sum_b V_b theta_b: one GEMM each with the batch folded into K.
  const at::Tensor u2 = u.transpose(0, 1).reshape({M, B * d});
  const at::Tensor v2 = v.transpose(0, 1).reshape({M, B * d});
  const at::Tensor da = u2.mm(ph.reshape({B * d, n}));
  const at::Tensor db = v2.mm(th.reshape({B * d, n}));
  at::Tensor dweight = at::cat({da, db}, 1);
  return {dtheta.to(theta.scalar_type()), dphi.to(phi.scalar_type()),
          dweight.to(weight.scalar_type())};
}

}  // namespace rga_kernels
