// The fused branch's hand-written kernels: op schemas and the CPU implementations.
//
// Each op is one or two kernels; every kernel runs inside one `kernel::NAME` profiler scope
// (RECORD_FUNCTION), the same names and the same number of scopes as the CUDA launches in
// branch_cuda.cu, so rga_kernels.launches counts the CPU path exactly as the GPU one. The
// arithmetic is branch.h's, shared with the CUDA kernels. Work is split over channels (or nodes)
// with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "branch_ops.h"

namespace rga_kernels {
namespace branch {
namespace {

// Element (b, k, i) of a strided (B, K, n) tensor.
struct Strided3 {
  int64_t sb, sk, si;
  explicit Strided3(const Tensor& t) : sb(t.stride(0)), sk(t.stride(1)), si(t.stride(2)) {}
  int64_t at(int64_t b, int64_t k, int64_t i) const { return b * sb + k * sk + i * si; }
};

// Statistics of channel k of y over (B, n): a two-pass mean / sum of squared deviations per chunk
// of kChunk values (in cache for the second pass), chunks merged with branch.h's welford_merge.
constexpr int64_t kChunk = 1024;

template <typename scalar_t, typename acc_t>
Welford<acc_t> channel_welford(const scalar_t* y, const Strided3& s, int64_t k, int64_t B, int64_t n) {
  Welford<acc_t> w = welford_init<acc_t>();
  const int64_t total = B * n;
  for (int64_t e0 = 0; e0 < total; e0 += kChunk) {
    const int64_t e1 = std::min(total, e0 + kChunk);
    acc_t sum = 0;
    for (int64_t e = e0; e < e1; ++e) sum += static_cast<acc_t>(y[s.at(e / n, k, e % n)]);
    const acc_t count = static_cast<acc_t>(e1 - e0);
    const acc_t mean = sum / count;
    acc_t m2 = 0;
    for (int64_t e = e0; e < e1; ++e) {
      const acc_t d = static_cast<acc_t>(y[s.at(e / n, k, e % n)]) - mean;
      m2 += d * d;
    }
    w = welford_merge(w, Welford<acc_t>{mean, m2, count});
  }
  return w;
}

// Statistics of channel k (batch or running) and the running update; returns (mean, invstd).
template <typename scalar_t, typename acc_t>
void channel_stats(const scalar_t* y, const Strided3& s, int64_t k, int64_t B, int64_t n, bool batch_stats,
                   acc_t* rm, acc_t* rv, double momentum, double eps, acc_t& mean, acc_t& invstd) {
  if (batch_stats) {
    const Welford<acc_t> w = channel_welford<scalar_t, acc_t>(y, s, k, B, n);
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
    const Tensor& y, const Tensor& weight, const Tensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool batch_stats, double momentum, double eps, at::IntArrayRef groups,
    int64_t mean_group, const OptTensor& prefix, bool channels_last) {
  const Groups g = check_bn_act_fwd(y, weight, bias, running_mean, running_var, batch_stats, groups, mean_group);
  const int64_t B = y.size(0), K = y.size(1), n = y.size(2);
  BnActOutputs o = alloc_bn_act(y, g, prefix, channels_last);
  const Strided3 s(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* mean = o.mean.data_ptr<acc_t>();
    acc_t* invstd = o.invstd.data_ptr<acc_t>();
    const acc_t* wp = weight.data_ptr<acc_t>();
    const acc_t* bp = bias.data_ptr<acc_t>();
    acc_t* rm = opt_ptr<acc_t>(running_mean);
    acc_t* rv = opt_ptr<acc_t>(running_var);
    const int64_t P = o.prefix_channels;
    {
      RECORD_FUNCTION("kernel::bn_act_fwd", std::vector<c10::IValue>());
      at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          acc_t m, is, scale, shift;
          channel_stats<scalar_t, acc_t>(yp, s, k, B, n, batch_stats, rm, rv, momentum, eps, m, is);
          mean[k] = m;
          invstd[k] = is;
          const int gi = group_of(g, k);
          if (gi == g.mean_group) continue;  // only its channel mean is wanted (kernel::channel_mean)
          bn_affine(wp[k], bp[k], m, is, scale, shift);
          scalar_t* out = o.outs[gi].data_ptr<scalar_t>();
          const Strided3 os(o.outs[gi]);
          const int64_t row = P + k - g.start[gi];
          for (int64_t b = 0; b < B; ++b)
            for (int64_t i = 0; i < n; ++i)
              out[os.at(b, row, i)] =
                  static_cast<scalar_t>(relu(scale * static_cast<acc_t>(yp[s.at(b, k, i)]) + shift));
        }
      });
      if (P > 0) {  // the prefix channels ahead of the single group's
        const scalar_t* pp = prefix->data_ptr<scalar_t>();
        const Strided3 ps(*prefix);
        scalar_t* out = o.outs[0].data_ptr<scalar_t>();
        const Strided3 os(o.outs[0]);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t c = 0; c < P; ++c)
            for (int64_t i = 0; i < n; ++i) out[os.at(b, c, i)] = pp[ps.at(b, c, i)];
      }
    }
    if (g.mean_group >= 0) {
      RECORD_FUNCTION("kernel::channel_mean", std::vector<c10::IValue>());
      const int64_t c0 = g.start[g.mean_group], c1 = g.start[g.mean_group + 1];
      scalar_t* cm = o.chmean.data_ptr<scalar_t>();
      at::parallel_for(0, B * n, 256, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t b = e / n, i = e % n;
          acc_t sum = 0;
          for (int64_t k = c0; k < c1; ++k) {
            acc_t scale, shift;
            bn_affine(wp[k], bp[k], mean[k], invstd[k], scale, shift);
            sum += relu(scale * static_cast<acc_t>(yp[s.at(b, k, i)]) + shift);
          }
          cm[e] = static_cast<scalar_t>(sum / acc_t(c1 - c0));
        }
      });
    }
  });
  return {o.outs, o.mean, o.invstd, o.chmean};
}

std::tuple<Tensor, Tensor> bn_stats_cpu(const Tensor& y, const OptTensor& running_mean,
                                        const OptTensor& running_var, at::TensorList counters, bool batch_stats,
                                        double momentum, double eps) {
  check_counters(counters, y);
  check_3d(y, "y");
  const int64_t B = y.size(0), K = y.size(1), n = y.size(2);
  const auto acc = acc_type_of(y.scalar_type());
  check_running(running_mean, running_var, batch_stats, K, acc);
  Tensor mean = at::empty({K}, y.options().dtype(acc));
  Tensor invstd = at::empty({K}, y.options().dtype(acc));
  const Strided3 s(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    acc_t* rm = opt_ptr<acc_t>(running_mean);
    acc_t* rv = opt_ptr<acc_t>(running_var);
    RECORD_FUNCTION("kernel::bn_stats", std::vector<c10::IValue>());
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        channel_stats<scalar_t, acc_t>(yp, s, k, B, n, batch_stats, rm, rv, momentum, eps, mp[k], ip[k]);
    });
    for (const auto& c : counters) c.data_ptr<int64_t>()[0] += 1;
  });
  return {mean, invstd};
}

std::tuple<Tensor, Tensor, Tensor> bn_act_bwd_cpu(at::TensorList grad_outs, const Tensor& y, const Tensor& weight,
                                                  const Tensor& bias, const Tensor& mean, const Tensor& invstd,
                                                  bool batch_stats, const OptTensor& grad_chmean, int64_t mean_group,
                                                  at::IntArrayRef groups) {
  const int64_t B = y.size(0), K = y.size(1), n = y.size(2);
  const Groups g = make_groups(groups.vec(), mean_group, K);
  const std::vector<int> source = check_bn_act_bwd(grad_outs, y, weight, bias, mean, invstd, grad_chmean, g);
  Tensor grad_y = at::empty_like(y);  // y's layout (a transposed E gives a transposed gradient)
  const Strided3 so(grad_y);
  Tensor grad_w = at::empty({K}, weight.options());
  Tensor grad_b = at::empty({K}, weight.options());
  const Strided3 s(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const acc_t *wp = weight.data_ptr<acc_t>(), *bp = bias.data_ptr<acc_t>();
    const acc_t *mp = mean.data_ptr<acc_t>(), *ip = invstd.data_ptr<acc_t>();
    scalar_t* gy = grad_y.data_ptr<scalar_t>();
    acc_t *gw = grad_w.data_ptr<acc_t>(), *gb = grad_b.data_ptr<acc_t>();
    const acc_t N = static_cast<acc_t>(B * n);
    RECORD_FUNCTION("kernel::bn_act_bwd", std::vector<c10::IValue>());
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int gi = group_of(g, k);
        const scalar_t* src = nullptr;
        int64_t src_k = 0;
        Strided3 ss(y);
        acc_t src_scale = 1;
        if (gi == g.mean_group && grad_chmean.has_value()) {
          src = grad_chmean->data_ptr<scalar_t>();
          ss = Strided3(*grad_chmean);
          src_scale = acc_t(1) / acc_t(g.start[gi + 1] - g.start[gi]);
        } else if (source[gi] >= 0) {
          src = grad_outs[source[gi]].data_ptr<scalar_t>();
          ss = Strided3(grad_outs[source[gi]]);
          src_k = k - g.start[gi];
        }
        acc_t scale, shift;
        bn_affine(wp[k], bp[k], mp[k], ip[k], scale, shift);
        auto incoming = [&](int64_t b, int64_t i, acc_t xhat) -> acc_t {
          if (src == nullptr) return acc_t(0);
          const acc_t pre = wp[k] * xhat + bp[k];
          return pre > acc_t(0) ? src_scale * static_cast<acc_t>(src[ss.at(b, src_k, i)]) : acc_t(0);
        };
        acc_t sum_g = 0, sum_gx = 0;
        for (int64_t b = 0; b < B; ++b)
          for (int64_t i = 0; i < n; ++i) {
            const acc_t xhat = (static_cast<acc_t>(yp[s.at(b, k, i)]) - mp[k]) * ip[k];
            const acc_t gv = incoming(b, i, xhat);
            sum_g += gv;
            sum_gx += gv * xhat;
          }
        gb[k] = sum_g;
        gw[k] = sum_gx;
        const acc_t w_is = wp[k] * ip[k];
        for (int64_t b = 0; b < B; ++b)
          for (int64_t i = 0; i < n; ++i) {
            const acc_t xhat = (static_cast<acc_t>(yp[s.at(b, k, i)]) - mp[k]) * ip[k];
            gy[so.at(b, k, i)] = static_cast<scalar_t>(
                bn_backward(incoming(b, i, xhat), xhat, w_is, sum_g / N, sum_gx / N, batch_stats));
          }
      }
    });
  });
  return {grad_y, grad_w, grad_b};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gate_fwd_cpu(
    const Tensor& h, const Tensor& h_weight, const Tensor& h_bias, const Tensor& h_mean, const Tensor& h_invstd,
    const Tensor& w2, const Tensor& l_weight, const Tensor& l_bias, const OptTensor& l_running_mean,
    const OptTensor& l_running_var, bool batch_stats, double momentum, double eps) {
  check_gate_fwd(h, h_weight, h_bias, h_mean, h_invstd, w2, l_weight, l_bias, l_running_mean, l_running_var,
                 batch_stats);
  const int64_t B = h.size(0), Kh = h.size(1), n = h.size(2);
  const auto acc = acc_type_of(h.scalar_type());
  Tensor a = at::empty({B, 1, n}, h.options());
  Tensor l = at::empty({B, 1, n}, h.options());
  Tensor l_mean = at::empty({1}, h.options().dtype(acc));
  Tensor l_invstd = at::empty({1}, h.options().dtype(acc));
  const Strided3 s(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gate_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const acc_t *hw = h_weight.data_ptr<acc_t>(), *hb = h_bias.data_ptr<acc_t>();
    const acc_t *hm = h_mean.data_ptr<acc_t>(), *hi = h_invstd.data_ptr<acc_t>();
    const acc_t* wp2 = w2.data_ptr<acc_t>();
    scalar_t *ap = a.data_ptr<scalar_t>(), *lp = l.data_ptr<scalar_t>();
    RECORD_FUNCTION("kernel::gate_fwd", std::vector<c10::IValue>());
    std::vector<acc_t> lacc(B * n);
    at::parallel_for(0, B * n, 256, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t b = e / n, i = e % n;
        acc_t sum = 0;
        for (int64_t k = 0; k < Kh; ++k) {
          acc_t scale, shift;
          bn_affine(hw[k], hb[k], hm[k], hi[k], scale, shift);
          sum += wp2[k] * relu(scale * static_cast<acc_t>(hp[s.at(b, k, i)]) + shift);
        }
        lacc[e] = sum;
        lp[e] = static_cast<scalar_t>(sum);
      }
    });
    acc_t m, is;
    acc_t* rm = opt_ptr<acc_t>(l_running_mean);
    acc_t* rv = opt_ptr<acc_t>(l_running_var);
    if (batch_stats) {
      Welford<acc_t> w = welford_init<acc_t>();
      for (int64_t e = 0; e < B * n; ++e) welford_push(w, lacc[e]);
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

std::tuple<Tensor, Tensor> gate_bwd_cpu(const Tensor& grad_out, const Tensor& target, const Tensor& a) {
  check_gate_bwd(grad_out, target, a);
  const int64_t B = target.size(0), D = target.size(1), n = target.size(2);
  Tensor grad_target = at::empty_like(target);  // keeps target's strides (the channel branch's transposed view)
  Tensor grad_s = at::empty({B, 1, n}, a.options());
  const Strided3 st(target), sg(grad_out), sa(a), so(grad_target);
  // (two dtypes: target's and the gate's, which differ under autocast)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target.scalar_type(), "gate_bwd", [&] {
    using tgt_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "gate_bwd_a", [&] {
      using gate_t = scalar_t;
      using acc_t = at::opmath_type<tgt_t>;
      const tgt_t* tp = target.data_ptr<tgt_t>();
      const tgt_t* gp = grad_out.data_ptr<tgt_t>();
      const gate_t* ap = a.data_ptr<gate_t>();
      tgt_t* op = grad_target.data_ptr<tgt_t>();
      gate_t* sp = grad_s.data_ptr<gate_t>();
      RECORD_FUNCTION("kernel::gate_bwd", std::vector<c10::IValue>());
      at::parallel_for(0, B * n, 64, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t b = e / n, i = e % n;
          const acc_t av = static_cast<acc_t>(ap[sa.at(b, 0, i)]);
          acc_t sum = 0;
          for (int64_t d = 0; d < D; ++d) {
            const acc_t go = static_cast<acc_t>(gp[sg.at(b, d, i)]);
            sum += go * static_cast<acc_t>(tp[st.at(b, d, i)]);
            op[so.at(b, d, i)] = static_cast<tgt_t>(go * av);
          }
          sp[e] = static_cast<gate_t>(sigmoid_backward(sum, av));
        }
      });
    });
  });
  return {grad_target, grad_s};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> head_bwd_cpu(
    const Tensor& grad_s, const Tensor& l, const Tensor& l_weight, const Tensor& l_mean, const Tensor& l_invstd,
    const Tensor& h, const Tensor& h_weight, const Tensor& h_bias, const Tensor& h_mean, const Tensor& h_invstd,
    const Tensor& w2, bool batch_stats) {
  check_head_bwd(grad_s, l, l_weight, l_mean, l_invstd, h, h_weight, h_bias, h_mean, h_invstd, w2);
  const int64_t B = h.size(0), Kh = h.size(1), n = h.size(2);
  Tensor grad_h = at::empty_like(h);  // h's layout
  const Strided3 sgh(grad_h);
  Tensor grad_w2 = at::empty({Kh}, h_weight.options());
  Tensor grad_hw = at::empty({Kh}, h_weight.options());
  Tensor grad_hb = at::empty({Kh}, h_weight.options());
  Tensor grad_lw = at::empty({1}, h_weight.options());
  Tensor grad_lb = at::empty({1}, h_weight.options());
  const Strided3 s(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "head_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *hp = h.data_ptr<scalar_t>(), *lp = l.data_ptr<scalar_t>(), *gsp = grad_s.data_ptr<scalar_t>();
    const acc_t *hw = h_weight.data_ptr<acc_t>(), *hb = h_bias.data_ptr<acc_t>();
    const acc_t *hm = h_mean.data_ptr<acc_t>(), *hi = h_invstd.data_ptr<acc_t>(), *wp2 = w2.data_ptr<acc_t>();
    const acc_t lm = l_mean.data_ptr<acc_t>()[0], li = l_invstd.data_ptr<acc_t>()[0];
    const acc_t lw = l_weight.data_ptr<acc_t>()[0];
    const int64_t NN = B * n;
    const acc_t N = static_cast<acc_t>(NN);
    RECORD_FUNCTION("kernel::head_bwd", std::vector<c10::IValue>());
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
    // per hidden channel: dW2, then BN_h's backward through the ReLU
    at::parallel_for(0, Kh, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        acc_t scale, shift;
        bn_affine(hw[k], hb[k], hm[k], hi[k], scale, shift);
        acc_t sw2 = 0, sg = 0, sgx = 0;
        for (int64_t b = 0; b < B; ++b)
          for (int64_t i = 0; i < n; ++i) {
            const acc_t hv = static_cast<acc_t>(hp[s.at(b, k, i)]);
            const acc_t pre = scale * hv + shift;
            const acc_t d = dl[b * n + i];
            sw2 += d * relu(pre);
            const acc_t gv = pre > acc_t(0) ? wp2[k] * d : acc_t(0);
            sg += gv;
            sgx += gv * (hv - hm[k]) * hi[k];
          }
        grad_w2.data_ptr<acc_t>()[k] = sw2;
        grad_hb.data_ptr<acc_t>()[k] = sg;
        grad_hw.data_ptr<acc_t>()[k] = sgx;
        scalar_t* gh = grad_h.data_ptr<scalar_t>();
        for (int64_t b = 0; b < B; ++b)
          for (int64_t i = 0; i < n; ++i) {
            const acc_t hv = static_cast<acc_t>(hp[s.at(b, k, i)]);
            const acc_t gv = scale * hv + shift > acc_t(0) ? wp2[k] * dl[b * n + i] : acc_t(0);
            gh[sgh.at(b, k, i)] =
                static_cast<scalar_t>(bn_backward(gv, (hv - hm[k]) * hi[k], scale, sg / N, sgx / N, batch_stats));
          }
      }
    });
  });
  return {grad_h, grad_w2, grad_hw, grad_hb, grad_lw, grad_lb};
}

Tensor gate_apply_cpu(const Tensor& target, const Tensor& a) {
  check_gate_apply(target, a);
  const int64_t B = target.size(0), D = target.size(1), n = target.size(2);
  Tensor out = at::empty_like(target);  // target's layout and dtype
  const Strided3 st(target), sa(a), so(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target.scalar_type(), "gate_apply", [&] {
    using tgt_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "gate_apply_a", [&] {
      using acc_t = at::opmath_type<tgt_t>;
      const tgt_t* tp = target.data_ptr<tgt_t>();
      const scalar_t* ap = a.data_ptr<scalar_t>();
      tgt_t* op = out.data_ptr<tgt_t>();
      RECORD_FUNCTION("kernel::gate_apply", std::vector<c10::IValue>());
      at::parallel_for(0, B * D, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / D, d = r % D;
          for (int64_t i = 0; i < n; ++i)
            op[so.at(b, d, i)] = static_cast<tgt_t>(static_cast<acc_t>(tp[st.at(b, d, i)]) *
                                                    static_cast<acc_t>(ap[sa.at(b, 0, i)]));
        }
      });
    });
  });
  return out;
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
