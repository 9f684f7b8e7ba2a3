// The relation embedding of RGA through the factorized identity Z = (A phi^T) theta + (B theta^T) phi.
//
// Shared by the CPU and the CUDA registrations: the same device-generic ATen code, so the
// path that the CPU tests exercise is the path the GPU runs. Nothing here allocates an n x n
// (or B x n x n) tensor. Every GEMM runs in the input dtype with the BLAS's accumulation (fp32
// for fp16/bf16 on cuBLAS and the CPU); float64 stays float64 (gradcheck).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace rga_kernels {

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

// Returns (out (B, M, n), p = A phi^T (B, M, d), q = B theta^T (B, M, d)), all in the input dtype;
// p and q are saved for the backward. The GEMMs run in the input dtype (cuBLAS and the CPU BLAS
// accumulate fp16/bf16 products in fp32): no upcast copies of the inputs.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> relation_fwd(const at::Tensor& theta,
                                                                   const at::Tensor& phi,
                                                                   const at::Tensor& weight) {
  check_relation_inputs(theta, phi, weight);
  const int64_t B = theta.size(0), n = theta.size(2), M = weight.size(0);
  // the weight halves broadcast over the batch (stride 0, no copy); theta/phi read in place
  const at::Tensor a = weight.narrow(1, 0, n).expand({B, M, n});
  const at::Tensor b = weight.narrow(1, n, n).expand({B, M, n});
  at::Tensor p = a.bmm(phi.transpose(1, 2));
  at::Tensor q = b.bmm(theta.transpose(1, 2));
  at::Tensor out = at::baddbmm(q.bmm(phi), p, theta);
  return {out, p, q};
}

// A (B, d, n) tensor as a (B*d, n) matrix: a view when the batch is dense, else one copy.
inline at::Tensor fold_batch(const at::Tensor& t) {
  return t.reshape({t.size(0) * t.size(1), t.size(2)});
}

// Gradients of relation_fwd's first output: (dtheta, dphi, dweight), in the input dtypes.
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
  const auto dtype = theta.scalar_type();
  const at::Tensor g = grad_out.scalar_type() == dtype ? grad_out : grad_out.to(dtype);
  const at::Tensor pd = p.scalar_type() == dtype ? p : p.to(dtype);
  const at::Tensor qd = q.scalar_type() == dtype ? q : q.to(dtype);
  const at::Tensor a = weight.narrow(1, 0, n);
  const at::Tensor b = weight.narrow(1, n, n);

  // U^T = theta G^T, V^T = phi G^T     (B, d, M), contiguous
  const at::Tensor ut = theta.bmm(g.transpose(1, 2));
  const at::Tensor vt = phi.bmm(g.transpose(1, 2));
  // dtheta = V^T Bw + P^T G, dphi = U^T A + Q^T G      (B, d, n)
  // (B, d, M) @ (M, n): matmul folds the batch of the contiguous U^T / V^T into one GEMM
  at::Tensor dtheta = vt.matmul(b);
  dtheta.baddbmm_(pd.transpose(1, 2), g);
  at::Tensor dphi = ut.matmul(a);
  dphi.baddbmm_(qd.transpose(1, 2), g);
  // dA = sum_b U_b phi_b, dBw = sum_b V_b theta_b: one GEMM each with the batch folded into K,
  // written straight into the two halves of dweight (no concatenation).
  at::Tensor dweight = at::empty({M, 2 * n}, weight.options());
  at::Tensor da = dweight.narrow(1, 0, n);
  at::Tensor db = dweight.narrow(1, n, n);
  at::mm_out(da, fold_batch(ut).t(), fold_batch(phi));
  at::mm_out(db, fold_batch(vt).t(), fold_batch(theta));
  return {dtheta, dphi, dweight};
}

}  // namespace rga_kernels
