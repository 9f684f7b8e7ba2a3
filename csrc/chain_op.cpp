// An RGA module's branches as one op with its autograd in C++: rga_kernels::chain, for the cpp
// and cuda backends.
//
// The module runs its branches one after the other (RGA-S, RGA-C, RGA-SC, RGA-CS: each gates
// the previous one's output) or two in parallel (the second gates the first one's output with
// its attention of the input). An eager step is host-bound, so the whole thing is one call and
// one autograd node: the Python side passes the tensors and a small integer description
// (`meta`), the forward runs branch_fwd per step (branch_op.cpp) and the backward branch_bwd in
// reverse, with the ops below autograd (AutoDispatchBelowADInplaceOrView). The same sequence in
// Python is rga_kernels/_branch_chain.py's _Chain (the triton backend's path): read that first.
//
// Backward with create_graph=True (double backward) recomputes the chain with differentiable
// ATen ops (composite_step, the same math as _branch_chain.py's composite_forward) and differentiates
// that.
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/ivalue.h>
#include <ATen/ops/add.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/batch_norm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "branch_op.h"
#include "relation.h"

namespace rga_kernels {
namespace chain {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kRunningPerStep = 8;  // running mean/var of E, Z, H, L
constexpr int64_t kMetaHead = 8;  // transposed, relation, batch_stats, theta, phi, mean_group, #counters, #groups

// One step as `meta` describes it: per step the eight head entries, then the groups' channel
// counts; `bn` holds (momentum, eps) per step. Its parameters are params[first, first + count):
// per embedding the conv weight, BN weight and bias ([θ, φ, g] as present), the relation's conv
// and BN (if any), W1 and its BN, W2 and its BN; its num_batches_tracked counters (which its
// kernels increment) are counters[counters_first, + n_counters).
struct StepSpec {
  bool transposed = false, relation = false, batch_stats = false;
  int64_t theta = -1, phi = -1, mean_group = -1;
  std::vector<int64_t> groups;
  double momentum = 0, eps = 0;
  int64_t first = 0, count = 0;
  int64_t counters_first = 0, n_counters = 0;
};

std::vector<StepSpec> decode(at::IntArrayRef meta, at::ArrayRef<double> bn, int64_t n_params, int64_t n_counters) {
  std::vector<StepSpec> steps;
  size_t i = 0;
  int64_t first = 0, counters_first = 0;
  while (i < meta.size()) {
    TORCH_CHECK(i + kMetaHead <= meta.size(), "rga_kernels::chain: meta ends inside a step: ", meta);
    StepSpec s;
    s.transposed = meta[i] != 0;
    s.relation = meta[i + 1] != 0;
    s.batch_stats = meta[i + 2] != 0;
    s.theta = meta[i + 3];
    s.phi = meta[i + 4];
    s.mean_group = meta[i + 5];
    s.n_counters = meta[i + 6];
    s.counters_first = counters_first;
    counters_first += s.n_counters;
    const int64_t g = meta[i + 7];
    i += kMetaHead;
    TORCH_CHECK(g >= 0 && i + g <= meta.size(), "rga_kernels::chain: meta lists ", g, " groups past its end");
    s.groups.assign(meta.begin() + i, meta.begin() + i + g);
    i += g;
    const size_t k = steps.size();
    TORCH_CHECK(bn.size() >= 2 * (k + 1), "rga_kernels::chain: bn needs (momentum, eps) for step ", k);
    s.momentum = bn[2 * k];
    s.eps = bn[2 * k + 1];
    s.first = first;
    s.count = 3 * g + (s.relation ? 3 : 0) + 6;
    first += s.count;
    steps.push_back(std::move(s));
  }
  TORCH_CHECK(!steps.empty() && steps.size() <= 2, "rga_kernels::chain: 1 or 2 steps expected, got ", steps.size());
  TORCH_CHECK(first == n_params, "rga_kernels::chain: meta describes ", first, " parameters, got ", n_params);
  TORCH_CHECK(bn.size() == 2 * steps.size(), "rga_kernels::chain: bn must hold 2 values per step, got ", bn.size());
  TORCH_CHECK(counters_first == n_counters, "rga_kernels::chain: meta describes ", counters_first, " counters, got ",
              n_counters);
  return steps;
}

// One step's parameters, by role.
struct StepParams {
  at::TensorList emb_w, emb_bn_w, emb_bn_b;
  OptTensor rel_w, rel_bn_w, rel_bn_b;
  Tensor w1, h_bn_w, h_bn_b, w2, l_bn_w, l_bn_b;
};

StepParams params_of(const StepSpec& s, at::TensorList params) {
  const at::TensorList p = params.slice(s.first, s.count);
  const size_t g = s.groups.size();
  StepParams r;
  r.emb_w = p.slice(0, g);
  r.emb_bn_w = p.slice(g, g);
  r.emb_bn_b = p.slice(2 * g, g);
  size_t j = 3 * g;
  if (s.relation) {
    r.rel_w = p[j];
    r.rel_bn_w = p[j + 1];
    r.rel_bn_b = p[j + 2];
    j += 3;
  }
  r.w1 = p[j];
  r.h_bn_w = p[j + 1];
  r.h_bn_b = p[j + 2];
  r.w2 = p[j + 3];
  r.l_bn_w = p[j + 4];
  r.l_bn_b = p[j + 5];
  return r;
}

Tensor tr(const Tensor& t, bool transposed) { return transposed && t.defined() ? t.transpose(1, 2) : t; }

Tensor add_opt(const Tensor& a, const Tensor& b) { return !a.defined() ? b : !b.defined() ? a : at::add(a, b); }

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

// What one step's backward needs.
struct Record {
  Tensor inp;     // as the kernels read it (cast under autocast)
  Tensor target;  // the gated tensor when it is not inp (undefined: inp is gated)
  std::vector<Tensor> saved;
  at::ScalarType dtype;  // of the input the step was given (its gradient's)
  bool own_target;       // target came from the caller (else: inp uncast, under autocast)
  size_t n_saved = 0;    // saved.size(), kept when the tensors move to save_for_backward
};

// What the backward needs besides the saved variables, kept in the autograd context as one
// capsule. The records' tensors travel through save_for_backward (see ChainFunction::forward).
struct ChainState : torch::CustomClassHolder {
  std::vector<StepSpec> steps;
  std::vector<Record> records;
  bool parallel = false;
  c10::optional<at::ScalarType> cdt;
};

std::pair<Tensor, Tensor> run_step(const StepSpec& s, Tensor inp, Tensor target, at::TensorList params,
                                   at::TensorList running, at::TensorList counters,
                                   c10::optional<at::ScalarType> cdt, Record& rec) {
  rec.dtype = inp.scalar_type();
  rec.own_target = target.defined();
  if (cdt.has_value() && inp.scalar_type() != *cdt) {
    if (!target.defined()) target = inp;
    inp = inp.to(*cdt);
  }
  const StepParams p = params_of(s, params);
  auto [out, a, saved] = branch::branch_fwd(inp, opt(target), p.emb_w, p.emb_bn_w, p.emb_bn_b, p.rel_w, p.rel_bn_w,
                                            p.rel_bn_b, p.w1, p.h_bn_w, p.h_bn_b, p.w2, p.l_bn_w, p.l_bn_b, running,
                                            counters, s.groups, s.theta, s.phi, s.mean_group, s.relation,
                                            s.batch_stats, s.momentum, s.eps);
  rec.inp = inp;
  rec.target = target;
  rec.saved = std::move(saved);
  return {out, a};
}

// The chain's forward; returns (out, attention per step, in the step's own layout: see
// attention_views) and fills state.records.
std::pair<Tensor, std::vector<Tensor>> chain_forward(ChainState& st, const Tensor& x, const Tensor& target,
                                                     at::TensorList params, at::TensorList running,
                                                     at::TensorList counters) {
  const auto& steps = st.steps;
  TORCH_CHECK(x.dim() == 3, "rga_kernels::chain: x must be (B, C, n), got ", x.sizes());
  TORCH_CHECK(running.size() == kRunningPerStep * steps.size(), "rga_kernels::chain: ",
              kRunningPerStep * steps.size(), " running-statistics entries expected, got ", running.size());
  st.records.assign(steps.size(), Record{});
  std::vector<Tensor> attention;
  Tensor out;
  if (st.parallel) {  // out = C(x, target=S(x))
    TORCH_CHECK(steps.size() == 2 && !target.defined(),
                "rga_kernels::chain: parallel runs exactly two steps on x, with no target");
    const StepSpec &s0 = steps[0], &s1 = steps[1];
    auto [o0, a0] = run_step(s0, tr(x, s0.transposed), Tensor(), params, running.slice(0, kRunningPerStep),
                             counters.slice(s0.counters_first, s0.n_counters), st.cdt, st.records[0]);
    auto [o1, a1] = run_step(s1, tr(x, s1.transposed), tr(tr(o0, s0.transposed), s1.transposed), params,
                             running.slice(kRunningPerStep, kRunningPerStep),
                             counters.slice(s1.counters_first, s1.n_counters), st.cdt, st.records[1]);
    attention = {a0, a1};
    out = tr(o1, s1.transposed);
  } else {
    Tensor t = x;
    for (size_t i = 0; i < steps.size(); ++i) {
      const StepSpec& s = steps[i];
      auto [o, a] = run_step(s, tr(t, s.transposed), i == 0 ? tr(target, s.transposed) : Tensor(), params,
                             running.slice(kRunningPerStep * i, kRunningPerStep),
                             counters.slice(s.counters_first, s.n_counters), st.cdt, st.records[i]);
      attention.push_back(a);
      t = tr(o, s.transposed);
    }
    out = t;
  }
  return {out, attention};
}

// The attention maps as the caller sees them ((B, 1, n) or, for a transposed step, (B, n, 1)).
// Made where views are tracked (not below ADInplaceOrView): the transposed map then shares its
// version counter with the saved one, and changing it in place before backward is an error.
std::vector<Tensor> attention_views(const ChainState& st, std::vector<Tensor> attention) {
  for (size_t i = 0; i < attention.size(); ++i) attention[i] = tr(attention[i], st.steps[i].transposed);
  return attention;
}

// One step's gradients: (d_inp in the dtype the step was given, d_target (a caller's target) or
// undefined); the parameter gradients go to grads[s.first, s.first + s.count).
std::pair<Tensor, Tensor> step_backward(const StepSpec& s, const Record& r, at::TensorList params,
                                        const Tensor& grad_out, variable_list& grads) {
  const StepParams p = params_of(s, params);
  std::vector<Tensor> g = branch::branch_bwd(grad_out, r.inp, opt(r.target), p.emb_w, p.rel_w, p.rel_bn_w,
                                             p.rel_bn_b, p.w1, p.h_bn_w, p.h_bn_b, p.w2, p.l_bn_w, r.saved,
                                             s.groups, s.theta, s.phi, s.mean_group, s.relation, s.batch_stats);
  // g: d_inp, d_target, 3 per embedding, the relation's 3 (empty without one), then 6
  const size_t ng = 3 * s.groups.size();
  size_t out = s.first;
  for (size_t j = 0; j < ng; ++j) grads[out++] = g[2 + j];
  if (s.relation)
    for (size_t j = 0; j < 3; ++j) grads[out++] = g[2 + ng + j];
  for (size_t j = 0; j < 6; ++j) grads[out++] = g[5 + ng + j];
  Tensor d_inp = g[0].numel() > 0 ? g[0] : Tensor();
  Tensor d_target = r.target.defined() ? g[1] : Tensor();
  if (d_inp.defined() && d_inp.scalar_type() != r.dtype) d_inp = d_inp.to(r.dtype);
  if (!r.own_target) return {add_opt(d_inp, d_target), Tensor()};  // autocast: the gated tensor is the input
  return {d_inp, d_target};
}

// ---- the differentiable recompute (double backward) ----

Tensor bn_composite(const Tensor& y, const Tensor& w, const Tensor& b, bool batch_stats, const Tensor& mean,
                    const Tensor& invstd, double eps) {
  if (batch_stats) return at::batch_norm(y, w, b, {}, {}, true, 0.0, eps, false);
  const Tensor scale = w * invstd.to(w.scalar_type());
  return y * scale.unsqueeze(-1).to(y.scalar_type()) +
         (b - mean.to(b.scalar_type()) * scale).unsqueeze(-1).to(y.scalar_type());
}

Tensor relation_composite(const Tensor& theta, const Tensor& phi, const Tensor& weight) {
  const int64_t n = theta.size(2);
  const Tensor p = at::matmul(phi, weight.narrow(1, 0, n).t()).transpose(1, 2);  // (B, M, d)
  const Tensor q = at::matmul(theta, weight.narrow(1, n, n).t()).transpose(1, 2);
  return at::baddbmm(q.bmm(phi), p, theta);
}

Tensor flat_cat(at::TensorList ts, at::ScalarType dt) {
  std::vector<Tensor> parts;
  for (const auto& t : ts) parts.push_back(t.flatten(1).to(dt));
  return parts.size() == 1 ? parts[0] : at::cat(parts);
}

// target * a for one step in differentiable ops; `saved` gives the eval-mode statistics.
Tensor composite_step(const StepSpec& s, const Tensor& inp, const Tensor& target, const StepParams& p,
                      const std::vector<Tensor>& saved) {
  using namespace branch;
  const auto dt = inp.scalar_type();
  std::vector<Tensor> outs;
  std::vector<Tensor> parts;
  if (!s.groups.empty()) {
    const Tensor e = at::matmul(flat_cat(p.emb_w, dt), inp);
    std::vector<Tensor> w(p.emb_bn_w.begin(), p.emb_bn_w.end()), b(p.emb_bn_b.begin(), p.emb_bn_b.end());
    const Tensor act =
        at::relu(bn_composite(e, at::cat(w), at::cat(b), s.batch_stats, saved[kEMean], saved[kEInvstd], s.eps));
    outs = act.split_with_sizes(s.groups, 1);
    if (s.mean_group >= 0) parts.push_back(outs[s.mean_group].mean(1, true));
  }
  if (s.relation) {
    const Tensor theta = s.theta < 0 ? inp : outs[s.theta];
    const Tensor phi = s.phi < 0 ? inp : outs[s.phi];
    const Tensor z = relation_composite(theta, phi, p.rel_w->flatten(1).to(dt));
    parts.push_back(
        at::relu(bn_composite(z, *p.rel_bn_w, *p.rel_bn_b, s.batch_stats, saved[kZMean], saved[kZInvstd], s.eps)));
  }
  const Tensor y = parts.size() == 1 ? parts[0] : at::cat(parts, 1);
  const Tensor h = at::matmul(p.w1.flatten(1).to(dt), y);
  const Tensor hh = at::relu(bn_composite(h, p.h_bn_w, p.h_bn_b, s.batch_stats, saved[kHMean], saved[kHInvstd], s.eps));
  const Tensor l = at::matmul(p.w2.flatten(1).to(dt), hh);
  const Tensor a = at::sigmoid(bn_composite(l, p.l_bn_w, p.l_bn_b, s.batch_stats, saved[kLMean], saved[kLInvstd], s.eps));
  return target * a;
}

Tensor composite_chain(const ChainState& st, const std::vector<Record>& records, const Tensor& x, const Tensor& target,
                       at::TensorList params) {
  auto step = [&](size_t i, Tensor inp, Tensor tgt) {
    const StepSpec& s = st.steps[i];
    inp = tr(inp, s.transposed);
    tgt = tr(tgt, s.transposed);
    if (st.cdt.has_value() && inp.scalar_type() != *st.cdt) {
      if (!tgt.defined()) tgt = inp;
      inp = inp.to(*st.cdt);
    }
    return tr(composite_step(s, inp, tgt.defined() ? tgt : inp, params_of(s, params), records[i].saved),
              s.transposed);
  };
  if (st.parallel) return step(1, x, step(0, x, Tensor()));
  Tensor out = x;
  for (size_t i = 0; i < st.steps.size(); ++i) out = step(i, out, i == 0 ? target : Tensor());
  return out;
}

// The non-tensor arguments (one entry of the Function's inputs, not a variable).
struct ChainArgs {
  at::TensorList running, counters;
  at::IntArrayRef meta;
  at::ArrayRef<double> bn;
  bool parallel;
  c10::optional<at::ScalarType> cdt;
};

struct ChainFunction : public torch::autograd::Function<ChainFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& target, at::TensorList params,
                               const ChainArgs& args) {
    auto st = c10::make_intrusive<ChainState>();
    st->steps = decode(args.meta, args.bn, static_cast<int64_t>(params.size()),
                       static_cast<int64_t>(args.counters.size()));
    st->parallel = args.parallel;
    st->cdt = args.cdt;
    Tensor out;
    std::vector<Tensor> attention;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, attention) =
          chain_forward(*st, x, target.has_value() ? *target : Tensor(), params, args.running, args.counters);
    }
    attention = attention_views(*st, std::move(attention));
    variable_list to_save{x, target.has_value() ? *target : Tensor()};
    to_save.insert(to_save.end(), params.begin(), params.end());
    // Every tensor the backward reads goes through save_for_backward, the intermediates too:
    // modifying an input (or a returned attention map) in place before backward is an error, and
    // saved-tensor hooks see them all (non-reentrant checkpointing drops and recomputes them,
    // save_on_cpu offloads them). The capsule keeps only the description.
    for (Record& r : st->records) {
      to_save.push_back(std::move(r.inp));
      to_save.push_back(std::move(r.target));
      r.n_saved = r.saved.size();
      for (Tensor& t : r.saved) to_save.push_back(std::move(t));
      r.inp = Tensor();
      r.target = Tensor();
      r.saved.clear();
    }
    ctx->save_for_backward(to_save);
    ctx->saved_data["state"] = c10::IValue::make_capsule(st);
    ctx->mark_non_differentiable(attention);
    ctx->set_materialize_grads(false);
    variable_list result{out};
    result.insert(result.end(), attention.begin(), attention.end());
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list all = ctx->get_saved_variables();  // first: a second backward fails here, clearly
    const auto st = c10::static_intrusive_pointer_cast<ChainState>(ctx->saved_data["state"].toCapsule());
    // Without retain_graph the engine frees the saved variables after this call, but not
    // saved_data: drop the capsule here (it is small now; the tensors are saved variables).
    if (!torch::autograd::get_current_graph_task_keep_graph()) ctx->saved_data.erase("state");
    size_t n_in = all.size();
    for (const Record& r : st->records) n_in -= 2 + r.n_saved;
    std::vector<Record> records = st->records;  // the description, with its tensors from `all`
    for (size_t i = 0, k = n_in; i < records.size(); ++i) {
      Record& r = records[i];
      r.inp = all[k++];
      r.target = all[k++];
      r.saved.assign(all.begin() + k, all.begin() + k + r.n_saved);
      k += r.n_saved;
    }
    const variable_list saved(all.begin(), all.begin() + n_in);  // x, target, the parameters
    const Tensor &x = saved[0], &target = saved[1];
    const at::TensorList params = at::TensorList(saved).slice(2);
    // one gradient per Function input: x, target, each parameter, the non-tensor arguments
    variable_list grads(3 + params.size());
    const Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return grads;
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiate a differentiable recompute
      variable_list inputs;
      std::vector<size_t> where;
      for (size_t i = 0; i < saved.size(); ++i)
        if (saved[i].defined() && saved[i].requires_grad()) {
          inputs.push_back(saved[i]);
          where.push_back(i);
        }
      const Tensor out = composite_chain(*st, records, x, target, params);
      const variable_list got = torch::autograd::grad({out}, inputs, {grad_out}, c10::nullopt, true, true);
      for (size_t k = 0; k < where.size(); ++k) grads[where[k]] = got[k];
      return grads;
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    variable_list d_params(params.size());
    const auto& steps = st->steps;
    if (st->parallel) {
      const StepSpec &s0 = steps[0], &s1 = steps[1];
      auto [d1, d_gated] = step_backward(s1, records[1], params, tr(grad_out, s1.transposed), d_params);
      auto [d0, unused] = step_backward(s0, records[0], params, tr(tr(d_gated, s1.transposed), s0.transposed),
                                        d_params);
      grads[0] = add_opt(tr(d0, s0.transposed), tr(d1, s1.transposed));
    } else {
      Tensor g = grad_out;
      for (size_t i = steps.size(); i-- > 0;) {
        const StepSpec& s = steps[i];
        auto [d_inp, d_tgt] = step_backward(s, records[i], params, tr(g, s.transposed), d_params);
        g = tr(d_inp, s.transposed);
        if (i == 0) grads[1] = tr(d_tgt, s.transposed);
      }
      grads[0] = g;
    }
    for (size_t i = 0; i < params.size(); ++i) grads[2 + i] = d_params[i];
    return grads;
  }
};

std::tuple<Tensor, std::vector<Tensor>> split_result(const variable_list& r) {
  return {r[0], std::vector<Tensor>(r.begin() + 1, r.end())};
}

std::tuple<Tensor, std::vector<Tensor>> chain_autograd(const Tensor& x, const OptTensor& target, at::TensorList params,
                                                       at::TensorList running, at::TensorList counters,
                                                       at::IntArrayRef meta, at::ArrayRef<double> bn, bool parallel,
                                                       c10::optional<at::ScalarType> compute_dtype) {
  return split_result(
      ChainFunction::apply(x, target, params, ChainArgs{running, counters, meta, bn, parallel, compute_dtype}));
}

// Below autograd (inference mode, or a caller that excluded it): the forward alone.
std::tuple<Tensor, std::vector<Tensor>> chain_plain(const Tensor& x, const OptTensor& target, at::TensorList params,
                                                    at::TensorList running, at::TensorList counters,
                                                    at::IntArrayRef meta, at::ArrayRef<double> bn, bool parallel,
                                                    c10::optional<at::ScalarType> compute_dtype) {
  ChainState st;
  st.steps = decode(meta, bn, static_cast<int64_t>(params.size()), static_cast<int64_t>(counters.size()));
  st.parallel = parallel;
  st.cdt = compute_dtype;
  auto [out, attention] = chain_forward(st, x, target.has_value() ? *target : Tensor(), params, running, counters);
  return {out, attention_views(st, std::move(attention))};
}

}  // namespace
}  // namespace chain
}  // namespace rga_kernels

TORCH_LIBRARY_FRAGMENT(rga_kernels, m) {
  m.def(
      "chain(Tensor x, Tensor? target, Tensor[] params, Tensor(a!)[] running, Tensor(b!)[] counters, int[] meta, "
      "float[] bn, bool parallel, ScalarType? compute_dtype) -> (Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(rga_kernels, Autograd, m) { m.impl("chain", &rga_kernels::chain::chain_autograd); }

TORCH_LIBRARY_IMPL(rga_kernels, CompositeExplicitAutograd, m) {
  m.impl("chain", &rga_kernels::chain::chain_plain);
}
