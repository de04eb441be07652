// The WKV operator on the CPU: forward and backward, the same math, state convention and
// gradient convention as models/wkv.py (`wkv_reference`, `wkv_reference_backward`), and the
// same boundary as the CUDA kernel (wkv_op.cpp), so models/wkv_ops.py calls both alike (there
// is no one-thread-per-channel variant here: `sequential` must be false).
//
// Work is split over (batch, block of kLanes channels) with at::parallel_for, so it follows
// torch.set_num_threads. Inside a block, time is the outer loop and the channels the inner
// one: k[b, t, c0:c0+kLanes] is contiguous, and the inner loops vectorise.
//
// Numbers: float32 state (a, b, p) with the running-max scale p, as the CUDA kernel; bfloat16
// and float16 inputs are widened to float32 at the boundary (their conversions have branches
// that keep the loops from vectorising) and the outputs rounded back. The gradients of decay
// and first are sums over B*T terms, accumulated in double. The forward saves the state entering every kChunk steps; the backward recomputes the
// states of one chunk from it into a small scratch buffer, so memory is O(B*T*C/kChunk) and
// nothing depends on a maximum T.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunk = 16;  // steps per saved state (as the CUDA kernel's chunk_states)
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

struct Dims {
  int64_t B, T, C, N;  // N = number of chunks
  int64_t blocks;      // channel blocks per batch row
};

Dims dims_of(const at::Tensor& k) {
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  return {B, T, C, (T + kChunk - 1) / kChunk, (C + kLanes - 1) / kLanes};
}

// One (batch row, channel block): y for every step, the final state, and the state entering
// every chunk. a, b, p enter holding the initial state.
void forward_block(const Dims& d, int64_t n, const float* __restrict__ w,
                   const float* __restrict__ u, const float* __restrict__ k,
                   const float* __restrict__ v, float* __restrict__ y,
                   float* __restrict__ chunks, float* __restrict__ a, float* __restrict__ b,
                   float* __restrict__ p) {
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t row = t * d.C;
    if (t % kChunk == 0) {
      float* saved = chunks + (t / kChunk) * 3 * d.C;
      std::copy(a, a + n, saved);
      std::copy(b, b + n, saved + d.C);
      std::copy(p, p + n, saved + 2 * d.C);
    }
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const float kt = k[row + c], vt = v[row + c];
      // output: q = max(p, u + k); one of the two factors is e^0 = 1
      const float ww = u[c] + kt, gap = p[c] - ww;
      const float e = exp_vec(-std::abs(gap));
      const float e1 = gap >= 0 ? 1.0f : e, e2 = gap >= 0 ? e : 1.0f;
      y[row + c] = ((e1 * a[c] + e2 * vt) / (e1 * b[c] + e2));
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

// One (batch row, channel block) of wkv_reference_backward, chunk by chunk in reverse time.
// r, s, rho enter holding the final state's gradient; gw, gu accumulate over the row.
void backward_block(const Dims& d, int64_t n, const float* __restrict__ w,
                    const float* __restrict__ u, const float* __restrict__ k,
                    const float* __restrict__ v, const float* __restrict__ gy,
                    const float* __restrict__ chunks, float* __restrict__ gk,
                    float* __restrict__ gv, float* __restrict__ r, float* __restrict__ s,
                    float* __restrict__ rho, double* __restrict__ gw, double* __restrict__ gu) {
  // states entering each step of one chunk: [step][a|b|p][lane]
  float sa[kChunk][kLanes], sb[kChunk][kLanes], sp[kChunk][kLanes];
  for (int64_t chunk = d.N - 1; chunk >= 0; --chunk) {
    const int64_t t0 = chunk * kChunk, len = std::min(kChunk, d.T - t0);
    const float* saved = chunks + chunk * 3 * d.C;
    std::copy(saved, saved + n, sa[0]);
    std::copy(saved + d.C, saved + d.C + n, sb[0]);
    std::copy(saved + 2 * d.C, saved + 2 * d.C + n, sp[0]);
    for (int64_t j = 0; j + 1 < len; ++j) {
      const int64_t row = (t0 + j) * d.C;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const float kt = k[row + c], vt = v[row + c];
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
        const float kt = k[row + c], vt = v[row + c];
        const float a = sa[j][c], b = sb[j][c], p = sp[j][c];
        const float ww = u[c] + kt, gap = p - ww;
        const float e = exp_vec(-std::abs(gap));
        const float e1 = gap >= 0 ? 1.0f : e, e2 = gap >= 0 ? e : 1.0f;
        const float q = gap >= 0 ? p : ww;
        const float den = e1 * b + e2;  // D_t = den e^q
        const float yt = (e1 * a + e2 * vt) / den;
        const float g = gy[row + c] / den;
        const float ek = exp_vec(kt + rho[c]);
        const float bonus = e2 * g;
        gk[row + c] = ((r[c] * vt + s[c]) * ek + bonus * (vt - yt));
        gv[row + c] = (r[c] * ek + bonus);
        gu[c] += static_cast<double>(bonus * (vt - yt));
        gw[c] += static_cast<double>((r[c] * a + s[c] * b) * exp_vec(w[c] + p + rho[c]));
        // rho <- max(rho + w, -q); one of the two factors is 1
        const float rw = rho[c] + w[c], gap2 = rw + q;
        const float f = exp_vec(-std::abs(gap2));
        const float f1 = gap2 >= 0 ? 1.0f : f, f2 = gap2 >= 0 ? f : 1.0f;
        r[c] = f1 * r[c] + f2 * g;
        s[c] = f1 * s[c] - f2 * g * yt;
        rho[c] = gap2 >= 0 ? rw : -q;
      }
    }
  }
}

void check_common(const at::Tensor& decay, const at::Tensor& u, const at::Tensor& k,
                  const at::Tensor& v) {
  TORCH_CHECK(k.device().is_cpu() && k.dim() == 3 && k.is_contiguous(),
              "wkv_cpu: k must be a contiguous (B, T, C) CPU tensor");
  TORCH_CHECK(k.size(0) > 0 && k.size(1) > 0 && k.size(2) > 0, "wkv_cpu: B, T, C must be >= 1");
  const auto dtype = k.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "wkv_cpu: k must be float32, bfloat16 or float16");
  TORCH_CHECK(v.device().is_cpu() && v.is_contiguous() && v.sizes() == k.sizes() &&
                  v.scalar_type() == dtype,
              "wkv_cpu: v must be a contiguous CPU tensor of k's shape and dtype");
  for (const auto* x : {&decay, &u}) {
    TORCH_CHECK(x->device().is_cpu() && x->is_contiguous() && x->scalar_type() == at::kFloat &&
                    x->sizes() == at::IntArrayRef{k.size(2)},
                "wkv_cpu: decay and first must be contiguous float32 (C,)");
  }
}

void check_float(const at::Tensor& x, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.scalar_type() == at::kFloat &&
                  x.sizes() == shape,
              "wkv_cpu: ", name, " must be contiguous float32 of shape ", shape, ", got ",
              x.sizes());
}

at::Tensor minus_exp(const at::Tensor& decay) { return -decay.exp(); }  // w = -e^decay

at::Tensor as_float(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

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

std::vector<at::Tensor> forward(const at::Tensor& decay, const at::Tensor& u, const at::Tensor& k,
                                const at::Tensor& v, const std::optional<at::Tensor>& state,
                                bool sequential) {
  TORCH_CHECK(!sequential, "wkv_cpu: there is no sequential CPU kernel");
  check_common(decay, u, k, v);
  const Dims d = dims_of(k);
  at::Tensor state_out;
  if (state.has_value()) {
    check_float(*state, {d.B, 3, d.C}, "state");
    state_out = state->clone();
  } else {
    state_out = at::zeros({d.B, 3, d.C}, k.options().dtype(at::kFloat));
    state_out.select(1, 2).fill_(-1e38f);
  }
  const at::Tensor k32 = as_float(k), v32 = as_float(v), w = minus_exp(decay);
  auto y = at::empty_like(k32);
  auto chunks = at::empty({d.B, d.N, 3, d.C}, k32.options());
  const float *pw = w.data_ptr<float>(), *pu = u.data_ptr<float>();
  const float *pk = k32.data_ptr<float>(), *pv = v32.data_ptr<float>();
  float *py = y.data_ptr<float>(), *ps = state_out.data_ptr<float>();
  float* pc = chunks.data_ptr<float>();
  for_each_block(d, [&](int64_t bi, int64_t c0, int64_t n, int64_t io) {
    float* s = ps + bi * 3 * d.C + c0;
    forward_block(d, n, pw + c0, pu + c0, pk + io, pv + io, py + io,
                  pc + bi * d.N * 3 * d.C + c0, s, s + d.C, s + 2 * d.C);
  });
  return {y.to(k.scalar_type()), state_out, chunks};
}

std::vector<at::Tensor> backward(const at::Tensor& decay, const at::Tensor& u,
                                 const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& chunks, const at::Tensor& state_out,
                                 const at::Tensor& gy, const std::optional<at::Tensor>& gstate_out,
                                 bool has_state, bool sequential) {
  TORCH_CHECK(!sequential, "wkv_cpu: there is no sequential CPU kernel");
  check_common(decay, u, k, v);
  const Dims d = dims_of(k);
  check_float(chunks, {d.B, d.N, 3, d.C}, "chunk_states");
  check_float(state_out, {d.B, 3, d.C}, "state_out");
  TORCH_CHECK(gy.device().is_cpu() && gy.sizes() == k.sizes(),
              "wkv_cpu: gy must be a CPU tensor of k's shape");
  // the gradient state (r, s, rho) starts from the final state's gradient: dL/dA_T = g_a e^-p_T
  at::Tensor grad = at::zeros({d.B, 3, d.C}, k.options().dtype(at::kFloat));
  if (gstate_out.has_value()) {
    check_float(*gstate_out, {d.B, 3, d.C}, "gstate_out");
    grad.narrow(1, 0, 2).copy_(gstate_out->narrow(1, 0, 2));
  }
  grad.select(1, 2).copy_(-state_out.select(1, 2));
  const at::Tensor k32 = as_float(k), v32 = as_float(v), gy32 = as_float(gy);
  const at::Tensor w = minus_exp(decay);
  auto gk = at::empty_like(k32), gv = at::empty_like(v32);
  auto gw = at::zeros({d.B, d.C}, k32.options().dtype(at::kDouble));
  auto gu = at::zeros({d.B, d.C}, k32.options().dtype(at::kDouble));
  const float *pw = w.data_ptr<float>(), *pu = u.data_ptr<float>();
  const float *pk = k32.data_ptr<float>(), *pv = v32.data_ptr<float>();
  const float *pgy = gy32.data_ptr<float>(), *pc = chunks.data_ptr<float>();
  float *pgk = gk.data_ptr<float>(), *pgv = gv.data_ptr<float>(), *pg = grad.data_ptr<float>();
  double *pgw = gw.data_ptr<double>(), *pgu = gu.data_ptr<double>();
  for_each_block(d, [&](int64_t bi, int64_t c0, int64_t n, int64_t io) {
    float* g = pg + bi * 3 * d.C + c0;
    backward_block(d, n, pw + c0, pu + c0, pk + io, pv + io, pgy + io,
                   pc + bi * d.N * 3 * d.C + c0, pgk + io, pgv + io, g, g + d.C, g + 2 * d.C,
                   pgw + bi * d.C + c0, pgu + bi * d.C + c0);
  });
  auto gdecay = (gw.sum(0) * w.to(at::kDouble)).to(at::kFloat);  // dw/ddecay = w
  auto gfirst = gu.sum(0).to(at::kFloat);
  at::Tensor gstate_in = at::empty({0}, k32.options());
  if (has_state) {
    // dL/da0 = r e^{rho + p0}, likewise b; p0's gradient through A = a0 e^p0 and B = b0 e^p0
    const auto initial = chunks.select(1, 0);
    const auto a0 = initial.select(1, 0), b0 = initial.select(1, 1), p0 = initial.select(1, 2);
    const auto scale = (grad.select(1, 2) + p0).exp();
    const auto ga = grad.select(1, 0) * scale, gb = grad.select(1, 1) * scale;
    gstate_in = at::stack({ga, gb, ga * a0 + gb * b0}, 1);
  }
  return {gdecay, gfirst, gk.to(k.scalar_type()), gv.to(k.scalar_type()), gstate_in};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RWKV-4 WKV forward/backward on the CPU (at::parallel_for over batch x channels)";
  m.def("forward", &forward,
        "y, state_out, chunk_states = forward(decay, first, k, v, state or None, sequential)");
  m.def("backward", &backward,
        "gdecay, gfirst, gk, gv, gstate_in = backward(decay, first, k, v, chunk_states, "
        "state_out, gy, gstate_out or None, has_state, sequential)");
  m.attr("chunk") = kChunk;
}
