// The WKV operator on the CPU: forward and backward with the math, state convention and
// gradient convention of models/wkv.py (`wkv_reference`, `wkv_reference_backward`), registered
// as the CPU kernel of rwkv_signal::wkv and rwkv_signal::wkv_backward (schema: wkv_op.cpp).
//
// Work is split over (batch, block of kLanes channels) with at::parallel_for, so it follows
// torch.set_num_threads. Inside a block, time is the outer loop and the channels the inner
// one: k[b, t, c0:c0+kLanes] is contiguous, and the inner loops vectorise.
//
// Numbers: float32 state (a, b, p) with the running-max scale p, as the CUDA kernel; bfloat16
// and float16 inputs are widened to float32 at the boundary (their conversions have branches
// that keep the loops from vectorising) and the outputs rounded back. The gradients of decay
// and first are sums over B*T terms, accumulated in double. The forward saves the state
// entering every kSave steps; the backward recomputes the states of one such stretch from it
// into a small scratch buffer, so memory is O(B*T*C/kSave) and nothing depends on a maximum T.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include "wkv_common.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int64_t kSave = wkv::kSaveSteps;  // steps per saved state
constexpr int64_t kLanes = 32;  // channels per work item: the width of the vectorised loops

// e^x in float32 as plain arithmetic, so that loops calling it vectorise: a call to expf does
// not vectorise without -ffast-math, and -ffast-math would also let the compiler assume no
// infinities, which the max/select logic below must see. Cephes' expf polynomial (about 2 ulp).
// Every exponent here is <= 0 up to rounding (a difference from a running maximum); anything
// below -87.3 (float's smallest normal), -1e38 and -inf included, gives exactly 0.
inline float exp_vec(float x) {
  constexpr float kLo = -87.3365447f, kHi = 88.3762626f;
  const float xc = std::min(std::max(x, kLo), kHi);
  // round to nearest by the 1.5 * 2^23 trick: floor/nearbyint do not vectorise on plain x86-64
  const float n = (xc * 1.44269504f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < kLo ? 0.0f : poly * scale;
}

// k as the kernels read it (wkv_common.h); a NaN stays NaN
inline float bounded_k(float k) { return k > wkv::kMaxK ? wkv::kMaxK : k; }

// sigmoid without overflow: e^{-|x|} <= 1
inline float sigmoid(float x) {
  const float e = exp_vec(-std::abs(x));
  const float s = 1.0f / (1.0f + e);
  return x >= 0 ? s : e * s;
}

struct Dims {
  int64_t B, T, C, N;  // N = number of saved states
  int64_t blocks;      // channel blocks per batch row
};

Dims dims_of(const Tensor& k) {
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  return {B, T, C, (T + kSave - 1) / kSave, (C + kLanes - 1) / kLanes};
}

// One (batch row, channel block): y for every step, the final state, and the state entering
// every kSave steps. a, b, p enter holding the initial state. With kGate, y = sigmoid(r) * wkv.
template <bool kGate>
void forward_block(const Dims& d, int64_t n, const float* __restrict__ w,
                   const float* __restrict__ u, const float* __restrict__ k,
                   const float* __restrict__ v, const float* __restrict__ r,
                   float* __restrict__ y, float* __restrict__ saved, float* __restrict__ a,
                   float* __restrict__ b, float* __restrict__ p) {
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t row = t * d.C;
    if (t % kSave == 0) {
      float* to = saved + (t / kSave) * 3 * d.C;
      std::copy(a, a + n, to);
      std::copy(b, b + n, to + d.C);
      std::copy(p, p + n, to + 2 * d.C);
    }
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const float kt = bounded_k(k[row + c]), vt = v[row + c];
      // output: q = max(p, u + k); one of the two factors is e^0 = 1
      const float ww = u[c] + kt, gap = p[c] - ww;
      const float e = exp_vec(-std::abs(gap));
      const float e1 = gap >= 0 ? 1.0f : e, e2 = gap >= 0 ? e : 1.0f;
      const float out = (e1 * a[c] + e2 * vt) / (e1 * b[c] + e2);
      if constexpr (kGate) {
        y[row + c] = out * sigmoid(r[row + c]);
      } else {
        y[row + c] = out;
      }
      // state: q = max(p + w, k)
      const float pw = p[c] + w[c], gap2 = pw - kt;
      const float f = exp_vec(-std::abs(gap2));
      const float f1 = gap2 >= 0 ? 1.0f : f, f2 = gap2 >= 0 ? f : 1.0f;
      a[c] = f1 * a[c] + f2 * vt;
      b[c] = f1 * b[c] + f2;
      p[c] = gap2 >= 0 ? pw : kt;
    }
  }
}

// One (batch row, channel block) of wkv_reference_backward, kSave steps at a time in reverse.
// rs, ss, rho enter holding the final state's gradient; gw, gu accumulate over the row. With
// kGate the incoming gradient of wkv is gy * sigmoid(r), and gr = gy * wkv * sigmoid'(r).
template <bool kGate>
void backward_block(const Dims& d, int64_t n, const float* __restrict__ w,
                    const float* __restrict__ u, const float* __restrict__ k,
                    const float* __restrict__ v, const float* __restrict__ r,
                    const float* __restrict__ gy, const float* __restrict__ saved,
                    float* __restrict__ gk, float* __restrict__ gv, float* __restrict__ gr,
                    float* __restrict__ rs, float* __restrict__ ss, float* __restrict__ rho,
                    double* __restrict__ gw, double* __restrict__ gu) {
  // states entering each step of one stretch: [step][lane]
  float sa[kSave][kLanes], sb[kSave][kLanes], sp[kSave][kLanes];
  for (int64_t piece = d.N - 1; piece >= 0; --piece) {
    const int64_t t0 = piece * kSave, len = std::min(kSave, d.T - t0);
    const float* from = saved + piece * 3 * d.C;
    std::copy(from, from + n, sa[0]);
    std::copy(from + d.C, from + d.C + n, sb[0]);
    std::copy(from + 2 * d.C, from + 2 * d.C + n, sp[0]);
    for (int64_t j = 0; j + 1 < len; ++j) {
      const int64_t row = (t0 + j) * d.C;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const float kt = bounded_k(k[row + c]), vt = v[row + c];
        const float pw = sp[j][c] + w[c], gap = pw - kt;
        const float f = exp_vec(-std::abs(gap));
        const float f1 = gap >= 0 ? 1.0f : f, f2 = gap >= 0 ? f : 1.0f;
        sa[j + 1][c] = f1 * sa[j][c] + f2 * vt;
        sb[j + 1][c] = f1 * sb[j][c] + f2;
        sp[j + 1][c] = gap >= 0 ? pw : kt;
      }
    }
    for (int64_t j = len - 1; j >= 0; --j) {
      const int64_t row = (t0 + j) * d.C;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const float kraw = k[row + c], kt = bounded_k(kraw), vt = v[row + c];
        const float a = sa[j][c], b = sb[j][c], p = sp[j][c];
        const float ww = u[c] + kt, gap = p - ww;
        const float e = exp_vec(-std::abs(gap));
        const float e1 = gap >= 0 ? 1.0f : e, e2 = gap >= 0 ? e : 1.0f;
        const float q = gap >= 0 ? p : ww;
        const float den = e1 * b + e2;  // D_t = den e^q
        const float yt = (e1 * a + e2 * vt) / den;
        float gyt = gy[row + c];
        if constexpr (kGate) {
          const float sig = sigmoid(r[row + c]);
          gr[row + c] = gyt * yt * sig * (1.0f - sig);
          gyt *= sig;
        }
        const float g = gyt / den;
        const float ek = exp_vec(kt + rho[c]);
        const float bonus = e2 * g;
        // a k beyond kMaxK was read as kMaxK: no gradient reaches it (as through a clamp)
        gk[row + c] = kraw > wkv::kMaxK ? 0.0f : (rs[c] * vt + ss[c]) * ek + bonus * (vt - yt);
        gv[row + c] = rs[c] * ek + bonus;
        gu[c] += static_cast<double>(bonus * (vt - yt));
        gw[c] += static_cast<double>((rs[c] * a + ss[c] * b) * exp_vec(w[c] + p + rho[c]));
        // rho <- max(rho + w, -q); one of the two factors is 1
        const float rw = rho[c] + w[c], gap2 = rw + q;
        const float f = exp_vec(-std::abs(gap2));
        const float f1 = gap2 >= 0 ? 1.0f : f, f2 = gap2 >= 0 ? f : 1.0f;
        rs[c] = f1 * rs[c] + f2 * g;
        ss[c] = f1 * ss[c] - f2 * g * yt;
        rho[c] = gap2 >= 0 ? rw : -q;
      }
    }
  }
}

void check_io(const Tensor& k, const Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.sizes() == k.sizes() && x.scalar_type() == k.scalar_type(),
              "wkv_cpu: ", name, " must be a CPU tensor of k's shape and dtype");
}

void check_float(const Tensor& x, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.sizes() == shape,
              "wkv_cpu: ", name, " must be float32 of shape ", shape, ", got ", x.sizes());
}

void check_common(const Tensor& decay, const Tensor& u, const Tensor& k, const Tensor& v,
                  const OptTensor& r) {
  TORCH_CHECK(k.device().is_cpu() && k.dim() == 3, "wkv_cpu: k must be a (B, T, C) CPU tensor");
  TORCH_CHECK(k.size(0) > 0 && k.size(1) > 0 && k.size(2) > 0, "wkv_cpu: B, T, C must be >= 1");
  const auto dtype = k.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "wkv_cpu: k must be float32, bfloat16 or float16");
  check_io(k, v, "v");
  if (r) check_io(k, *r, "r");
  check_float(decay, {k.size(2)}, "decay");
  check_float(u, {k.size(2)}, "first");
}

Tensor as_float(const Tensor& x) { return x.to(at::kFloat).contiguous(); }

// w = -e^decay, with decay read as at most kMaxDecay
Tensor decay_to_w(const Tensor& decay) {
  return -decay.contiguous().clamp_max(wkv::kMaxDecay).exp();
}

// body(batch row, first channel, channels in the block, offset of [row, 0, first channel])
// for every block, spread over torch's intra-op threads
template <typename F>
void for_each_block(const Dims& d, const F& body) {
  at::parallel_for(0, d.B * d.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bi = item / d.blocks, c0 = (item % d.blocks) * kLanes;
      body(bi, c0, std::min(kLanes, d.C - c0), bi * d.T * d.C + c0);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> wkv_forward_cpu(const Tensor& decay, const Tensor& first,
                                                   const Tensor& k, const Tensor& v,
                                                   const OptTensor& state, const OptTensor& r) {
  check_common(decay, first, k, v, r);
  const Dims d = dims_of(k);
  Tensor state_out;
  if (state) {
    check_float(*state, {d.B, 3, d.C}, "state");
    state_out = state->contiguous().clone();
    state_out.select(1, 2).clamp_min_(wkv::kEmptyP);  // p = -inf would give inf - inf
  } else {
    state_out = at::zeros({d.B, 3, d.C}, k.options().dtype(at::kFloat));
    state_out.select(1, 2).fill_(wkv::kEmptyP);
  }
  const Tensor k32 = as_float(k), v32 = as_float(v), w = decay_to_w(decay);
  const Tensor u = first.contiguous(), r32 = r ? as_float(*r) : Tensor();
  auto y = at::empty_like(k32);
  auto saved = at::empty({d.B, d.N, 3, d.C}, k32.options());
  const float *pw = w.data_ptr<float>(), *pu = u.data_ptr<float>();
  const float *pk = k32.data_ptr<float>(), *pv = v32.data_ptr<float>();
  const float* pr = r ? r32.data_ptr<float>() : nullptr;
  float *py = y.data_ptr<float>(), *ps = state_out.data_ptr<float>();
  float* psaved = saved.data_ptr<float>();
  for_each_block(d, [&](int64_t bi, int64_t c0, int64_t n, int64_t io) {
    float* s = ps + bi * 3 * d.C + c0;
    float* to = psaved + bi * d.N * 3 * d.C + c0;
    if (pr != nullptr) {
      forward_block<true>(d, n, pw + c0, pu + c0, pk + io, pv + io, pr + io, py + io, to, s,
                          s + d.C, s + 2 * d.C);
    } else {
      forward_block<false>(d, n, pw + c0, pu + c0, pk + io, pv + io, nullptr, py + io, to, s,
                           s + d.C, s + 2 * d.C);
    }
  });
  return {y.to(k.scalar_type()), state_out, saved};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> wkv_backward_cpu(
    const Tensor& decay, const Tensor& first, const Tensor& k, const Tensor& v,
    const OptTensor& state, const OptTensor& r, const Tensor& saved, const Tensor& state_out,
    const Tensor& gy, const OptTensor& gstate) {
  check_common(decay, first, k, v, r);
  const Dims d = dims_of(k);
  check_float(saved, {d.B, d.N, 3, d.C}, "saved");
  check_float(state_out, {d.B, 3, d.C}, "state_out");
  TORCH_CHECK(gy.device().is_cpu() && gy.sizes() == k.sizes(),
              "wkv_cpu: gy must be a CPU tensor of k's shape");
  // the gradient state (r, s, rho) starts from the final state's gradient: dL/dA_T = g_a e^-p_T
  Tensor grad = at::zeros({d.B, 3, d.C}, k.options().dtype(at::kFloat));
  if (gstate) {
    check_float(*gstate, {d.B, 3, d.C}, "gstate");
    grad.narrow(1, 0, 2).copy_(gstate->narrow(1, 0, 2));
  }
  grad.select(1, 2).copy_(-state_out.select(1, 2));
  const Tensor k32 = as_float(k), v32 = as_float(v), gy32 = as_float(gy);
  const Tensor r32 = r ? as_float(*r) : Tensor(), saved32 = saved.contiguous();
  const Tensor w = decay_to_w(decay), u = first.contiguous();
  auto gk = at::empty_like(k32), gv = at::empty_like(v32);
  auto gr = r ? at::empty_like(k32) : at::empty({0}, k32.options());
  auto gw = at::zeros({d.B, d.C}, k32.options().dtype(at::kDouble));
  auto gu = at::zeros({d.B, d.C}, k32.options().dtype(at::kDouble));
  const float *pw = w.data_ptr<float>(), *pu = u.data_ptr<float>();
  const float *pk = k32.data_ptr<float>(), *pv = v32.data_ptr<float>();
  const float *pgy = gy32.data_ptr<float>(), *psaved = saved32.data_ptr<float>();
  const float* pr = r ? r32.data_ptr<float>() : nullptr;
  float *pgk = gk.data_ptr<float>(), *pgv = gv.data_ptr<float>(), *pg = grad.data_ptr<float>();
  float* pgr = r ? gr.data_ptr<float>() : nullptr;
  double *pgw = gw.data_ptr<double>(), *pgu = gu.data_ptr<double>();
  for_each_block(d, [&](int64_t bi, int64_t c0, int64_t n, int64_t io) {
    float* g = pg + bi * 3 * d.C + c0;
    const float* from = psaved + bi * d.N * 3 * d.C + c0;
    if (pr != nullptr) {
      backward_block<true>(d, n, pw + c0, pu + c0, pk + io, pv + io, pr + io, pgy + io, from,
                           pgk + io, pgv + io, pgr + io, g, g + d.C, g + 2 * d.C,
                           pgw + bi * d.C + c0, pgu + bi * d.C + c0);
    } else {
      backward_block<false>(d, n, pw + c0, pu + c0, pk + io, pv + io, nullptr, pgy + io, from,
                            pgk + io, pgv + io, nullptr, g, g + d.C, g + 2 * d.C,
                            pgw + bi * d.C + c0, pgu + bi * d.C + c0);
    }
  });
  // dL/ddecay = dL/dw * w; a decay beyond kMaxDecay was read as kMaxDecay: no gradient
  auto gdecay = at::where(decay > wkv::kMaxDecay, 0.0, gw.sum(0) * w.to(at::kDouble))
                    .to(at::kFloat);
  auto gfirst = gu.sum(0).to(at::kFloat);
  Tensor gstate_in = at::empty({0}, k32.options());
  if (state) {
    // dL/da0 = r e^{rho + p0}, likewise b; p0's gradient through A = a0 e^p0 and B = b0 e^p0
    const auto initial = saved32.select(1, 0);
    const auto a0 = initial.select(1, 0), b0 = initial.select(1, 1), p0 = initial.select(1, 2);
    const auto scale = (grad.select(1, 2) + p0).exp();
    const auto ga = grad.select(1, 0) * scale, gb = grad.select(1, 1) * scale;
    gstate_in = at::stack({ga, gb, ga * a0 + gb * b0}, 1);
  }
  const auto dtype = k.scalar_type();
  return {gdecay, gfirst, gk.to(dtype), gv.to(dtype), gstate_in, gr.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(rwkv_signal, CPU, m) {
  m.impl("wkv", &wkv_forward_cpu);
  m.impl("wkv_backward", &wkv_backward_cpu);
}
