// CUDA implementations of the fused branch's kernels (the CPU ones are in branch.cpp; both take
// their arithmetic from branch.h and their checks and allocations from branch_ops.h).
//
// Layout of the work, kept plain on purpose:
//   * per-channel kernels (bn_act_fwd, bn_stats, bn_act_bwd, head_bwd): one block per channel;
//     the block's threads stride over the channel's B*n values, reduce in shared memory, then
//     (where there is an output) stride again to write it. Two passes over the data, no atomics,
//     deterministic.
//   * per-node kernels (channel_mean, gate_bwd) and gate_apply: grid-stride loops over nodes / elements.
//   * gate_fwd: the logit's BatchNorm has one channel: a reduction over every node before any
//     sigmoid can be written. In training below kGateSplitWork multiply-adds, a single block does it
//     all (one launch); from there on gate_logits writes the logits and one Welford partial per block
//     of kGateChunk nodes, and gate_norm merges the partials (every block the same merges in the same
//     order: equal statistics everywhere, deterministic) and writes the sigmoid (two launches). In
//     evaluation gate_logits writes the sigmoid itself (one launch, any size).
// Every launch records one `kernel::NAME` profiler event, the same names as the CPU scopes.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/record_function.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "branch_ops.h"

namespace rga_kernels {
namespace branch {
namespace {

constexpr int kThreads = 256;      // threads of a per-channel block
constexpr int kGateThreads = 512;  // threads of gate_fwd's single block
constexpr int64_t kGateChunk = 1024;  // nodes per block of gate_logits

struct Strides3 {
  int64_t sb, sk, si;
};

Strides3 strides_of(const Tensor& t) { return Strides3{t.stride(0), t.stride(1), t.stride(2)}; }

__device__ __forceinline__ int64_t offset(const Strides3& s, int64_t b, int64_t k, int64_t i) {
  return b * s.sb + k * s.sk + i * s.si;
}

// Shared-memory tree reductions (blockDim.x is a power of two).
template <typename acc_t, int THREADS>
__device__ Welford<acc_t> block_welford(Welford<acc_t> w) {
  __shared__ acc_t s_mean[THREADS], s_m2[THREADS], s_count[THREADS];
  const int tid = threadIdx.x;
  s_mean[tid] = w.mean;
  s_m2[tid] = w.m2;
  s_count[tid] = w.count;
  __syncthreads();
  for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
    if (tid < stride) {
      const Welford<acc_t> m = welford_merge(Welford<acc_t>{s_mean[tid], s_m2[tid], s_count[tid]},
                                             Welford<acc_t>{s_mean[tid + stride], s_m2[tid + stride],
                                                            s_count[tid + stride]});
      s_mean[tid] = m.mean;
      s_m2[tid] = m.m2;
      s_count[tid] = m.count;
    }
    __syncthreads();
  }
  const Welford<acc_t> r{s_mean[0], s_m2[0], s_count[0]};
  __syncthreads();
  return r;
}

template <typename acc_t, int N, int THREADS>
__device__ void block_sums(acc_t (&v)[N]) {
  __shared__ acc_t s[N][THREADS];
  const int tid = threadIdx.x;
  for (int j = 0; j < N; ++j) s[j][tid] = v[j];
  __syncthreads();
  for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
    if (tid < stride)
      for (int j = 0; j < N; ++j) s[j][tid] += s[j][tid + stride];
    __syncthreads();
  }
  for (int j = 0; j < N; ++j) v[j] = s[j][0];
  __syncthreads();
}

// Channel k's statistics, by the whole block; returns (mean, invstd) to every thread.
template <typename scalar_t, typename acc_t>
__device__ void channel_stats(const scalar_t* y, Strides3 s, int64_t k, int64_t B, int64_t n, bool batch_stats,
                              acc_t* rm, acc_t* rv, double momentum, double eps, acc_t& mean, acc_t& invstd) {
  if (batch_stats) {
    Welford<acc_t> w = welford_init<acc_t>();
    for (int64_t e = threadIdx.x; e < B * n; e += blockDim.x)
      welford_push(w, static_cast<acc_t>(y[offset(s, e / n, k, e % n)]));
    w = block_welford<acc_t, kThreads>(w);
    mean = w.mean;
    invstd = invstd_of(w, eps);
    if (threadIdx.x == 0 && rm != nullptr) running_update(rm + k, rv + k, w, momentum);
  } else {
    mean = rm[k];
    invstd = invstd_of_running(rv[k], eps);
  }
}

template <typename scalar_t>
struct GroupOuts {
  scalar_t* ptr[kMaxGroups];
  Strides3 s[kMaxGroups];
};

struct Counters {
  int64_t* ptr[kMaxCounters];
  int num;
};

template <typename scalar_t, typename acc_t>
__global__ void bn_act_fwd_kernel(const scalar_t* y, Strides3 s, int64_t B, int64_t K, int64_t n, const acc_t* weight,
                                  const acc_t* bias, acc_t* rm, acc_t* rv, bool batch_stats, double momentum,
                                  double eps, acc_t* mean_out, acc_t* invstd_out, Groups g, GroupOuts<scalar_t> outs,
                                  const scalar_t* prefix, Strides3 ps, int64_t P) {
  const int64_t k = blockIdx.x;
  acc_t mean, invstd, scale, shift;
  channel_stats<scalar_t, acc_t>(y, s, k, B, n, batch_stats, rm, rv, momentum, eps, mean, invstd);
  if (threadIdx.x == 0) {
    mean_out[k] = mean;
    invstd_out[k] = invstd;
  }
  const int gi = group_of(g, k);
  if (gi != g.mean_group) {
    bn_affine(weight[k], bias[k], mean, invstd, scale, shift);
    const int64_t row = P + k - g.start[gi];
    scalar_t* out = outs.ptr[gi];
    const Strides3 os = outs.s[gi];
    for (int64_t e = threadIdx.x; e < B * n; e += blockDim.x) {
      const int64_t b = e / n, i = e % n;
      out[offset(os, b, row, i)] =
          static_cast<scalar_t>(relu(scale * static_cast<acc_t>(y[offset(s, b, k, i)]) + shift));
    }
  }
  if (k == 0 && P > 0) {  // the prefix ahead of the single group's channels
    scalar_t* out = outs.ptr[0];
    for (int64_t e = threadIdx.x; e < B * P * n; e += blockDim.x) {
      const int64_t b = e / (P * n), c = (e / n) % P, i = e % n;
      out[offset(outs.s[0], b, c, i)] = prefix[offset(ps, b, c, i)];
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void channel_mean_kernel(const scalar_t* y, Strides3 s, int64_t B, int64_t n, const acc_t* weight,
                                    const acc_t* bias, const acc_t* mean, const acc_t* invstd, int64_t c0, int64_t c1,
                                    scalar_t* out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < B * n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / n, i = e % n;
    acc_t sum = 0;
    for (int64_t k = c0; k < c1; ++k) {
      acc_t scale, shift;
      bn_affine(weight[k], bias[k], mean[k], invstd[k], scale, shift);
      sum += relu(scale * static_cast<acc_t>(y[offset(s, b, k, i)]) + shift);
    }
    out[e] = static_cast<scalar_t>(sum / acc_t(c1 - c0));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_stats_kernel(const scalar_t* y, Strides3 s, int64_t B, int64_t n, acc_t* rm, acc_t* rv,
                                bool batch_stats, double momentum, double eps, acc_t* mean_out, acc_t* invstd_out,
                                Counters counters) {
  const int64_t k = blockIdx.x;
  if (k == 0 && threadIdx.x < counters.num) counters.ptr[threadIdx.x][0] += 1;  // num_batches_tracked
  acc_t mean, invstd;
  channel_stats<scalar_t, acc_t>(y, s, k, B, n, batch_stats, rm, rv, momentum, eps, mean, invstd);
  if (threadIdx.x == 0) {
    mean_out[k] = mean;
    invstd_out[k] = invstd;
  }
}

// Where bn_act_bwd reads each group's incoming gradient from.
template <typename scalar_t, typename acc_t>
struct GradSources {
  const scalar_t* ptr[kMaxGroups];  // nullptr: no gradient
  Strides3 s[kMaxGroups];
  acc_t scale[kMaxGroups];
  bool channel_mean[kMaxGroups];  // the (B, 1, n) gradient of the channel mean: channel index 0
};

template <typename scalar_t, typename acc_t>
__global__ void bn_act_bwd_kernel(const scalar_t* y, Strides3 s, int64_t B, int64_t K, int64_t n, const acc_t* weight,
                                  const acc_t* bias, const acc_t* mean, const acc_t* invstd, bool batch_stats, Groups g,
                                  GradSources<scalar_t, acc_t> src, scalar_t* grad_y, Strides3 so, acc_t* grad_w,
                                  acc_t* grad_b) {
  const int64_t k = blockIdx.x;
  const int gi = group_of(g, k);
  const scalar_t* gp = src.ptr[gi];
  const Strides3 gs = src.s[gi];
  const int64_t gk = src.channel_mean[gi] ? 0 : k - g.start[gi];
  const acc_t gscale = src.scale[gi];
  const acc_t m = mean[k], is = invstd[k], w = weight[k], bb = bias[k];
  acc_t sums[2] = {0, 0};
  for (int64_t e = threadIdx.x; e < B * n; e += blockDim.x) {
    const int64_t b = e / n, i = e % n;
    const acc_t xhat = (static_cast<acc_t>(y[offset(s, b, k, i)]) - m) * is;
    const acc_t gv = (gp != nullptr && w * xhat + bb > acc_t(0))
                         ? gscale * static_cast<acc_t>(gp[offset(gs, b, gk, i)]) : acc_t(0);
    sums[0] += gv;
    sums[1] += gv * xhat;
  }
  block_sums<acc_t, 2, kThreads>(sums);
  if (threadIdx.x == 0) {
    grad_b[k] = sums[0];
    grad_w[k] = sums[1];
  }
  const acc_t N = static_cast<acc_t>(B * n);
  for (int64_t e = threadIdx.x; e < B * n; e += blockDim.x) {
    const int64_t b = e / n, i = e % n;
    const acc_t xhat = (static_cast<acc_t>(y[offset(s, b, k, i)]) - m) * is;
    const acc_t gv = (gp != nullptr && w * xhat + bb > acc_t(0))
                         ? gscale * static_cast<acc_t>(gp[offset(gs, b, gk, i)]) : acc_t(0);
    grad_y[offset(so, b, k, i)] =
        static_cast<scalar_t>(bn_backward(gv, xhat, w * is, sums[0] / N, sums[1] / N, batch_stats));
  }
}

// The logit l = w2 . ReLU(BN_h(h)) of node e, in acc_t.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t head_logit(const scalar_t* h, Strides3 s, int64_t b, int64_t i, int64_t Kh,
                                            const acc_t* hw, const acc_t* hb, const acc_t* hm, const acc_t* hi,
                                            const acc_t* w2) {
  acc_t sum = 0;
  for (int64_t k = 0; k < Kh; ++k) {
    acc_t scale, shift;
    bn_affine(hw[k], hb[k], hm[k], hi[k], scale, shift);
    sum += w2[k] * relu(scale * static_cast<acc_t>(h[offset(s, b, k, i)]) + shift);
  }
  return sum;
}

template <typename scalar_t, typename acc_t>
__global__ void gate_fwd_kernel(const scalar_t* h, Strides3 s, int64_t B, int64_t Kh, int64_t n, const acc_t* hw,
                                const acc_t* hb, const acc_t* hm, const acc_t* hi, const acc_t* w2, const acc_t* lw,
                                const acc_t* lb, acc_t* rm, acc_t* rv, bool batch_stats, double momentum, double eps,
                                scalar_t* a, scalar_t* l, acc_t* l_mean, acc_t* l_invstd) {
  Welford<acc_t> w = welford_init<acc_t>();
  for (int64_t e = threadIdx.x; e < B * n; e += blockDim.x) {
    const acc_t v = head_logit<scalar_t, acc_t>(h, s, e / n, e % n, Kh, hw, hb, hm, hi, w2);
    l[e] = static_cast<scalar_t>(v);
    welford_push(w, v);
  }
  acc_t m, is;
  if (batch_stats) {
    w = block_welford<acc_t, kGateThreads>(w);
    m = w.mean;
    is = invstd_of(w, eps);
    if (threadIdx.x == 0 && rm != nullptr) running_update(rm, rv, w, momentum);
  } else {
    m = rm[0];
    is = invstd_of_running(rv[0], eps);
  }
  if (threadIdx.x == 0) {
    *l_mean = m;
    *l_invstd = is;
  }
  acc_t scale, shift;
  bn_affine(lw[0], lb[0], m, is, scale, shift);
  for (int64_t e = threadIdx.x; e < B * n; e += blockDim.x) {  // the logit again, in acc_t, as the CPU keeps it
    const acc_t v = head_logit<scalar_t, acc_t>(h, s, e / n, e % n, Kh, hw, hb, hm, hi, w2);
    a[e] = static_cast<scalar_t>(sigmoid(scale * v + shift));
  }
}

// Blocks of kGateChunk nodes: the logits (l, and lacc in acc_t for gate_norm); training: the
// block's Welford partial at part[3 * block] (mean, m2, count); evaluation: the sigmoid with the
// running statistics, and block 0 stores those.
template <typename scalar_t, typename acc_t>
__global__ void gate_logits_kernel(const scalar_t* h, Strides3 s, int64_t B, int64_t Kh, int64_t n, const acc_t* hw,
                                   const acc_t* hb, const acc_t* hm, const acc_t* hi, const acc_t* w2,
                                   const acc_t* lw, const acc_t* lb, const acc_t* rm, const acc_t* rv,
                                   bool batch_stats, double eps, scalar_t* a, scalar_t* l, acc_t* lacc, acc_t* part,
                                   acc_t* l_mean, acc_t* l_invstd) {
  const int64_t N = B * n;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kGateChunk;
  const int64_t end = start + kGateChunk < N ? start + kGateChunk : N;
  acc_t scale = 0, shift = 0;
  if (!batch_stats) {
    const acc_t m = rm[0], is = invstd_of_running(rv[0], eps);
    bn_affine(lw[0], lb[0], m, is, scale, shift);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      *l_mean = m;
      *l_invstd = is;
    }
  }
  Welford<acc_t> w = welford_init<acc_t>();
  for (int64_t e = start + threadIdx.x; e < end; e += blockDim.x) {
    const acc_t v = head_logit<scalar_t, acc_t>(h, s, e / n, e % n, Kh, hw, hb, hm, hi, w2);
    l[e] = static_cast<scalar_t>(v);
    if (batch_stats) {
      lacc[e] = v;
      welford_push(w, v);
    } else {
      a[e] = static_cast<scalar_t>(sigmoid(scale * v + shift));
    }
  }
  if (batch_stats) {  // the same for every thread of the launch: the block reduction's barriers are safe
    w = block_welford<acc_t, kThreads>(w);
    if (threadIdx.x == 0) {
      part[3 * blockIdx.x] = w.mean;
      part[3 * blockIdx.x + 1] = w.m2;
      part[3 * blockIdx.x + 2] = w.count;
    }
  }
}

// Training, after gate_logits: every block merges the P partials (each thread a fixed strided
// subset in order, then the block's tree), so all blocks hold the same statistics; block 0 stores
// them and updates the running ones; then a grid-stride sigmoid over the logits.
template <typename scalar_t, typename acc_t>
__global__ void gate_norm_kernel(const acc_t* part, int64_t P, const acc_t* lacc, int64_t N, const acc_t* lw,
                                 const acc_t* lb, acc_t* rm, acc_t* rv, double momentum, double eps, scalar_t* a,
                                 acc_t* l_mean, acc_t* l_invstd) {
  Welford<acc_t> w = welford_init<acc_t>();
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x)
    w = welford_merge(w, Welford<acc_t>{part[3 * p], part[3 * p + 1], part[3 * p + 2]});
  w = block_welford<acc_t, kThreads>(w);
  const acc_t m = w.mean, is = invstd_of(w, eps);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    *l_mean = m;
    *l_invstd = is;
    if (rm != nullptr) running_update(rm, rv, w, momentum);
  }
  acc_t scale, shift;
  bn_affine(lw[0], lb[0], m, is, scale, shift);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < N;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    a[e] = static_cast<scalar_t>(sigmoid(scale * lacc[e] + shift));
}

template <typename tgt_t, typename gate_t, typename acc_t>
__global__ void gate_bwd_kernel(const tgt_t* grad_out, Strides3 sg, const tgt_t* target, Strides3 st, const gate_t* a,
                                Strides3 sa, int64_t B, int64_t D, int64_t n, tgt_t* grad_target, Strides3 so,
                                gate_t* grad_s) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < B * n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / n, i = e % n;
    const acc_t av = static_cast<acc_t>(a[offset(sa, b, 0, i)]);
    acc_t sum = 0;
    for (int64_t d = 0; d < D; ++d) {
      const acc_t go = static_cast<acc_t>(grad_out[offset(sg, b, d, i)]);
      sum += go * static_cast<acc_t>(target[offset(st, b, d, i)]);
      grad_target[offset(so, b, d, i)] = static_cast<tgt_t>(go * av);
    }
    grad_s[e] = static_cast<gate_t>(sigmoid_backward(sum, av));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void head_bwd_kernel(const scalar_t* grad_s, const scalar_t* l, const acc_t* lw_p, const acc_t* lm_p,
                                const acc_t* li_p,
                                const scalar_t* h, Strides3 s, int64_t B, int64_t Kh, int64_t n, const acc_t* hw,
                                const acc_t* hb, const acc_t* hm, const acc_t* hi, const acc_t* w2, bool batch_stats,
                                scalar_t* grad_h, Strides3 sgh, acc_t* grad_w2, acc_t* grad_hw, acc_t* grad_hb, acc_t* grad_lw,
                                acc_t* grad_lb) {
  const int64_t k = blockIdx.x;
  const int64_t NN = B * n;
  const acc_t N = static_cast<acc_t>(NN);
  const acc_t lw = *lw_p, lm = *lm_p, li = *li_p;  // (device memory: reading them on the host would sync)
  // the logit's BN backward sums (one channel), computed by every block
  acc_t lsums[2] = {0, 0};
  for (int64_t e = threadIdx.x; e < NN; e += blockDim.x) {
    const acc_t gv = static_cast<acc_t>(grad_s[e]);
    lsums[0] += gv;
    lsums[1] += gv * (static_cast<acc_t>(l[e]) - lm) * li;
  }
  block_sums<acc_t, 2, kThreads>(lsums);
  if (k == 0 && threadIdx.x == 0) {
    *grad_lb = lsums[0];
    *grad_lw = lsums[1];
  }
  acc_t scale, shift;
  bn_affine(hw[k], hb[k], hm[k], hi[k], scale, shift);
  acc_t sums[3] = {0, 0, 0};  // dW2[k], sum g, sum g * xhat
  for (int64_t e = threadIdx.x; e < NN; e += blockDim.x) {
    const acc_t dl = bn_backward(static_cast<acc_t>(grad_s[e]), (static_cast<acc_t>(l[e]) - lm) * li, lw * li,
                                 lsums[0] / N, lsums[1] / N, batch_stats);
    const acc_t hv = static_cast<acc_t>(h[offset(s, e / n, k, e % n)]);
    const acc_t pre = scale * hv + shift;
    sums[0] += dl * relu(pre);
    const acc_t gv = pre > acc_t(0) ? w2[k] * dl : acc_t(0);
    sums[1] += gv;
    sums[2] += gv * (hv - hm[k]) * hi[k];
  }
  block_sums<acc_t, 3, kThreads>(sums);
  if (threadIdx.x == 0) {
    grad_w2[k] = sums[0];
    grad_hb[k] = sums[1];
    grad_hw[k] = sums[2];
  }
  for (int64_t e = threadIdx.x; e < NN; e += blockDim.x) {
    const int64_t b = e / n, i = e % n;
    const acc_t dl = bn_backward(static_cast<acc_t>(grad_s[e]), (static_cast<acc_t>(l[e]) - lm) * li, lw * li,
                                 lsums[0] / N, lsums[1] / N, batch_stats);
    const acc_t hv = static_cast<acc_t>(h[offset(s, b, k, i)]);
    const acc_t gv = scale * hv + shift > acc_t(0) ? w2[k] * dl : acc_t(0);
    grad_h[offset(sgh, b, k, i)] =
        static_cast<scalar_t>(bn_backward(gv, (hv - hm[k]) * hi[k], scale, sums[1] / N, sums[2] / N, batch_stats));
  }
}

template <typename tgt_t, typename gate_t, typename acc_t>
__global__ void gate_apply_kernel(const tgt_t* target, Strides3 st, const gate_t* a, Strides3 sa, int64_t B, int64_t D,
                                  int64_t n, tgt_t* out, Strides3 so) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < B * D * n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / (D * n), d = (e / n) % D, i = e % n;
    out[offset(so, b, d, i)] = static_cast<tgt_t>(static_cast<acc_t>(target[offset(st, b, d, i)]) *
                                                  static_cast<acc_t>(a[offset(sa, b, 0, i)]));
  }
}

int node_blocks(int64_t nodes) {
  const int64_t blocks = (nodes + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

template <typename acc_t>
acc_t* opt_ptr(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<acc_t>() : nullptr;
}

// ------------------------------------------------------------------------------------------------
// Host wrappers (registered for the CUDA dispatch key)
// ------------------------------------------------------------------------------------------------

std::tuple<std::vector<Tensor>, Tensor, Tensor, Tensor> bn_act_fwd_cuda(
    const Tensor& y, const Tensor& weight, const Tensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool batch_stats, double momentum, double eps, at::IntArrayRef groups,
    int64_t mean_group, const OptTensor& prefix, bool channels_last) {
  const Groups g = check_bn_act_fwd(y, weight, bias, running_mean, running_var, batch_stats, groups, mean_group);
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t B = y.size(0), K = y.size(1), n = y.size(2);
  BnActOutputs o = alloc_bn_act(y, g, prefix, channels_last);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GroupOuts<scalar_t> outs{};
    for (int i = 0; i < g.num; ++i) {
      const bool written = i != g.mean_group;
      outs.ptr[i] = written ? o.outs[i].data_ptr<scalar_t>() : nullptr;
      outs.s[i] = written ? strides_of(o.outs[i]) : Strides3{0, 0, 0};
    }
    const scalar_t* pp = prefix.has_value() ? prefix->data_ptr<scalar_t>() : nullptr;
    const Strides3 ps = prefix.has_value() ? strides_of(*prefix) : Strides3{0, 0, 0};
    {
      RECORD_FUNCTION("kernel::bn_act_fwd", std::vector<c10::IValue>());
      bn_act_fwd_kernel<scalar_t, acc_t><<<K, kThreads, 0, stream>>>(
          y.data_ptr<scalar_t>(), strides_of(y), B, K, n, weight.data_ptr<acc_t>(), bias.data_ptr<acc_t>(),
          opt_ptr<acc_t>(running_mean), opt_ptr<acc_t>(running_var), batch_stats, momentum, eps,
          o.mean.data_ptr<acc_t>(), o.invstd.data_ptr<acc_t>(), g, outs, pp, ps, o.prefix_channels);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (g.mean_group >= 0) {
      RECORD_FUNCTION("kernel::channel_mean", std::vector<c10::IValue>());
      channel_mean_kernel<scalar_t, acc_t><<<node_blocks(B * n), kThreads, 0, stream>>>(
          y.data_ptr<scalar_t>(), strides_of(y), B, n, weight.data_ptr<acc_t>(), bias.data_ptr<acc_t>(),
          o.mean.data_ptr<acc_t>(), o.invstd.data_ptr<acc_t>(), g.start[g.mean_group], g.start[g.mean_group + 1],
          o.chmean.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {o.outs, o.mean, o.invstd, o.chmean};
}

std::tuple<Tensor, Tensor> bn_stats_cuda(const Tensor& y, const OptTensor& running_mean, const OptTensor& running_var,
                                         at::TensorList counters, bool batch_stats, double momentum, double eps) {
  check_3d(y, "y");
  check_counters(counters, y);
  Counters cnt{};
  cnt.num = static_cast<int>(counters.size());
  for (int i = 0; i < cnt.num; ++i) cnt.ptr[i] = counters[i].data_ptr<int64_t>();
  const int64_t B = y.size(0), K = y.size(1), n = y.size(2);
  const auto acc = acc_type_of(y.scalar_type());
  check_running(running_mean, running_var, batch_stats, K, acc);
  const c10::cuda::CUDAGuard guard(y.device());
  Tensor mean = at::empty({K}, y.options().dtype(acc));
  Tensor invstd = at::empty({K}, y.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RECORD_FUNCTION("kernel::bn_stats", std::vector<c10::IValue>());
    bn_stats_kernel<scalar_t, acc_t><<<K, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        y.data_ptr<scalar_t>(), strides_of(y), B, n, opt_ptr<acc_t>(running_mean), opt_ptr<acc_t>(running_var),
        batch_stats, momentum, eps, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), cnt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, invstd};
}

std::tuple<Tensor, Tensor, Tensor> bn_act_bwd_cuda(at::TensorList grad_outs, const Tensor& y, const Tensor& weight,
                                                   const Tensor& bias, const Tensor& mean, const Tensor& invstd,
                                                   bool batch_stats, const OptTensor& grad_chmean, int64_t mean_group,
                                                   at::IntArrayRef groups) {
  const int64_t B = y.size(0), K = y.size(1), n = y.size(2);
  const Groups g = make_groups(groups.vec(), mean_group, K);
  const std::vector<int> source = check_bn_act_bwd(grad_outs, y, weight, bias, mean, invstd, grad_chmean, g);
  const c10::cuda::CUDAGuard guard(y.device());
  Tensor grad_y = at::empty_like(y);  // y's layout
  Tensor grad_w = at::empty({K}, weight.options());
  Tensor grad_b = at::empty({K}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GradSources<scalar_t, acc_t> src{};
    for (int i = 0; i < g.num; ++i) {
      src.ptr[i] = nullptr;
      src.s[i] = Strides3{0, 0, 0};
      src.scale[i] = acc_t(1);
      src.channel_mean[i] = false;
      if (i == g.mean_group && grad_chmean.has_value()) {
        src.ptr[i] = grad_chmean->data_ptr<scalar_t>();
        src.s[i] = strides_of(*grad_chmean);
        src.scale[i] = acc_t(1) / acc_t(g.start[i + 1] - g.start[i]);
        src.channel_mean[i] = true;
      } else if (source[i] >= 0) {
        src.ptr[i] = grad_outs[source[i]].data_ptr<scalar_t>();
        src.s[i] = strides_of(grad_outs[source[i]]);
      }
    }
    RECORD_FUNCTION("kernel::bn_act_bwd", std::vector<c10::IValue>());
    bn_act_bwd_kernel<scalar_t, acc_t><<<K, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        y.data_ptr<scalar_t>(), strides_of(y), B, K, n, weight.data_ptr<acc_t>(), bias.data_ptr<acc_t>(),
        mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), batch_stats, g, src, grad_y.data_ptr<scalar_t>(),
        strides_of(grad_y), grad_w.data_ptr<acc_t>(), grad_b.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_y, grad_w, grad_b};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gate_fwd_cuda(
    const Tensor& h, const Tensor& h_weight, const Tensor& h_bias, const Tensor& h_mean, const Tensor& h_invstd,
    const Tensor& w2, const Tensor& l_weight, const Tensor& l_bias, const OptTensor& l_running_mean,
    const OptTensor& l_running_var, bool batch_stats, double momentum, double eps) {
  check_gate_fwd(h, h_weight, h_bias, h_mean, h_invstd, w2, l_weight, l_bias, l_running_mean, l_running_var,
                 batch_stats);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t B = h.size(0), Kh = h.size(1), n = h.size(2);
  const auto acc = acc_type_of(h.scalar_type());
  Tensor a = at::empty({B, 1, n}, h.options());
  Tensor l = at::empty({B, 1, n}, h.options());
  Tensor l_mean = at::empty({1}, h.options().dtype(acc));
  Tensor l_invstd = at::empty({1}, h.options().dtype(acc));
  // no nodes: the single block (a grid of none is not a launch)
  const bool split = B * n > 0 && (!batch_stats || B * n * Kh >= kGateSplitWork);
  // the logits in acc_t for gate_norm (l itself when h is acc_t)
  Tensor lacc = !batch_stats || !split || h.scalar_type() == acc ? l : at::empty({B, 1, n}, h.options().dtype(acc));
  const int64_t P = (B * n + kGateChunk - 1) / kGateChunk;
  Tensor part = split && batch_stats ? at::empty({3 * P}, h.options().dtype(acc)) : l_mean;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gate_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    if (!split) {
      RECORD_FUNCTION("kernel::gate_fwd", std::vector<c10::IValue>());
      gate_fwd_kernel<scalar_t, acc_t><<<1, kGateThreads, 0, stream>>>(
          h.data_ptr<scalar_t>(), strides_of(h), B, Kh, n, h_weight.data_ptr<acc_t>(), h_bias.data_ptr<acc_t>(),
          h_mean.data_ptr<acc_t>(), h_invstd.data_ptr<acc_t>(), w2.data_ptr<acc_t>(), l_weight.data_ptr<acc_t>(),
          l_bias.data_ptr<acc_t>(), opt_ptr<acc_t>(l_running_mean), opt_ptr<acc_t>(l_running_var), batch_stats,
          momentum, eps, a.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), l_mean.data_ptr<acc_t>(),
          l_invstd.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    acc_t* lacc_ptr = batch_stats ? lacc.data_ptr<acc_t>() : nullptr;
    {
      RECORD_FUNCTION("kernel::gate_logits", std::vector<c10::IValue>());
      gate_logits_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(P), kThreads, 0, stream>>>(
          h.data_ptr<scalar_t>(), strides_of(h), B, Kh, n, h_weight.data_ptr<acc_t>(), h_bias.data_ptr<acc_t>(),
          h_mean.data_ptr<acc_t>(), h_invstd.data_ptr<acc_t>(), w2.data_ptr<acc_t>(), l_weight.data_ptr<acc_t>(),
          l_bias.data_ptr<acc_t>(), opt_ptr<acc_t>(l_running_mean), opt_ptr<acc_t>(l_running_var), batch_stats, eps,
          a.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), lacc_ptr, part.data_ptr<acc_t>(), l_mean.data_ptr<acc_t>(),
          l_invstd.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (batch_stats) {
      RECORD_FUNCTION("kernel::gate_norm", std::vector<c10::IValue>());
      const int64_t blocks = std::min<int64_t>((B * n + 4 * kThreads - 1) / (4 * kThreads), 1024);
      gate_norm_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
          part.data_ptr<acc_t>(), P, lacc_ptr, B * n, l_weight.data_ptr<acc_t>(), l_bias.data_ptr<acc_t>(),
          opt_ptr<acc_t>(l_running_mean), opt_ptr<acc_t>(l_running_var), momentum, eps, a.data_ptr<scalar_t>(),
          l_mean.data_ptr<acc_t>(), l_invstd.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {a, l, l_mean, l_invstd};
}

std::tuple<Tensor, Tensor> gate_bwd_cuda(const Tensor& grad_out, const Tensor& target, const Tensor& a) {
  check_gate_bwd(grad_out, target, a);
  const c10::cuda::CUDAGuard guard(target.device());
  const int64_t B = target.size(0), D = target.size(1), n = target.size(2);
  Tensor grad_target = at::empty_like(target);  // keeps target's strides
  Tensor grad_s = at::empty({B, 1, n}, a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target.scalar_type(), "gate_bwd_cuda", [&] {
    using tgt_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "gate_bwd_cuda_a", [&] {
      using gate_t = scalar_t;
      RECORD_FUNCTION("kernel::gate_bwd", std::vector<c10::IValue>());
      gate_bwd_kernel<tgt_t, gate_t, at::opmath_type<tgt_t>>
          <<<node_blocks(B * n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              grad_out.data_ptr<tgt_t>(), strides_of(grad_out), target.data_ptr<tgt_t>(), strides_of(target),
              a.data_ptr<gate_t>(), strides_of(a), B, D, n, grad_target.data_ptr<tgt_t>(), strides_of(grad_target),
              grad_s.data_ptr<gate_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_target, grad_s};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> head_bwd_cuda(
    const Tensor& grad_s, const Tensor& l, const Tensor& l_weight, const Tensor& l_mean, const Tensor& l_invstd,
    const Tensor& h, const Tensor& h_weight, const Tensor& h_bias, const Tensor& h_mean, const Tensor& h_invstd,
    const Tensor& w2, bool batch_stats) {
  check_head_bwd(grad_s, l, l_weight, l_mean, l_invstd, h, h_weight, h_bias, h_mean, h_invstd, w2);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t B = h.size(0), Kh = h.size(1), n = h.size(2);
  Tensor grad_h = at::empty_like(h);  // h's layout
  Tensor grad_w2 = at::empty({Kh}, h_weight.options());
  Tensor grad_hw = at::empty({Kh}, h_weight.options());
  Tensor grad_hb = at::empty({Kh}, h_weight.options());
  Tensor grad_lw = at::empty({1}, h_weight.options());
  Tensor grad_lb = at::empty({1}, h_weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "head_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RECORD_FUNCTION("kernel::head_bwd", std::vector<c10::IValue>());
    head_bwd_kernel<scalar_t, acc_t><<<Kh, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad_s.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), l_weight.data_ptr<acc_t>(), l_mean.data_ptr<acc_t>(),
        l_invstd.data_ptr<acc_t>(), h.data_ptr<scalar_t>(), strides_of(h), B, Kh, n, h_weight.data_ptr<acc_t>(),
        h_bias.data_ptr<acc_t>(), h_mean.data_ptr<acc_t>(), h_invstd.data_ptr<acc_t>(), w2.data_ptr<acc_t>(),
        batch_stats, grad_h.data_ptr<scalar_t>(), strides_of(grad_h), grad_w2.data_ptr<acc_t>(), grad_hw.data_ptr<acc_t>(),
        grad_hb.data_ptr<acc_t>(), grad_lw.data_ptr<acc_t>(), grad_lb.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_h, grad_w2, grad_hw, grad_hb, grad_lw, grad_lb};
}

Tensor gate_apply_cuda(const Tensor& target, const Tensor& a) {
  check_gate_apply(target, a);
  const c10::cuda::CUDAGuard guard(target.device());
  const int64_t B = target.size(0), D = target.size(1), n = target.size(2);
  Tensor out = at::empty_like(target);  // target's layout and dtype
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target.scalar_type(), "gate_apply_cuda", [&] {
    using tgt_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "gate_apply_cuda_a", [&] {
      RECORD_FUNCTION("kernel::gate_apply", std::vector<c10::IValue>());
      gate_apply_kernel<tgt_t, scalar_t, at::opmath_type<tgt_t>>
          <<<node_blocks(B * D * n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              target.data_ptr<tgt_t>(), strides_of(target), a.data_ptr<scalar_t>(), strides_of(a), B, D, n,
              out.data_ptr<tgt_t>(), strides_of(out));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace
}  // namespace branch
}  // namespace rga_kernels

TORCH_LIBRARY_IMPL(rga_kernels, CUDA, m) {
  using namespace rga_kernels::branch;
  m.impl("bn_act_fwd", &bn_act_fwd_cuda);
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_act_bwd", &bn_act_bwd_cuda);
  m.impl("gate_fwd", &gate_fwd_cuda);
  m.impl("gate_bwd", &gate_bwd_cuda);
  m.impl("head_bwd", &head_bwd_cuda);
  m.impl("gate_apply", &gate_apply_cuda);
}
