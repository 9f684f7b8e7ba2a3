// The per-element and per-channel arithmetic of the fused RGA branch's kernels, written once for
// both compilers: the CPU kernels (branch.cpp) and the CUDA kernels (branch_cuda.cu) call these
// functions, so every formula the GPU runs is exercised by the CPU tests.
//
// Semantics (rga_kernels/branch_reference.py is the plain-PyTorch oracle): nn.BatchNorm2d over a
// (B, K, n) tensor, statistics per channel over (B, n); ReLU after it; the gate's sigmoid.
// Statistics accumulate in `acc_t` (float for half/bfloat16/float, double for double) with
// Welford's update and Chan's merge: no E[x^2] - E[x]^2 cancellation.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RGA_HD __host__ __device__ __forceinline__
#else
#define RGA_HD inline
#endif

namespace rga_kernels {
namespace branch {

// A running mean and sum of squared deviations of `count` values.
template <typename acc_t>
struct Welford {
  acc_t mean;
  acc_t m2;
  acc_t count;
};

template <typename acc_t>
RGA_HD Welford<acc_t> welford_init() {
  return Welford<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
}

template <typename acc_t>
RGA_HD void welford_push(Welford<acc_t>& w, acc_t x) {
  w.count += acc_t(1);
  const acc_t delta = x - w.mean;
  w.mean += delta / w.count;
  w.m2 += delta * (x - w.mean);
}

// Chan et al.'s parallel merge of two partial results.
template <typename acc_t>
RGA_HD Welford<acc_t> welford_merge(const Welford<acc_t>& a, const Welford<acc_t>& b) {
  if (b.count == acc_t(0)) return a;
  if (a.count == acc_t(0)) return b;
  const acc_t count = a.count + b.count;
  const acc_t delta = b.mean - a.mean;
  const acc_t wb = b.count / count;
  return Welford<acc_t>{a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb, count};
}

// The biased variance normalises; the unbiased one goes into the running variance.
template <typename acc_t>
RGA_HD acc_t invstd_of(const Welford<acc_t>& w, double eps) {
  const acc_t var = w.count > acc_t(0) ? w.m2 / w.count : acc_t(0);
  return acc_t(1) / std::sqrt(var + acc_t(eps));
}

template <typename acc_t>
RGA_HD void running_update(acc_t* running_mean, acc_t* running_var, const Welford<acc_t>& w,
                           double momentum) {
  const acc_t m = acc_t(momentum);
  const acc_t unbiased = w.count > acc_t(1) ? w.m2 / (w.count - acc_t(1)) : w.m2;
  *running_mean = (acc_t(1) - m) * *running_mean + m * w.mean;
  *running_var = (acc_t(1) - m) * *running_var + m * unbiased;
}

// Eval mode: statistics are the running ones.
template <typename acc_t>
RGA_HD acc_t invstd_of_running(acc_t running_var, double eps) {
  return acc_t(1) / std::sqrt(running_var + acc_t(eps));
}

// BN + ReLU of one value as scale * x + shift, scale = weight * invstd, shift = bias - mean * scale.
template <typename acc_t>
RGA_HD void bn_affine(acc_t weight, acc_t bias, acc_t mean, acc_t invstd, acc_t& scale, acc_t& shift) {
  scale = weight * invstd;
  shift = bias - mean * scale;
}

template <typename acc_t>
RGA_HD acc_t relu(acc_t v) {
  return v > acc_t(0) ? v : acc_t(0);
}

template <typename acc_t>
RGA_HD acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + std::exp(-v));
}

// BN backward of one value, given the channel's sums of the incoming gradient g (after the ReLU
// mask) and of g * xhat over the N = B * n values:
//   batch statistics: dy = weight * invstd * (g - sum_g / N - xhat * sum_gx / N)
//   running statistics: dy = weight * invstd * g
template <typename acc_t>
RGA_HD acc_t bn_backward(acc_t g, acc_t xhat, acc_t weight_invstd, acc_t mean_g, acc_t mean_gx,
                         bool batch_stats) {
  return batch_stats ? weight_invstd * (g - mean_g - xhat * mean_gx) : weight_invstd * g;
}

// The same backward as an affine map of the incoming gradient g and the input y:
//   dy = ga * g + gy * y + gc   (coefficients per channel, from the sums above).
template <typename acc_t>
RGA_HD void bn_backward_coeffs(acc_t weight, acc_t mean, acc_t invstd, acc_t mean_g, acc_t mean_gx,
                               bool batch_stats, acc_t& ga, acc_t& gy, acc_t& gc) {
  ga = weight * invstd;
  if (batch_stats) {
    gy = -ga * invstd * mean_gx;
    gc = -ga * mean_g - gy * mean;
  } else {
    gy = acc_t(0);
    gc = acc_t(0);
  }
}

// The gate's multiply out = target * a through the sigmoid: d(pre-sigmoid) = sum(go * target) * a (1 - a).
template <typename acc_t>
RGA_HD acc_t sigmoid_backward(acc_t grad_a, acc_t a) {
  return grad_a * a * (acc_t(1) - a);
}

// Up to three output groups of bn_act_fwd / input gradients of bn_act_bwd, by channel range.
constexpr int kMaxGroups = 3;

// The CUDA gate_fwd in training splits its work over a grid (two launches) from this many
// multiply-adds per pass (B * n * Kh) up; below it one block does all. The Triton kernels use the
// same number (rga_kernels/_triton_branch_kernels.py: GATE_SPLIT_WORK; a test compares them).
constexpr int64_t kGateSplitWork = int64_t(1) << 18;

struct Groups {
  int64_t start[kMaxGroups + 1];  // channel boundaries; start[num] == K
  int num;
  int mean_group;  // -1: none
};

RGA_HD int group_of(const Groups& g, int64_t channel) {
  int i = 0;
  while (i + 1 < g.num && channel >= g.start[i + 1]) ++i;
  return i;
}

}  // namespace branch
}  // namespace rga_kernels
