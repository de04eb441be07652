// The kernel timings behind docs/benchmarks.md's "Shared-memory layout and larger tiles" and
// "Two channels a thread" (issue 14): cuda/wkv_kernel.cuh's forward and backward kernels
// launched directly, without PyTorch, timed with CUDA events (each launch with its scratch
// memset, as the operator does), in the project's tile shapes and in the earlier ones.
//   nvcc -O3 -std=c++17 -arch=sm_90 --expt-relaxed-constexpr -Icuda \
//        -o wkv_kernel_timing docs/wkv_kernel_timing.cu && ./wkv_kernel_timing [ONLY]
// ONLY: run only the cases whose line starts with it, e.g. "bf16 gated 2x16/2x8 B=64" (for ncu).
// Each line: forward and backward ms and GB/s (k, v, y forward; k, v, gy, gk, gv backward; r and
// gr with the gate), the tiles of each launch, and checksums (equal across shapes of a dtype).
// The variants without a fence, atomics or look-back, and those with another minimum of blocks
// per SM in __launch_bounds__, were copies of the header edited for the one change.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "wkv_kernel.cuh"

using namespace wkv::gpu;

#define CHECK(x)                                                              \
  do {                                                                        \
    const cudaError_t e = (x);                                                \
    if (e != cudaSuccess) {                                                   \
      std::printf("CUDA error %s at line %d\n", cudaGetErrorString(e), __LINE__); \
      std::exit(1);                                                           \
    }                                                                         \
  } while (0)

// uniform values in [lo, hi) from a hash of the index: the same inputs on every run
template <typename E>
__global__ void fill(E* x, int64_t n, float lo, float hi, unsigned seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    unsigned h = static_cast<unsigned>(i * 2654435761u) ^ seed;
    h ^= h >> 13, h *= 0x5bd1e995, h ^= h >> 15;
    x[i] = static_cast<E>(lo + (hi - lo) * (h & 0xffffff) / 16777216.f);
  }
}

template <typename E>
E* device_array(int64_t n) {
  E* p = nullptr;
  CHECK(cudaMalloc(&p, n * sizeof(E)));
  return p;
}

// ms per launch of f over `iters` launches, after 5 warm-up launches
template <class F>
float time_ms(const F& f, int iters) {
  for (int i = 0; i < 5; ++i) f();
  CHECK(cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  cudaEventCreate(&start), cudaEventCreate(&stop);
  cudaEventRecord(start);
  for (int i = 0; i < iters; ++i) f();
  cudaEventRecord(stop);
  CHECK(cudaEventSynchronize(stop));
  float ms = 0.f;
  cudaEventElapsedTime(&ms, start, stop);
  cudaEventDestroy(start), cudaEventDestroy(stop);
  return ms / iters;
}

const char* only = nullptr;  // the command line's case filter, or null: every case

// forward FV channels x rows of FS steps a thread, backward BV x BS; kGate: sigmoid(r) * wkv
template <typename E, int FV, int FS, int BV, int BS, bool kGate = false>
void run(const char* name, int B, int T, int C, int iters) {
  char key[96], label[96];  // the case as ONLY is written, and as the line prints it
  std::snprintf(key, sizeof(key), "%s B=%d T=%d", name, B, T);
  std::snprintf(label, sizeof(label), "%-20s B=%d T=%d", name, B, T);
  if (only != nullptr && std::strncmp(key, only, std::strlen(only)) != 0) return;
  using SF = Shape<FV, FS>;
  using SB = Shape<BV, BS>;
  const int64_t n = static_cast<int64_t>(B) * T * C;
  const int NT = (T + kTile - 1) / kTile;
  const int64_t states = static_cast<int64_t>(B) * NT * 3 * C;
  E *k = device_array<E>(n), *v = device_array<E>(n), *y = device_array<E>(n);
  E *gy = device_array<E>(n), *gk = device_array<E>(n), *gv = device_array<E>(n);
  E *r = kGate ? device_array<E>(n) : nullptr, *gr = kGate ? device_array<E>(n) : nullptr;
  float *decay = device_array<float>(C), *first = device_array<float>(C);
  float *gdecay = device_array<float>(C), *gfirst = device_array<float>(C);
  float *state_out = device_array<float>(3 * static_cast<int64_t>(B) * C);
  float *saved = device_array<float>(states), *scratch = device_array<float>(2 * states);
  fill<<<1024, 256>>>(k, n, -2.f, 2.f, 1);
  fill<<<1024, 256>>>(v, n, -1.f, 1.f, 2);
  fill<<<1024, 256>>>(gy, n, -1.f, 1.f, 3);
  if (kGate) fill<<<1024, 256>>>(r, n, -3.f, 3.f, 9);
  fill<<<64, 256>>>(decay, C, -3.f, 1.f, 4);
  fill<<<64, 256>>>(first, C, -1.f, 1.f, 5);

  const Dims df{B, T, C, NT, (C + SF::CW - 1) / SF::CW};
  const Dims db{B, T, C, NT, (C + SB::CW - 1) / SB::CW};
  const int64_t tiles_f = static_cast<int64_t>(B) * df.groups * NT;
  const int64_t tiles_b = static_cast<int64_t>(B) * db.groups * NT;
  // zeroed scratch as the operator lays it out: forward flags + counter; backward double sums,
  // two counters, flags
  int* zero_f = device_array<int>(tiles_f + 1);
  const size_t zero_b_bytes = 2 * static_cast<size_t>(C) * 8 + (tiles_b + 2) * 4;
  unsigned char* zero_b = device_array<unsigned char>(zero_b_bytes);

  ForwardArgs<E> fa{};
  fa.decay = decay, fa.first = first, fa.k = k, fa.v = v, fa.r = r, fa.y = y;
  fa.state_out = state_out, fa.saved = saved, fa.aggregate = scratch;
  fa.flags = zero_f, fa.counter = zero_f + tiles_f, fa.d = df;
  BackwardArgs<E> ba{};
  ba.decay = decay, ba.first = first, ba.k = k, ba.v = v, ba.r = r, ba.gy = gy;
  ba.saved = saved, ba.state_out = state_out, ba.gk = gk, ba.gv = gv, ba.gr = gr;
  ba.gdecay = gdecay, ba.gfirst = gfirst, ba.aggregate = scratch, ba.prefix = scratch + states;
  ba.sums = reinterpret_cast<double*>(zero_b);
  ba.counter = reinterpret_cast<int*>(zero_b + 2 * static_cast<size_t>(C) * 8);
  ba.flags = ba.counter + 2, ba.d = db;

  const float fwd_ms = time_ms([&] {
    cudaMemsetAsync(zero_f, 0, (tiles_f + 1) * 4);
    wkv_forward_kernel<E, FV, FS, kGate><<<tiles_f, kThreads>>>(fa);
  }, iters);
  // the backward's dynamic shared memory (over 48 KB a block with the static: opted in)
  const int cache_bytes = static_cast<int>(sizeof(StepCache<SB>));
  CHECK(cudaFuncSetAttribute(wkv_backward_kernel<E, BV, BS, kGate>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, cache_bytes));
  const float bwd_ms = time_ms([&] {
    cudaMemsetAsync(zero_b, 0, zero_b_bytes);
    wkv_backward_kernel<E, BV, BS, kGate><<<tiles_b, kThreads, cache_bytes>>>(ba);
  }, iters);
  CHECK(cudaGetLastError());  // a launch that failed would time as fast

  std::vector<E> host_y(n), host_gk(n);
  std::vector<float> host_gdecay(C);
  CHECK(cudaMemcpy(host_y.data(), y, n * sizeof(E), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(host_gk.data(), gk, n * sizeof(E), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(host_gdecay.data(), gdecay, C * 4, cudaMemcpyDeviceToHost));
  double sum_y = 0, sum_gk = 0, sum_gdecay = 0;
  for (int64_t i = 0; i < n; i += 7) {
    sum_y += std::fabs(static_cast<float>(host_y[i]));
    sum_gk += std::fabs(static_cast<float>(host_gk[i]));
  }
  for (int c = 0; c < C; ++c) sum_gdecay += std::fabs(host_gdecay[c]);
  const double fwd_bytes = static_cast<double>(n) * sizeof(E) * (kGate ? 4 : 3);
  const double bwd_bytes = static_cast<double>(n) * sizeof(E) * (kGate ? 7 : 5);
  std::printf("%s C=%d  fwd %.4f ms (%.0f GB/s)  bwd %.4f ms (%.0f GB/s)  "
              "tiles %lld / %lld  sums y %.6e gk %.6e gdecay %.6e\n",
              label, C, fwd_ms, fwd_bytes / fwd_ms / 1e6, bwd_ms, bwd_bytes / bwd_ms / 1e6,
              static_cast<long long>(tiles_f), static_cast<long long>(tiles_b), sum_y, sum_gk,
              sum_gdecay);
  for (void* p : {static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(y),
                  static_cast<void*>(gy), static_cast<void*>(gk), static_cast<void*>(gv),
                  static_cast<void*>(r), static_cast<void*>(gr), static_cast<void*>(decay),
                  static_cast<void*>(first), static_cast<void*>(gdecay),
                  static_cast<void*>(gfirst), static_cast<void*>(state_out),
                  static_cast<void*>(saved), static_cast<void*>(scratch),
                  static_cast<void*>(zero_f), static_cast<void*>(zero_b)})
    cudaFree(p);  // null for the gate's arrays without it: a no-op
}

int main(int argc, char** argv) {
  using bf16 = __nv_bfloat16;
  if (argc > 1) only = argv[1];
  // WKV_TIMING_ITERS: launches per timing (default 200; 20 at T = 65,536), e.g. 1 under
  // compute-sanitizer
  const char* iters = std::getenv("WKV_TIMING_ITERS");
  const int it = iters != nullptr ? std::atoi(iters) : 200, it_long = it < 20 ? it : 20;
  if (it < 1) {
    std::printf("WKV_TIMING_ITERS must be a whole number >= 1, got '%s'\n", iters);
    return 2;
  }
  // "FVxFS/BVxBS": the project's shapes (2 channels x rows of 16 forward, 2 x 8 backward) and
  // the earlier 4 x 8 / 4 x 4, each at its call shapes
  run<float, 2, 16, 2, 8>("fp32 2x16/2x8", 8, 3750, 256, it);
  run<float, 4, 8, 4, 4>("fp32 4x8/4x4", 8, 3750, 256, it);
  run<float, 2, 16, 2, 8, true>("fp32 gated 2x16/2x8", 8, 3750, 256, it);
  run<float, 4, 8, 4, 4, true>("fp32 gated 4x8/4x4", 8, 3750, 256, it);
  run<bf16, 2, 16, 2, 8>("bf16 2x16/2x8", 8, 3750, 256, it);
  run<bf16, 4, 8, 4, 4>("bf16 4x8/4x4", 8, 3750, 256, it);
  run<bf16, 2, 16, 2, 8, true>("bf16 gated 2x16/2x8", 8, 3750, 256, it);
  run<bf16, 4, 8, 4, 4, true>("bf16 gated 4x8/4x4", 8, 3750, 256, it);
  run<bf16, 2, 16, 2, 8, true>("bf16 gated 2x16/2x8", 64, 938, 256, it);  // gpu.yaml's calls
  run<bf16, 4, 8, 4, 4, true>("bf16 gated 4x8/4x4", 64, 938, 256, it);
  run<float, 2, 16, 2, 8>("fp32 2x16/2x8", 1, 3750, 256, it);
  run<float, 4, 8, 4, 4>("fp32 4x8/4x4", 1, 3750, 256, it);
  run<float, 2, 16, 2, 8>("fp32 2x16/2x8", 8, 65536, 256, it_long);
  run<float, 4, 8, 4, 4>("fp32 4x8/4x4", 8, 65536, 256, it_long);
  run<bf16, 2, 16, 2, 8>("bf16 2x16/2x8", 8, 65536, 256, it_long);
  run<bf16, 4, 8, 4, 4>("bf16 4x8/4x4", 8, 65536, 256, it_long);
  return 0;
}
