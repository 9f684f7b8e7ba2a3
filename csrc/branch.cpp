// The fused branch's hand-written kernels: op schemas and the CPU implementations.
//
// Each op is one or two kernels; every kernel runs inside one `kernel::NAME` profiler scope
// (RECORD_FUNCTION), the same names and the same number of scopes as the CUDA launches in
// branch_cuda.cu, so rga_kernels.launches counts the CPU path exactly as the GPU one. The
// arithmetic is branch.h's, shared with the CUDA kernels. Work is split over channels (or batch
// entries) with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "branch_ops.h"

namespace rga_kernels {
namespace branch {
namespace {

// The CPU kernels walk (B, K, n) tensors row by row, a row being the n nodes of one (b, k), with
// the nodes contiguous (stride 1) so that the inner loops vectorize. An input in another layout
// (the channel branch's transposed views, channels-last buffers) is first copied to that layout,
// and an output that must keep another layout is written to a row-major buffer and copied back:
// on the CPU a copy is cheap next to strided inner loops; the CUDA kernels read any layout.
Tensor rows_major(const Tensor& t) { return t.dim() != 3 || t.stride(2) == 1 ? t : t.contiguous(); }

struct OutBuf {
  Tensor result;  // what the op returns (the requested layout)
  Tensor rows;    // what the kernel writes (nodes contiguous)
  explicit OutBuf(Tensor r) : result(std::move(r)) {
    rows = result.dim() != 3 || result.stride(2) == 1 ? result : at::empty(result.sizes(), result.options());
  }
  void finish() {
    if (!rows.is_same(result)) result.copy_(rows);
  }
};

// Sums over a row. The compiler may not reorder a float sum on its own, so the loops carry
// `omp simd` reductions (built with -fopenmp-simd: the pragma only, no OpenMP runtime), which lets
// it keep one partial sum per vector lane. f(i) -> value, or f(i, a, b) adding to two sums. The
// lambdas capture by value: a variable whose address escapes into a lambda may alias every
// later float store, which keeps the loops after it scalar.
template <typename acc_t, typename F>
acc_t row_sum(int64_t n, F f) {
  acc_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += f(i);
  return total;
}

template <typename acc_t, typename F>
void row_sum2(int64_t n, acc_t& sum_a, acc_t& sum_b, F f) {
  acc_t ta = 0, tb = 0;
#pragma omp simd reduction(+ : ta, tb)
  for (int64_t i = 0; i < n; ++i) f(i, ta, tb);
  sum_a += ta;
  sum_b += tb;
}

template <typename T>
T* row_ptr(T* base, const Tensor& t, int64_t b, int64_t k) {
  return base + b * t.stride(0) + k * t.stride(1);
}

// Statistics of channel k over (B, n): per row, a two-pass shifted mean and sum of squared
// deviations (the row is in cache for the second pass); rows merged with branch.h's welford_merge.
template <typename scalar_t, typename acc_t>
Welford<acc_t> channel_welford(const scalar_t* y, const Tensor& yt, int64_t k, int64_t B, int64_t n) {
  Welford<acc_t> w = welford_init<acc_t>();
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* r = row_ptr(y, yt, b, k);
    const acc_t shift = static_cast<acc_t>(r[0]);  // sums of x - shift: no loss for values far from 0
    const acc_t sum = row_sum<acc_t>(n, [=](int64_t i) { return static_cast<acc_t>(r[i]) - shift; });
    const acc_t mean = shift + sum / static_cast<acc_t>(n);
    const acc_t m2 = row_sum<acc_t>(n, [=](int64_t i) {
      const acc_t d = static_cast<acc_t>(r[i]) - mean;
      return d * d;
    });
    w = welford_merge(w, Welford<acc_t>{mean, m2, static_cast<acc_t>(n)});
  }
  return w;
}

// Statistics of channel k (batch or running) and the running update; returns (mean, invstd).
template <typename scalar_t, typename acc_t>
void channel_stats(const scalar_t* y, const Tensor& yt, int64_t k, int64_t B, int64_t n, bool batch_stats,
                   acc_t* rm, acc_t* rv, double momentum, double eps, acc_t& mean, acc_t& invstd) {
  if (batch_stats) {
    const Welford<acc_t> w = channel_welford<scalar_t, acc_t>(y, yt, k, B, n);
    mean = w.mean;
    invstd = invstd_of(w, eps);
    if (rm != nullptr) running_update(rm + k, rv + k, w, momentum);
  } else {
    mean = rm[k];
    invstd = invstd_of_running(rv[k], eps);
  }
}

template <typename acc_t>
acc_t* opt_ptr(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<acc_t>() : nullptr;
}

std::tuple<std::vector<Tensor>, Tensor, Tensor, Tensor> bn_act_fwd_cpu(
    const Tensor& y_in, const Tensor& weight, const Tensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool batch_stats, double momentum, double eps, at::IntArrayRef groups,
    int64_t mean_group, const OptTensor& prefix, bool channels_last) {
  const Groups g = check_bn_act_fwd(y_in, weight, bias, running_mean, running_var, batch_stats, groups, mean_group);
  const int64_t B = y_in.size(0), K = y_in.size(1), n = y_in.size(2);
  BnActOutputs o = alloc_bn_act(y_in, g, prefix, channels_last);
  std::vector<OutBuf> outs;
  for (const auto& t : o.outs) outs.emplace_back(t);
  Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_in.scalar_type(), "bn_act_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = nullptr;
    acc_t* mean = o.mean.data_ptr<acc_t>();
    acc_t* invstd = o.invstd.data_ptr<acc_t>();
    const acc_t* wp = weight.data_ptr<acc_t>();
    const acc_t* bp = bias.data_ptr<acc_t>();
    acc_t* rm = opt_ptr<acc_t>(running_mean);
    acc_t* rv = opt_ptr<acc_t>(running_var);
    const int64_t P = o.prefix_channels;
    {
      RECORD_FUNCTION("kernel::bn_act_fwd", std::vector<c10::IValue>());
      y = rows_major(y_in);  // (inside the kernel's scope: part of this one launch)
      yp = y.data_ptr<scalar_t>();
      at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          acc_t m, is, scale, shift;
          channel_stats<scalar_t, acc_t>(yp, y, k, B, n, batch_stats, rm, rv, momentum, eps, m, is);
          mean[k] = m;
          invstd[k] = is;
          const int gi = group_of(g, k);
          if (gi == g.mean_group) continue;  // only its channel mean is wanted (kernel::channel_mean)
          bn_affine(wp[k], bp[k], m, is, scale, shift);
          const Tensor& out = outs[gi].rows;
          scalar_t* op = out.data_ptr<scalar_t>();
          for (int64_t b = 0; b < B; ++b) {
            const scalar_t* r = row_ptr(yp, y, b, k);
            scalar_t* w = row_ptr(op, out, b, P + k - g.start[gi]);
            for (int64_t i = 0; i < n; ++i) w[i] = static_cast<scalar_t>(relu(scale * static_cast<acc_t>(r[i]) + shift));
          }
        }
      });
      if (P > 0) {  // the prefix channels ahead of the single group's
        const Tensor pre = rows_major(*prefix);
        const scalar_t* pp = pre.data_ptr<scalar_t>();
        const Tensor& out = outs[0].rows;
        scalar_t* op = out.data_ptr<scalar_t>();
        for (int64_t b = 0; b < B; ++b)
          for (int64_t c = 0; c < P; ++c) std::copy_n(row_ptr(pp, pre, b, c), n, row_ptr(op, out, b, c));
      }
      for (auto& out : outs) out.finish();
    }
    if (g.mean_group >= 0) {
      RECORD_FUNCTION("kernel::channel_mean", std::vector<c10::IValue>());
      const int64_t c0 = g.start[g.mean_group], c1 = g.start[g.mean_group + 1];
      scalar_t* cm = o.chmean.data_ptr<scalar_t>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> sum(n);
        for (int64_t b = b0; b < b1; ++b) {
          std::fill(sum.begin(), sum.end(), acc_t(0));
          for (int64_t k = c0; k < c1; ++k) {
            acc_t scale, shift;
            bn_affine(wp[k], bp[k], mean[k], invstd[k], scale, shift);
            const scalar_t* r = row_ptr(yp, y, b, k);
            for (int64_t i = 0; i < n; ++i) sum[i] += relu(scale * static_cast<acc_t>(r[i]) + shift);
          }
          for (int64_t i = 0; i < n; ++i) cm[b * n + i] = static_cast<scalar_t>(sum[i] / acc_t(c1 - c0));
        }
      });
    }
  });
  return {o.outs, o.mean, o.invstd, o.chmean};
}

std::tuple<Tensor, Tensor> bn_stats_cpu(const Tensor& y_in, const OptTensor& running_mean,
                                        const OptTensor& running_var, at::TensorList counters, bool batch_stats,
                                        double momentum, double eps) {
  check_counters(counters, y_in);
  check_3d(y_in, "y");
  const int64_t B = y_in.size(0), K = y_in.size(1), n = y_in.size(2);
  const auto acc = acc_type_of(y_in.scalar_type());
  check_running(running_mean, running_var, batch_stats, K, acc);
  Tensor mean = at::empty({K}, y_in.options().dtype(acc));
  Tensor invstd = at::empty({K}, y_in.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_in.scalar_type(), "bn_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    acc_t* rm = opt_ptr<acc_t>(running_mean);
    acc_t* rv = opt_ptr<acc_t>(running_var);
    RECORD_FUNCTION("kernel::bn_stats", std::vector<c10::IValue>());
    const Tensor y = rows_major(y_in);
    const scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        channel_stats<scalar_t, acc_t>(yp, y, k, B, n, batch_stats, rm, rv, momentum, eps, mp[k], ip[k]);
    });
    for (const auto& c : counters) c.data_ptr<int64_t>()[0] += 1;
  });
  return {mean, invstd};
}

// The row loops of bn_act_bwd, apart from the dispatch macro (a loop inside a lambda inside the
// macro, next to tensor calls that may throw, stays scalar): plain pointers, `omp simd`.
// Sums over one row of channel k: of the incoming gradient through the ReLU's mask (a select:
// branch-free) and of that times the normalised input.
template <typename scalar_t, typename acc_t>
inline void relu_bn_grad_sums(const scalar_t* __restrict r, const scalar_t* __restrict gr, int64_t n, acc_t gscale,
                              acc_t scale, acc_t shift, acc_t m, acc_t is, acc_t& sum_g, acc_t& sum_gx) {
  acc_t sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t yv = static_cast<acc_t>(r[i]);
    const acc_t gin = gscale * static_cast<acc_t>(gr[i]);
    const acc_t gv = scale * yv + shift > acc_t(0) ? gin : acc_t(0);
    sg += gv;
    sgx += gv * ((yv - m) * is);
  }
  sum_g += sg;
  sum_gx += sgx;
}

// One row of grad_y = ga * mask * g + gyc * y + gc (gr == nullptr: no incoming gradient).
template <typename scalar_t, typename acc_t>
inline void relu_bn_grad_row(const scalar_t* __restrict r, const scalar_t* __restrict gr, scalar_t* __restrict out,
                             int64_t n, acc_t ga, acc_t scale, acc_t shift, acc_t gyc, acc_t gc) {
  if (gr == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(gyc * static_cast<acc_t>(r[i]) + gc);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t yv = static_cast<acc_t>(r[i]);
    const acc_t gin = ga * static_cast<acc_t>(gr[i]);  // loaded unconditionally: a select, no branch
    out[i] = static_cast<scalar_t>((scale * yv + shift > acc_t(0) ? gin : acc_t(0)) + gyc * yv + gc);
  }
}

std::tuple<Tensor, Tensor, Tensor> bn_act_bwd_cpu(at::TensorList grad_outs, const Tensor& y_in, const Tensor& weight,
                                                  const Tensor& bias, const Tensor& mean, const Tensor& invstd,
                                                  bool batch_stats, const OptTensor& grad_chmean, int64_t mean_group,
                                                  at::IntArrayRef groups) {
  const int64_t B = y_in.size(0), K = y_in.size(1), n = y_in.size(2);
  const Groups g = make_groups(groups.vec(), mean_group, K);
  const std::vector<int> source = check_bn_act_bwd(grad_outs, y_in, weight, bias, mean, invstd, grad_chmean, g);
  OutBuf grad_y(at::empty_like(y_in));  // y's layout (a transposed E gives a transposed gradient)
  Tensor grad_w = at::empty({K}, weight.options());
  Tensor grad_b = at::empty({K}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_in.scalar_type(), "bn_act_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RECORD_FUNCTION("kernel::bn_act_bwd", std::vector<c10::IValue>());
    const Tensor y = rows_major(y_in);
    std::vector<Tensor> grads;
    for (const auto& t : grad_outs) grads.push_back(rows_major(t));
    const Tensor gcm = grad_chmean.has_value() ? rows_major(*grad_chmean) : Tensor();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const acc_t *wp = weight.data_ptr<acc_t>(), *bp = bias.data_ptr<acc_t>();
    const acc_t *mp = mean.data_ptr<acc_t>(), *ip = invstd.data_ptr<acc_t>();
    const Tensor& gy = grad_y.rows;
    scalar_t* gyp = gy.data_ptr<scalar_t>();
    acc_t *gw = grad_w.data_ptr<acc_t>(), *gb = grad_b.data_ptr<acc_t>();
    const acc_t N = static_cast<acc_t>(B * n);
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int gi = group_of(g, k);
        // where channel k's incoming gradient is: a row of grads[..] or of the channel-mean gradient
        const Tensor* src = nullptr;
        int64_t src_k = 0;
        acc_t src_scale = 1;
        if (gi == g.mean_group && gcm.defined()) {
          src = &gcm;
          src_scale = acc_t(1) / acc_t(g.start[gi + 1] - g.start[gi]);
        } else if (source[gi] >= 0) {
          src = &grads[source[gi]];
          src_k = k - g.start[gi];
        }
        const scalar_t* sp = src != nullptr ? src->data_ptr<scalar_t>() : nullptr;
        const acc_t m = mp[k], is = ip[k];
        acc_t scale, shift;  // the ReLU's mask: scale * y + shift > 0
        bn_affine(wp[k], bp[k], m, is, scale, shift);
        acc_t sum_g = 0, sum_gx = 0;
        if (sp != nullptr) {
          for (int64_t b = 0; b < B; ++b)
            relu_bn_grad_sums(row_ptr(yp, y, b, k), row_ptr(sp, *src, b, src_k), n, src_scale, scale, shift, m, is,
                              sum_g, sum_gx);
        }
        gb[k] = sum_g;
        gw[k] = sum_gx;
        acc_t ga, gyc, gc;  // grad_y = ga * g + gyc * y + gc
        bn_backward_coeffs(wp[k], m, is, sum_g / N, sum_gx / N, batch_stats, ga, gyc, gc);
        const acc_t sga = src_scale * ga;
        for (int64_t b = 0; b < B; ++b)
          relu_bn_grad_row(row_ptr(yp, y, b, k), sp != nullptr ? row_ptr(sp, *src, b, src_k) : nullptr,
                           row_ptr(gyp, gy, b, k), n, sga, scale, shift, gyc, gc);
      }
    });
    grad_y.finish();
  });
  return {grad_y.result, grad_w, grad_b};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gate_fwd_cpu(
    const Tensor& h_in, const Tensor& h_weight, const Tensor& h_bias, const Tensor& h_mean, const Tensor& h_invstd,
    const Tensor& w2, const Tensor& l_weight, const Tensor& l_bias, const OptTensor& l_running_mean,
    const OptTensor& l_running_var, bool batch_stats, double momentum, double eps) {
  check_gate_fwd(h_in, h_weight, h_bias, h_mean, h_invstd, w2, l_weight, l_bias, l_running_mean, l_running_var,
                 batch_stats);
  const int64_t B = h_in.size(0), Kh = h_in.size(1), n = h_in.size(2);
  const auto acc = acc_type_of(h_in.scalar_type());
  Tensor a = at::empty({B, 1, n}, h_in.options());
  Tensor l = at::empty({B, 1, n}, h_in.options());
  Tensor l_mean = at::empty({1}, h_in.options().dtype(acc));
  Tensor l_invstd = at::empty({1}, h_in.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_in.scalar_type(), "gate_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RECORD_FUNCTION("kernel::gate_fwd", std::vector<c10::IValue>());
    const Tensor h = rows_major(h_in);
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const acc_t *hw = h_weight.data_ptr<acc_t>(), *hb = h_bias.data_ptr<acc_t>();
    const acc_t *hm = h_mean.data_ptr<acc_t>(), *hi = h_invstd.data_ptr<acc_t>();
    const acc_t* wp2 = w2.data_ptr<acc_t>();
    scalar_t *ap = a.data_ptr<scalar_t>(), *lp = l.data_ptr<scalar_t>();
    // the logit l = w2 . ReLU(BN_h(h)), row by row
    std::vector<acc_t> lacc(B * n, acc_t(0));
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* lr = lacc.data() + b * n;
        for (int64_t k = 0; k < Kh; ++k) {
          acc_t scale, shift;
          bn_affine(hw[k], hb[k], hm[k], hi[k], scale, shift);
          const scalar_t* r = row_ptr(hp, h, b, k);
          const acc_t wk = wp2[k];
          for (int64_t i = 0; i < n; ++i) lr[i] += wk * relu(scale * static_cast<acc_t>(r[i]) + shift);
        }
        for (int64_t i = 0; i < n; ++i) lp[b * n + i] = static_cast<scalar_t>(lr[i]);
      }
    });
    // its BatchNorm (one channel): statistics per row, merged
    acc_t m, is;
    acc_t* rm = opt_ptr<acc_t>(l_running_mean);
    acc_t* rv = opt_ptr<acc_t>(l_running_var);
    if (batch_stats) {
      Welford<acc_t> w = welford_init<acc_t>();
      for (int64_t b = 0; b < B; ++b) {
        const acc_t* lr = lacc.data() + b * n;
        acc_t sum = 0, m2 = 0;
        for (int64_t i = 0; i < n; ++i) sum += lr[i] - lr[0];
        const acc_t rmean = lr[0] + sum / static_cast<acc_t>(n);
        for (int64_t i = 0; i < n; ++i) m2 += (lr[i] - rmean) * (lr[i] - rmean);
        w = welford_merge(w, Welford<acc_t>{rmean, m2, static_cast<acc_t>(n)});
      }
      m = w.mean;
      is = invstd_of(w, eps);
      if (rm != nullptr) running_update(rm, rv, w, momentum);
    } else {
      m = rm[0];
      is = invstd_of_running(rv[0], eps);
    }
    l_mean.data_ptr<acc_t>()[0] = m;
    l_invstd.data_ptr<acc_t>()[0] = is;
    acc_t scale, shift;
    bn_affine(l_weight.data_ptr<acc_t>()[0], l_bias.data_ptr<acc_t>()[0], m, is, scale, shift);
    for (int64_t e = 0; e < B * n; ++e) ap[e] = static_cast<scalar_t>(sigmoid(scale * lacc[e] + shift));
  });
  return {a, l, l_mean, l_invstd};
}

std::tuple<Tensor, Tensor> gate_bwd_cpu(const Tensor& grad_out_in, const Tensor& target_in, const Tensor& a_in) {
  check_gate_bwd(grad_out_in, target_in, a_in);
  const int64_t B = target_in.size(0), D = target_in.size(1), n = target_in.size(2);
  OutBuf grad_target(at::empty_like(target_in));  // keeps target's layout (the channel branch's transposed view)
  Tensor grad_s = at::empty({B, 1, n}, a_in.options());
  // (two dtypes: target's and the gate's, which differ under autocast)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_in.scalar_type(), "gate_bwd", [&] {
    using tgt_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a_in.scalar_type(), "gate_bwd_a", [&] {
      using gate_t = scalar_t;
      using acc_t = at::opmath_type<tgt_t>;
      RECORD_FUNCTION("kernel::gate_bwd", std::vector<c10::IValue>());
      const Tensor target = rows_major(target_in), grad_out = rows_major(grad_out_in), a = a_in.contiguous();
      const tgt_t* tp = target.data_ptr<tgt_t>();
      const tgt_t* gp = grad_out.data_ptr<tgt_t>();
      const gate_t* ap = a.data_ptr<gate_t>();
      const Tensor& gt = grad_target.rows;
      tgt_t* op = gt.data_ptr<tgt_t>();
      gate_t* sp = grad_s.data_ptr<gate_t>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> sum(n), av(n);
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t i = 0; i < n; ++i) {
            sum[i] = 0;
            av[i] = static_cast<acc_t>(ap[b * n + i]);
          }
          for (int64_t d = 0; d < D; ++d) {
            const tgt_t* t = row_ptr(tp, target, b, d);
            const tgt_t* g = row_ptr(gp, grad_out, b, d);
            tgt_t* o = row_ptr(op, gt, b, d);
            for (int64_t i = 0; i < n; ++i) {
              const acc_t go = static_cast<acc_t>(g[i]);
              sum[i] += go * static_cast<acc_t>(t[i]);
              o[i] = static_cast<tgt_t>(go * av[i]);
            }
          }
          for (int64_t i = 0; i < n; ++i) sp[b * n + i] = static_cast<gate_t>(sigmoid_backward(sum[i], av[i]));
        }
      });
      grad_target.finish();
    });
  });
  return {grad_target.result, grad_s};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> head_bwd_cpu(
    const Tensor& grad_s, const Tensor& l, const Tensor& l_weight, const Tensor& l_mean, const Tensor& l_invstd,
    const Tensor& h_in, const Tensor& h_weight, const Tensor& h_bias, const Tensor& h_mean, const Tensor& h_invstd,
    const Tensor& w2, bool batch_stats) {
  check_head_bwd(grad_s, l, l_weight, l_mean, l_invstd, h_in, h_weight, h_bias, h_mean, h_invstd, w2);
  const int64_t B = h_in.size(0), Kh = h_in.size(1), n = h_in.size(2);
  OutBuf grad_h(at::empty_like(h_in));  // h's layout
  Tensor grad_w2 = at::empty({Kh}, h_weight.options());
  Tensor grad_hw = at::empty({Kh}, h_weight.options());
  Tensor grad_hb = at::empty({Kh}, h_weight.options());
  Tensor grad_lw = at::empty({1}, h_weight.options());
  Tensor grad_lb = at::empty({1}, h_weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_in.scalar_type(), "head_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RECORD_FUNCTION("kernel::head_bwd", std::vector<c10::IValue>());
    const Tensor h = rows_major(h_in);
    const scalar_t *hp = h.data_ptr<scalar_t>(), *lp = l.data_ptr<scalar_t>(), *gsp = grad_s.data_ptr<scalar_t>();
    const acc_t *hw = h_weight.data_ptr<acc_t>(), *hb = h_bias.data_ptr<acc_t>();
    const acc_t *hm = h_mean.data_ptr<acc_t>(), *hi = h_invstd.data_ptr<acc_t>(), *wp2 = w2.data_ptr<acc_t>();
    const acc_t lm = l_mean.data_ptr<acc_t>()[0], li = l_invstd.data_ptr<acc_t>()[0];
    const acc_t lw = l_weight.data_ptr<acc_t>()[0];
    const int64_t NN = B * n;
    const acc_t N = static_cast<acc_t>(NN);
    // the logit's BN (one channel): its sums, then dl per node
    acc_t sum_g = 0, sum_gx = 0;
    for (int64_t e = 0; e < NN; ++e) {
      const acc_t gv = static_cast<acc_t>(gsp[e]);
      sum_g += gv;
      sum_gx += gv * (static_cast<acc_t>(lp[e]) - lm) * li;
    }
    grad_lb.data_ptr<acc_t>()[0] = sum_g;
    grad_lw.data_ptr<acc_t>()[0] = sum_gx;
    std::vector<acc_t> dl(NN);
    for (int64_t e = 0; e < NN; ++e)
      dl[e] = bn_backward(static_cast<acc_t>(gsp[e]), (static_cast<acc_t>(lp[e]) - lm) * li, lw * li, sum_g / N,
                          sum_gx / N, batch_stats);
    const Tensor& gh = grad_h.rows;
    scalar_t* ghp = gh.data_ptr<scalar_t>();
    // per hidden channel: dW2, then BN_h's backward through the ReLU
    at::parallel_for(0, Kh, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        acc_t scale, shift;
        bn_affine(hw[k], hb[k], hm[k], hi[k], scale, shift);
        const acc_t m = hm[k], is = hi[k], wk = wp2[k];
        acc_t sw2 = 0, sg = 0, sgx = 0;
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* r = row_ptr(hp, h, b, k);
          const acc_t* d = dl.data() + b * n;
          sw2 += row_sum<acc_t>(n, [=](int64_t i) { return d[i] * relu(scale * static_cast<acc_t>(r[i]) + shift); });
          row_sum2<acc_t>(n, sg, sgx, [=](int64_t i, acc_t& a, acc_t& c) {
            const acc_t hv = static_cast<acc_t>(r[i]);
            const acc_t v = wk * d[i];
            const acc_t gv = scale * hv + shift > acc_t(0) ? v : acc_t(0);
            a += gv;
            c += gv * (hv - m) * is;
          });
        }
        grad_w2.data_ptr<acc_t>()[k] = sw2;
        grad_hb.data_ptr<acc_t>()[k] = sg;
        grad_hw.data_ptr<acc_t>()[k] = sgx;
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* r = row_ptr(hp, h, b, k);
          const acc_t* d = dl.data() + b * n;
          scalar_t* o = row_ptr(ghp, gh, b, k);
          for (int64_t i = 0; i < n; ++i) {
            const acc_t hv = static_cast<acc_t>(r[i]);
            const acc_t v = wk * d[i];
            const acc_t gv = scale * hv + shift > acc_t(0) ? v : acc_t(0);
            o[i] = static_cast<scalar_t>(bn_backward(gv, (hv - m) * is, scale, sg / N, sgx / N, batch_stats));
          }
        }
      }
    });
    grad_h.finish();
  });
  return {grad_h.result, grad_w2, grad_hw, grad_hb, grad_lw, grad_lb};
}

Tensor gate_apply_cpu(const Tensor& target_in, const Tensor& a_in) {
  check_gate_apply(target_in, a_in);
  const int64_t B = target_in.size(0), D = target_in.size(1), n = target_in.size(2);
  OutBuf out(at::empty_like(target_in));  // target's layout and dtype
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_in.scalar_type(), "gate_apply", [&] {
    using tgt_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a_in.scalar_type(), "gate_apply_a", [&] {
      using acc_t = at::opmath_type<tgt_t>;
      RECORD_FUNCTION("kernel::gate_apply", std::vector<c10::IValue>());
      const Tensor target = rows_major(target_in), a = a_in.contiguous();
      const tgt_t* tp = target.data_ptr<tgt_t>();
      const scalar_t* ap = a.data_ptr<scalar_t>();
      const Tensor& ot = out.rows;
      tgt_t* op = ot.data_ptr<tgt_t>();
      at::parallel_for(0, B * D, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / D, d = r % D;
          const tgt_t* t = row_ptr(tp, target, b, d);
          const scalar_t* av = ap + b * n;
          tgt_t* o = row_ptr(op, ot, b, d);
          for (int64_t i = 0; i < n; ++i)
            o[i] = static_cast<tgt_t>(static_cast<acc_t>(t[i]) * static_cast<acc_t>(av[i]));
        }
      });
      out.finish();
    });
  });
  return out.result;
}

}  // namespace
}  // namespace branch
}  // namespace rga_kernels

TORCH_LIBRARY_FRAGMENT(rga_kernels, m) {
  m.def(
      "bn_act_fwd(Tensor y, Tensor weight, Tensor bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool batch_stats, float momentum, float eps, int[] groups, int mean_group, Tensor? prefix, "
      "bool channels_last=False) -> (Tensor[], Tensor, Tensor, Tensor)");
  m.def(
      "bn_stats(Tensor y, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)[] counters, "
      "bool batch_stats, float momentum, float eps) -> (Tensor, Tensor)");
  m.def("gate_apply(Tensor target, Tensor a) -> Tensor");
  m.def(
      "bn_act_bwd(Tensor[] grad_outs, Tensor y, Tensor weight, Tensor bias, Tensor mean, Tensor invstd, "
      "bool batch_stats, Tensor? grad_chmean, int mean_group, int[] groups) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gate_fwd(Tensor h, Tensor h_weight, Tensor h_bias, Tensor h_mean, Tensor h_invstd, Tensor w2, "
      "Tensor l_weight, Tensor l_bias, Tensor(a!)? l_running_mean, Tensor(b!)? l_running_var, bool batch_stats, "
      "float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gate_bwd(Tensor grad_out, Tensor target, Tensor a) -> (Tensor, Tensor)");
  m.def(
      "head_bwd(Tensor grad_s, Tensor l, Tensor l_weight, Tensor l_mean, Tensor l_invstd, Tensor h, "
      "Tensor h_weight, Tensor h_bias, Tensor h_mean, Tensor h_invstd, Tensor w2, bool batch_stats) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rga_kernels, CPU, m) {
  using namespace rga_kernels::branch;
  m.impl("bn_act_fwd", &bn_act_fwd_cpu);
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_act_bwd", &bn_act_bwd_cpu);
  m.impl("gate_fwd", &gate_fwd_cpu);
  m.impl("gate_bwd", &gate_bwd_cpu);
  m.impl("head_bwd", &head_bwd_cpu);
  m.impl("gate_apply", &gate_apply_cpu);
}
