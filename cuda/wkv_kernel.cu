// RWKV-4 WKV forward and backward, chunked-parallel over time.
//
// The math is models/wkv.py's reference (read that first); state (a, b, p) means
// A = a e^p, B = b e^p. One thread owns one (batch, chunk, channel): a warp reads 32
// neighbouring channels of one time step, so every load is coalesced.
//
// Forward:  (1) fwd_summary: each chunk's state when started from empty, all chunks at once
//           (2) fwd_scan:    per (batch, channel), a segmented scan over the chunk summaries
//                            (see segmented_scan) writes the state entering every chunk,
//                            which the backward reuses
//           (3) fwd_output:  each chunk's outputs from its incoming state, all chunks at once
// Backward: the same three phases run in reverse time on the gradient state
//           R = dL/dA_t = r e^rho, S = dL/dB_t = s e^rho, which is linear with decay e^w:
//           gA_t = gy_t / D_t + e^w gA_{t+1},  gB_t = -gy_t y_t / D_t + e^w gB_{t+1}.
// Nothing per thread grows with T: a thread holds at most kChunk steps in registers.
// `*_sequential` kernels are the one-thread-per-channel baseline built from the same steps.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <vector>

#include "wkv_chunk.h"

namespace {

constexpr float kEmpty = -1e38f;  // p of an empty state; exp(kEmpty - x) == 0, never inf - inf
constexpr int kThreads = 256;

struct State {
  float a, b, p;
};

// I/O in float, half or bfloat16; all arithmetic in float
template <typename T>
__device__ __forceinline__ float load(const T* x, int64_t i) {
  return static_cast<float>(x[i]);
}
template <typename T>
__device__ __forceinline__ void store(T* x, int64_t i, float value) {
  x[i] = static_cast<T>(value);
}

__device__ __forceinline__ State load_state(const float* s, int64_t i, int C) {
  return {s[i], s[i + C], s[i + 2 * C]};
}
__device__ __forceinline__ void store_state(float* s, int64_t i, int C, State st) {
  s[i] = st.a;
  s[i + C] = st.b;
  s[i + 2 * C] = st.p;
}

// e^{x-m} and e^{y-m} with m = max(x, y): one of the two is 1, so one exp does. (Every
// exponential in the recurrence has this form; it halves the special-function work.)
struct ExpPair {
  float m, ex, ey;
};
__device__ __forceinline__ ExpPair exp_pair(float x, float y) {
  const float d = expf(-fabsf(x - y));
  return x >= y ? ExpPair{x, 1.f, d} : ExpPair{y, d, 1.f};
}

// y_t from the state before step t
__device__ __forceinline__ float step_output(const State& s, float u, float k, float v) {
  const ExpPair e = exp_pair(s.p, u + k);
  return (e.ex * s.a + e.ey * v) / (e.ex * s.b + e.ey);
}

// state after step t
__device__ __forceinline__ void step_state(State& s, float w, float k, float v) {
  const ExpPair e = exp_pair(s.p + w, k);
  s.a = e.ex * s.a + e.ey * v;
  s.b = e.ex * s.b + e.ey;
  s.p = e.m;
}

// s decayed over `decay` = length * w, plus a chunk's own contribution `local`.
// Works alike for forward states and for gradient states.
__device__ __forceinline__ void combine(State& s, const State& local, float decay) {
  const ExpPair e = exp_pair(s.p + decay, local.p);
  s.a = e.ex * s.a + e.ey * local.a;
  s.b = e.ex * s.b + e.ey * local.b;
  s.p = e.m;
}

struct Index {
  int b, n, c, len;
  int64_t base;  // element (b, n * kChunk, c) of a (B, T, C) tensor
  int64_t chunk_state;  // element (b, n, 0, c) of a (B, N, 3, C) tensor
};

__device__ __forceinline__ bool chunk_index(int B, int T, int C, int N, Index& ix) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= static_cast<int64_t>(B) * N * C) return false;
  ix.c = static_cast<int>(id % C);
  ix.n = static_cast<int>((id / C) % N);
  ix.b = static_cast<int>(id / (static_cast<int64_t>(C) * N));
  ix.len = min(kChunk, T - ix.n * kChunk);
  ix.base = (static_cast<int64_t>(ix.b) * T + static_cast<int64_t>(ix.n) * kChunk) * C + ix.c;
  ix.chunk_state = (static_cast<int64_t>(ix.b) * N + ix.n) * 3 * C + ix.c;
  return true;
}

// A chunk's k and v (len <= kChunk steps from `base`, C apart) into registers; all loads are
// issued before any use.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ k, const T* __restrict__ v,
                                           int64_t base, int C, int len, float (&kk)[kChunk],
                                           float (&vv)[kChunk]) {
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (j < len) {
      kk[j] = load(k, base + static_cast<int64_t>(j) * C);
      vv[j] = load(v, base + static_cast<int64_t>(j) * C);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

template <typename T>
__global__ void fwd_summary(const T* __restrict__ k, const T* __restrict__ v,
                            const float* __restrict__ decay, float* __restrict__ summary, int B,
                            int T_, int C, int N) {
  Index ix;
  if (!chunk_index(B, T_, C, N, ix)) return;
  float kk[kChunk], vv[kChunk];
  load_chunk(k, v, ix.base, C, ix.len, kk, vv);
  const float ww = -expf(decay[ix.c]);
  State s{0.f, 0.f, kEmpty};
#pragma unroll
  for (int j = 0; j < kChunk; ++j)
    if (j < ix.len) step_state(s, ww, kk[j], vv[j]);
  store_state(summary, ix.chunk_state, C, s);
}

__device__ __forceinline__ State initial_state(const float* state_in, int b, int c, int C) {
  if (state_in == nullptr) return {0.f, 0.f, kEmpty};
  return load_state(state_in, static_cast<int64_t>(b) * 3 * C + c, C);
}

__device__ __forceinline__ int chunk_steps(int n, int T) { return min(kChunk, T - n * kChunk); }

// The scan over one (batch, channel)'s N chunk summaries, cut into blockDim.y segments so
// that its dependent chain is 2 N / S + S combines instead of N: (A) each segment folds its own
// chunks from empty, (B) each segment folds the segments before it into its entering state,
// (C) each segment walks its chunks again from there, writing the state entering each chunk.
// The block is (32 channels) x (S segments). Returns the state after the segment; in the
// last segment, the state after all chunks. kReverse walks chunks from last to first.
constexpr int kScanLanes = 32, kMaxSegments = 32;

template <bool kReverse>
__device__ State segmented_scan(const float* __restrict__ summary, float* __restrict__ entering,
                                State init, float w, int b, int c, int C, int N, int T,
                                bool active) {
  __shared__ State seg_state[kMaxSegments][kScanLanes];
  __shared__ float seg_steps[kMaxSegments][kScanLanes];
  const int segments = blockDim.y, seg = threadIdx.y, lane = threadIdx.x;
  const int per = (N + segments - 1) / segments;
  const int m0 = min(N, seg * per), m1 = min(N, m0 + per);
  auto chunk_at = [N](int m) { return kReverse ? N - 1 - m : m; };
  auto at = [&](int n) { return (static_cast<int64_t>(b) * N + n) * 3 * C + c; };

  State s{0.f, 0.f, kEmpty};
  float steps = 0.f;
  if (active) {
#pragma unroll 4
    for (int m = m0; m < m1; ++m) {
      const int n = chunk_at(m);
      const float len = static_cast<float>(chunk_steps(n, T));
      combine(s, load_state(summary, at(n), C), len * w);
      steps += len;
    }
  }
  seg_state[seg][lane] = s;
  seg_steps[seg][lane] = steps;
  __syncthreads();
  s = init;
  for (int j = 0; j < seg; ++j) combine(s, seg_state[j][lane], seg_steps[j][lane] * w);
  if (active) {
#pragma unroll 4
    for (int m = m0; m < m1; ++m) {
      const int n = chunk_at(m);
      store_state(entering, at(n), C, s);
      combine(s, load_state(summary, at(n), C), static_cast<float>(chunk_steps(n, T)) * w);
    }
  }
  return s;
}

__global__ void fwd_scan(const float* __restrict__ summary, const float* __restrict__ state_in,
                         const float* __restrict__ decay, float* __restrict__ chunk_states,
                         float* __restrict__ state_out, int B, int T, int C, int N) {
  const int c = blockIdx.x * kScanLanes + threadIdx.x, b = blockIdx.y;
  const bool active = c < C;
  const float w = active ? -expf(decay[c]) : 0.f;
  const State init = active ? initial_state(state_in, b, c, C) : State{0.f, 0.f, kEmpty};
  const State s = segmented_scan<false>(summary, chunk_states, init, w, b, c, C, N, T, active);
  if (active && threadIdx.y == blockDim.y - 1)
    store_state(state_out, static_cast<int64_t>(b) * 3 * C + c, C, s);
}

template <typename T>
__global__ void fwd_output(const T* __restrict__ k, const T* __restrict__ v,
                           const float* __restrict__ decay, const float* __restrict__ u,
                           const float* __restrict__ chunk_states, T* __restrict__ y, int B,
                           int T_, int C, int N) {
  Index ix;
  if (!chunk_index(B, T_, C, N, ix)) return;
  float kk[kChunk], vv[kChunk];
  load_chunk(k, v, ix.base, C, ix.len, kk, vv);
  const float ww = -expf(decay[ix.c]), uu = u[ix.c];
  State s = load_state(chunk_states, ix.chunk_state, C);
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (j < ix.len) {
      store(y, ix.base + static_cast<int64_t>(j) * C, step_output(s, uu, kk[j], vv[j]));
      step_state(s, ww, kk[j], vv[j]);
    }
  }
}

// Baseline: one thread per (batch, channel) walks all of T. Also records the state entering
// every chunk, so the backward is shared with the chunked path.
template <typename T>
__global__ void fwd_sequential(const T* __restrict__ k, const T* __restrict__ v,
                               const float* __restrict__ decay, const float* __restrict__ u,
                               const float* __restrict__ state_in, T* __restrict__ y,
                               float* __restrict__ chunk_states, float* __restrict__ state_out,
                               int B, int T_, int C, int N) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= static_cast<int64_t>(B) * C) return;
  const int c = static_cast<int>(id % C), b = static_cast<int>(id / C);
  const float ww = -expf(decay[c]), uu = u[c];
  State s = initial_state(state_in, b, c, C);
  for (int t = 0; t < T_; ++t) {
    if (t % kChunk == 0)
      store_state(chunk_states, (static_cast<int64_t>(b) * N + t / kChunk) * 3 * C + c, C, s);
    const int64_t i = (static_cast<int64_t>(b) * T_ + t) * C + c;
    const float kt = load(k, i), vt = load(v, i);
    store(y, i, step_output(s, uu, kt, vt));
    step_state(s, ww, kt, vt);
  }
  store_state(state_out, static_cast<int64_t>(b) * 3 * C + c, C, s);
}

// ---------------------------------------------------------------------------------------------
// Backward

// Walks one chunk backwards. `s` is the forward state entering the chunk, `R` the gradient
// state (r, s, rho) entering from the chunk's end; on return R is the gradient state at the
// chunk's start. With kGrads, writes gk, gv and accumulates the w and u gradients.
template <typename T, bool kGrads>
__device__ __forceinline__ void chunk_backward(const T* __restrict__ k, const T* __restrict__ v,
                                               const T* __restrict__ gy, T* __restrict__ gk,
                                               T* __restrict__ gv, int64_t base, int C, int len,
                                               float w, float u, State s, State& R, float& gw,
                                               float& gu) {
  float kk[kChunk], vv[kChunk], gg[kChunk], sa[kChunk], sb[kChunk], sp[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (j < len) {
      kk[j] = load(k, base + static_cast<int64_t>(j) * C);
      vv[j] = load(v, base + static_cast<int64_t>(j) * C);
      gg[j] = load(gy, base + static_cast<int64_t>(j) * C);
    }
  }
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (j < len) {
      sa[j] = s.a;
      sb[j] = s.b;
      sp[j] = s.p;
      step_state(s, w, kk[j], vv[j]);
    }
  }
#pragma unroll
  for (int j = kChunk - 1; j >= 0; --j) {
    if (j < len) {
      const ExpPair e = exp_pair(sp[j], u + kk[j]);
      const float q = e.m, e1 = e.ex, e2 = e.ey;
      const float inv_d = 1.f / (e1 * sb[j] + e2);  // D_t = d e^q, d >= 1
      const float y = (e1 * sa[j] + e2 * vv[j]) * inv_d;
      const float g = gg[j] * inv_d;  // gy_t / D_t = g e^{-q}
      if (kGrads) {
        // e^{k_t} R <= 1: R's terms are e^{(s-t-1)w}/D_s and D_s holds e^{(s-1-t)w + k_t}
        const float ek = expf(kk[j] + R.p);
        const float bonus = e2 * g;  // e^{u+k_t} gy_t / D_t
        const int64_t i = base + static_cast<int64_t>(j) * C;
        store(gk, i, (R.a * vv[j] + R.b) * ek + bonus * (vv[j] - y));
        store(gv, i, R.a * ek + bonus);
        gu += bonus * (vv[j] - y);
        gw += (R.a * sa[j] + R.b * sb[j]) * expf(w + sp[j] + R.p);
      }
      const ExpPair f = exp_pair(R.p + w, -q);
      R.a = f.ex * R.a + f.ey * g;
      R.b = f.ex * R.b - f.ey * g * y;
      R.p = f.m;
    }
  }
}

template <typename T>
__global__ void bwd_summary(const T* __restrict__ k, const T* __restrict__ v,
                            const T* __restrict__ gy, const float* __restrict__ decay,
                            const float* __restrict__ u, const float* __restrict__ chunk_states,
                            float* __restrict__ summary, int B, int T_, int C, int N) {
  Index ix;
  if (!chunk_index(B, T_, C, N, ix)) return;
  State R{0.f, 0.f, kEmpty};
  float unused_w = 0.f, unused_u = 0.f;
  chunk_backward<T, false>(k, v, gy, nullptr, nullptr, ix.base, C, ix.len,
                           -expf(decay[ix.c]), u[ix.c],
                           load_state(chunk_states, ix.chunk_state, C), R, unused_w, unused_u);
  store_state(summary, ix.chunk_state, C, R);
}

// dL/d(initial state) from the gradient state at t = 0: A_0 = a0 e^{p0}.
// The initial state is the state entering chunk 0 of batch row b.
__device__ __forceinline__ void store_state_grad(float* gstate_in, const float* chunk_states,
                                                 int b, int c, int C, int N, const State& R) {
  if (gstate_in == nullptr) return;  // the caller passed no initial state
  const State s0 = load_state(chunk_states, static_cast<int64_t>(b) * N * 3 * C + c, C);
  const float scale = expf(R.p + s0.p);
  const float ga = R.a * scale, gb = R.b * scale;
  store_state(gstate_in, static_cast<int64_t>(b) * 3 * C + c, C, {ga, gb, ga * s0.a + gb * s0.b});
}

// gradient state entering from the final state's gradient: dL/dA_T = g_a e^{-p_T}
__device__ __forceinline__ State final_grad_state(const float* gstate_out, const float* state_out,
                                                  int64_t i, int C) {
  if (gstate_out == nullptr) return {0.f, 0.f, kEmpty};  // the final state was not used
  return {gstate_out[i], gstate_out[i + C], -state_out[i + 2 * C]};
}

__global__ void bwd_scan(const float* __restrict__ summary, const float* __restrict__ gstate_out,
                         const float* __restrict__ state_out,
                         const float* __restrict__ chunk_states, const float* __restrict__ decay,
                         float* __restrict__ grad_states, float* __restrict__ gstate_in, int B,
                         int T, int C, int N) {
  const int c = blockIdx.x * kScanLanes + threadIdx.x, b = blockIdx.y;
  const bool active = c < C;
  const float w = active ? -expf(decay[c]) : 0.f;
  const int64_t si = static_cast<int64_t>(b) * 3 * C + c;
  const State init =
      active ? final_grad_state(gstate_out, state_out, si, C) : State{0.f, 0.f, kEmpty};
  const State R = segmented_scan<true>(summary, grad_states, init, w, b, c, C, N, T, active);
  if (active && threadIdx.y == blockDim.y - 1)
    store_state_grad(gstate_in, chunk_states, b, c, C, N, R);
}

// Blocks of (32 channels) x (kGradChunks chunks): the decay/first gradient partials are summed
// over the block's chunks in shared memory, so the final reduction reads 8x fewer partials.
constexpr int kGradChunks = 8;

template <typename T>
__global__ void bwd_grads(const T* __restrict__ k, const T* __restrict__ v,
                          const T* __restrict__ gy, const float* __restrict__ decay,
                          const float* __restrict__ u, const float* __restrict__ chunk_states,
                          const float* __restrict__ grad_states, T* __restrict__ gk,
                          T* __restrict__ gv, float* __restrict__ parts, int B, int T_, int C,
                          int N) {
  __shared__ float part_w[kGradChunks][kScanLanes], part_u[kGradChunks][kScanLanes];
  const int c = blockIdx.x * kScanLanes + threadIdx.x;
  const int n = blockIdx.y * kGradChunks + threadIdx.y, b = blockIdx.z;
  float gw = 0.f, gu = 0.f, ww = 0.f;
  if (c < C && n < N) {
    ww = -expf(decay[c]);
    const int64_t base = (static_cast<int64_t>(b) * T_ + static_cast<int64_t>(n) * kChunk) * C + c;
    const int64_t si = (static_cast<int64_t>(b) * N + n) * 3 * C + c;
    State R = load_state(grad_states, si, C);
    chunk_backward<T, true>(k, v, gy, gk, gv, base, C, chunk_steps(n, T_), ww, u[c],
                            load_state(chunk_states, si, C), R, gw, gu);
  }
  part_w[threadIdx.y][threadIdx.x] = gw * ww;  // dL/d decay = dL/dw * w
  part_u[threadIdx.y][threadIdx.x] = gu;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float sw = 0.f, su = 0.f;
#pragma unroll
    for (int j = 0; j < kGradChunks; ++j) {
      sw += part_w[j][threadIdx.x];
      su += part_u[j][threadIdx.x];
    }
    const int64_t rows = static_cast<int64_t>(B) * gridDim.y;
    const int64_t i = (static_cast<int64_t>(b) * gridDim.y + blockIdx.y) * C + c;
    parts[i] = sw;
    parts[rows * C + i] = su;
  }
}

// Baseline backward: one thread per (batch, channel) walks the chunks from last to first.
template <typename T>
__global__ void bwd_sequential(const T* __restrict__ k, const T* __restrict__ v,
                               const T* __restrict__ gy, const float* __restrict__ decay,
                               const float* __restrict__ u, const float* __restrict__ chunk_states,
                               const float* __restrict__ gstate_out,
                               const float* __restrict__ state_out, T* __restrict__ gk,
                               T* __restrict__ gv, float* __restrict__ parts,
                               float* __restrict__ gstate_in, int B,
                               int T_, int C, int N) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= static_cast<int64_t>(B) * C) return;
  const int c = static_cast<int>(id % C), b = static_cast<int>(id / C);
  const float ww = -expf(decay[c]), uu = u[c];
  State R = final_grad_state(gstate_out, state_out, static_cast<int64_t>(b) * 3 * C + c, C);
  float gw = 0.f, gu = 0.f;
  for (int n = N - 1; n >= 0; --n) {
    const int64_t base = (static_cast<int64_t>(b) * T_ + static_cast<int64_t>(n) * kChunk) * C + c;
    const State s = load_state(chunk_states, (static_cast<int64_t>(b) * N + n) * 3 * C + c, C);
    chunk_backward<T, true>(k, v, gy, gk, gv, base, C, min(kChunk, T_ - n * kChunk), ww, uu, s,
                            R, gw, gu);
  }
  parts[static_cast<int64_t>(b) * C + c] = gw * ww;
  parts[static_cast<int64_t>(B) * C + static_cast<int64_t>(b) * C + c] = gu;
  store_state_grad(gstate_in, chunk_states, b, c, C, N, R);
}

// Calls f with a value of the I/O element type: float, half or bfloat16.
template <typename F>
void dispatch_io(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "wkv: k and v must be float32, float16 or bfloat16; got ", type);
  }
}

unsigned blocks_for(int64_t threads) {
  return static_cast<unsigned>((threads + kThreads - 1) / kThreads);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Host entry points. Inputs are validated by wkv_op.cpp: CUDA, contiguous, float32 decay,
// first and state (state may be undefined: an empty initial state).

namespace {

const float* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

// The chunk scans run (32 channels) x (segments) blocks; ~8 chunks a segment balances the
// segment walks against the fold over segments.
dim3 scan_block(int N) { return dim3(kScanLanes, std::min(kMaxSegments, std::max(1, N / 8))); }
dim3 scan_grid(int B, int C) { return dim3((C + kScanLanes - 1) / kScanLanes, B); }

}  // namespace

std::vector<at::Tensor> wkv_forward_cuda(const at::Tensor& decay, const at::Tensor& u,
                                         const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& state, bool sequential) {
  const int B = k.size(0), T = k.size(1), C = k.size(2);
  const int N = (T + kChunk - 1) / kChunk;
  auto y = at::empty_like(k);
  auto fopts = k.options().dtype(at::kFloat);
  auto chunk_states = at::empty({B, N, 3, C}, fopts);
  auto state_out = at::empty({B, 3, C}, fopts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float* dp = decay.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  const float* sp = data_or_null(state);
  dispatch_io(k.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* kp = k.data_ptr<scalar_t>();
    const auto* vp = v.data_ptr<scalar_t>();
    auto* yp = y.data_ptr<scalar_t>();
    if (sequential) {
      fwd_sequential<scalar_t><<<blocks_for(int64_t(B) * C), kThreads, 0, stream>>>(
          kp, vp, dp, up, sp, yp, chunk_states.data_ptr<float>(), state_out.data_ptr<float>(), B,
          T, C, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    auto summary = at::empty({B, N, 3, C}, fopts);
    const unsigned grid = blocks_for(int64_t(B) * N * C);
    fwd_summary<scalar_t><<<grid, kThreads, 0, stream>>>(kp, vp, dp, summary.data_ptr<float>(),
                                                         B, T, C, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fwd_scan<<<scan_grid(B, C), scan_block(N), 0, stream>>>(
        summary.data_ptr<float>(), sp, dp, chunk_states.data_ptr<float>(),
        state_out.data_ptr<float>(), B, T, C, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fwd_output<scalar_t><<<grid, kThreads, 0, stream>>>(
        kp, vp, dp, up, chunk_states.data_ptr<float>(), yp, B, T, C, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, state_out, chunk_states};
}

std::vector<at::Tensor> wkv_backward_cuda(const at::Tensor& decay, const at::Tensor& u,
                                          const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& chunk_states,
                                          const at::Tensor& state_out, const at::Tensor& gy,
                                          const at::Tensor& gstate_out, bool has_state,
                                          bool sequential) {
  const int B = k.size(0), T = k.size(1), C = k.size(2);
  const int N = (T + kChunk - 1) / kChunk;
  auto gk = at::empty_like(k);
  auto gv = at::empty_like(v);
  auto fopts = k.options().dtype(at::kFloat);
  auto gstate_in = has_state ? at::empty({B, 3, C}, fopts) : at::empty({0}, fopts);
  float* gsp = has_state ? gstate_in.data_ptr<float>() : nullptr;
  // partial gradients of decay [0] and first [1], per (batch, group of chunks, channel)
  const int groups = (N + kGradChunks - 1) / kGradChunks;
  auto parts = at::empty({2, B * (sequential ? 1 : groups), C}, fopts);
  const float* gop = data_or_null(gstate_out);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float* dp = decay.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  dispatch_io(k.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* kp = k.data_ptr<scalar_t>();
    const auto* vp = v.data_ptr<scalar_t>();
    const auto* gp = gy.data_ptr<scalar_t>();
    auto* gkp = gk.data_ptr<scalar_t>();
    auto* gvp = gv.data_ptr<scalar_t>();
    if (sequential) {
      bwd_sequential<scalar_t><<<blocks_for(int64_t(B) * C), kThreads, 0, stream>>>(
          kp, vp, gp, dp, up, chunk_states.data_ptr<float>(), gop, state_out.data_ptr<float>(),
          gkp, gvp, parts.data_ptr<float>(), gsp, B, T, C, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    auto summary = at::empty({B, N, 3, C}, fopts);
    auto grad_states = at::empty({B, N, 3, C}, fopts);
    const unsigned grid = blocks_for(int64_t(B) * N * C);
    bwd_summary<scalar_t><<<grid, kThreads, 0, stream>>>(
        kp, vp, gp, dp, up, chunk_states.data_ptr<float>(), summary.data_ptr<float>(), B, T, C, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_scan<<<scan_grid(B, C), scan_block(N), 0, stream>>>(
        summary.data_ptr<float>(), gop, state_out.data_ptr<float>(),
        chunk_states.data_ptr<float>(), dp, grad_states.data_ptr<float>(), gsp, B, T, C, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grads_grid((C + kScanLanes - 1) / kScanLanes, groups, B);
    bwd_grads<scalar_t><<<grads_grid, dim3(kScanLanes, kGradChunks), 0, stream>>>(
        kp, vp, gp, dp, up, chunk_states.data_ptr<float>(), grad_states.data_ptr<float>(), gkp,
        gvp, parts.data_ptr<float>(), B, T, C, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // two reductions, not one sliced result: outputs of a custom op must not alias each other
  return {parts[0].sum(0), parts[1].sum(0), gk, gv, gstate_in};
}
