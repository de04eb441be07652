// The WKV operator, registered once: the schema, the shapes for torch.compile (Meta) and the
// autograd formula. The math is models/wkv.py's reference; the kernels are registered per
// dispatch key beside their code (wkv_cpu.cpp: CPU, wkv_kernel.cu: CUDA).
//
//   rwkv_signal::wkv(decay, first, k, v, state?, r?) -> (y, state_out, saved)
//     decay, first (C,) float32; k, v (B, T, C) float32/bfloat16/float16, r likewise or None;
//     state (B, 3, C) float32 [a, b, p] or None (empty). y = wkv (B, T, C) in k's dtype, or
//     sigmoid(r) * wkv with r (the time mix's output gate, fused); state_out (B, 3, C) float32;
//     saved (B, ceil(T / 64), 3, C) float32: the state entering every 64 steps, for the backward.
//   rwkv_signal::wkv_backward(decay, first, k, v, state?, r?, saved, state_out, gy, gstate?)
//     -> (gdecay, gfirst, gk, gv, gstate_in, gr); gstate_in is (0,) without state, gr (0,)
//     without r. gstate None: the final state's gradient is zero. The p row of gstate is
//     ignored (p is a scale; see models/wkv.py).
//
// Python (models/wkv.py) validates inputs once, at the public boundary; the kernels check only
// what would make them read out of bounds.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "wkv_common.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Forward = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                   const Tensor&, const OptTensor&,
                                                   const OptTensor&);
using Backward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
    const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&);

// Shapes only, with symbolic sizes so torch.compile's dynamic shapes trace through. Outputs are
// contiguous, as the kernels make them.
std::tuple<Tensor, Tensor, Tensor> wkv_meta(const Tensor& decay, const Tensor& first,
                                            const Tensor& k, const Tensor& v,
                                            const OptTensor& state, const OptTensor& r) {
  const auto B = k.sym_size(0), T = k.sym_size(1), C = k.sym_size(2);
  const auto N = (T + (wkv::kSaveSteps - 1)) / wkv::kSaveSteps;
  const auto f32 = k.options().dtype(at::kFloat);
  return {at::empty_symint(k.sym_sizes(), k.options()), at::empty_symint({B, 3, C}, f32),
          at::empty_symint({B, N, 3, C}, f32)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> wkv_backward_meta(
    const Tensor& decay, const Tensor& first, const Tensor& k, const Tensor& v,
    const OptTensor& state, const OptTensor& r, const Tensor& saved, const Tensor& state_out,
    const Tensor& gy, const OptTensor& gstate) {
  const auto f32 = k.options().dtype(at::kFloat);
  const auto none = [&](const at::TensorOptions& o) { return at::empty({0}, o); };
  return {at::empty_symint(decay.sym_sizes(), f32),
          at::empty_symint(first.sym_sizes(), f32),
          at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options()),
          state ? at::empty_symint(state->sym_sizes(), f32) : none(f32),
          r ? at::empty_symint(r->sym_sizes(), r->options()) : none(k.options())};
}

const c10::TypedOperatorHandle<Forward>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("rwkv_signal::wkv", "").typed<Forward>();
  return op;
}

const c10::TypedOperatorHandle<Backward>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rwkv_signal::wkv_backward", "")
                             .typed<Backward>();
  return op;
}

OptTensor present(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The autograd formula, written once for every device. Forward and backward are operator
// calls, so torch.compile traces both (the backward is its own op, which compile traces around).
struct WKVFunction : public torch::autograd::Function<WKVFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const Tensor& decay, const Tensor& first,
                                                const Tensor& k, const Tensor& v,
                                                const OptTensor& state, const OptTensor& r) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, state_out, saved] = forward_op().call(decay, first, k, v, state, r);
    ctx->save_for_backward({decay, first, k, v, state.value_or(Tensor()), r.value_or(Tensor()),
                            saved, state_out});
    ctx->mark_non_differentiable({saved});
    return {y, state_out, saved};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &decay = s[0], &first = s[1], &k = s[2], &v = s[3];
    const OptTensor state = present(s[4]), r = present(s[5]);
    // no gradient arrived through y (only the final state was used): it is zero
    const Tensor gy = grads[0].defined() ? grads[0] : at::zeros_like(k);
    auto [gdecay, gfirst, gk, gv, gstate_in, gr] = backward_op().call(
        decay, first, k, v, state, r, s[6], s[7], gy, present(grads[1]));
    return {gdecay, gfirst, gk, gv, state ? gstate_in : Tensor(), r ? gr : Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> wkv_autograd(const Tensor& decay, const Tensor& first,
                                                const Tensor& k, const Tensor& v,
                                                const OptTensor& state, const OptTensor& r) {
  auto out = WKVFunction::apply(decay, first, k, v, state, r);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY(rwkv_signal, m) {
  m.def("wkv(Tensor decay, Tensor first, Tensor k, Tensor v, Tensor? state, Tensor? r) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("wkv_backward(Tensor decay, Tensor first, Tensor k, Tensor v, Tensor? state, "
        "Tensor? r, Tensor saved, Tensor state_out, Tensor gy, Tensor? gstate) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rwkv_signal, Meta, m) {
  m.impl("wkv", &wkv_meta);
  m.impl("wkv_backward", &wkv_backward_meta);
}

TORCH_LIBRARY_IMPL(rwkv_signal, Autograd, m) { m.impl("wkv", &wkv_autograd); }
