// The CUDA kernel of rwkv_signal::wkv and rwkv_signal::wkv_backward (schema: wkv_op.cpp):
// checks that keep the kernels in bounds, outputs and scratch, one launch per direction on
// PyTorch's current stream (c10::cuda::getCurrentCUDAStream, which at::cuda re-exports; so
// CUDA graphs capture it), no host synchronisation.
// The kernels are in wkv_kernel.cuh. tests/wkv_emulation.cpp compiles this file for the CPU
// (WKV_EMULATION) to run the kernels' own code without a GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>

#include "wkv_kernel.cuh"

#ifndef WKV_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>
#include <set>

namespace {
// What differs under tests/wkv_emulation.h: the device, its guard, the launch.
bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
// Over 48 KB of shared memory a block (static and dynamic) needs the kernel's opt-in, which is
// per device: set once for each kernel, device and size (a kernel is always launched with the
// same size), then remembered, so a launch costs no driver call for it.
template <class Args>
void allow_dynamic_shared(void (*kernel)(Args), int bytes) {
  static std::mutex mutex;
  static std::set<std::tuple<const void*, int, int>> done;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel),
                                   static_cast<int>(c10::cuda::current_device()), bytes);
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count(key) > 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.insert(key);
}

// dynamic_shared: bytes of dynamic shared memory for the launch
template <class Args>
void launch(void (*kernel)(Args), unsigned grid, const Args& args, int dynamic_shared = 0) {
  if (dynamic_shared > 0) allow_dynamic_shared(kernel, dynamic_shared);
  kernel<<<grid, wkv::gpu::kThreads, dynamic_shared, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace
#endif

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using namespace wkv::gpu;

// Two channels a thread, whatever the dtype: forward rows of 16 steps (4 rows of 64 threads,
// tiles of 64 steps x 128 channels), backward rows of 8 (8 rows of 32 threads, a warp a row;
// tiles of 64 x 64). The backward holds the forward state of every step of its row in
// registers (8 steps x 2 channels) and its steps' values for the second walk (StepCache) in
// 64 KB of dynamic shared memory a block, 78 KB with the static: 2 blocks per SM on sm_90
// (128 registers a thread, no spills; sm_80 has room for 2 as well), 1 on sm_86/89.
// Measured on an H200 (B=8, T=3750, C=256; docs/wkv_kernel_timing.cu): against the earlier
// 4 channels x rows of 8 / 4 steps (the same tiles; 16 backward rows; registers spilled, 128
// bytes a thread stored and 248 loaded in the float32 backward), the float32 backward takes
// 0.0895 ms instead of 0.112 and the forward 0.0436 instead of 0.0475; bf16 with the gate
// 0.120 instead of 0.145; at T = 65,536 the backward 1.30 ms instead of 1.68. Fewer rows also
// mean one round less in the scan inside the tile and 8 predecessors a look-back round.
// 2 channels x rows of 4 steps at 3 blocks per SM (80 registers, some spilled; tiles of 32
// channels) was between the two (0.105 ms), 4 channels x rows of 2 at 3 blocks slower (0.145).
// Scalar shapes where C or an address does not allow vectors.
template <bool kVector>
using ForwardShape = Shape<kVector ? 2 : 1, 16>;
template <bool kVector>
using BackwardShape = Shape<kVector ? 2 : 1, 8>;

bool aligned(const void* p, int bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

// Vectors of V elements need C % V == 0 and every (B, T, C) pointer aligned to the vector.
template <typename T, int V>
bool vectors_fit(int64_t C, std::initializer_list<const Tensor*> tensors) {
  if (C % V != 0) return false;
  for (const Tensor* t : tensors)
    if (t->defined() && !aligned(t->data_ptr(), static_cast<int>(sizeof(T)) * V)) return false;
  return true;
}

void check_io(const Tensor& k, const Tensor& x, const char* name) {
  TORCH_CHECK(x.device() == k.device(), "wkv: ", name, " must be on ", k.device());
  TORCH_CHECK(x.sizes() == k.sizes() && x.scalar_type() == k.scalar_type(), "wkv: ", name,
              " must have k's shape and dtype");
}

void check_float(const Tensor& k, const Tensor& x, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(x.device() == k.device() && x.scalar_type() == at::kFloat && x.sizes() == shape,
              "wkv: ", name, " must be float32 of shape ", shape, " on ", k.device(), ", got ",
              x.sizes());
}

// The grid is 1-D (x up to 2^31 - 1); T, C and tile indices are int in the kernels.
Dims dims_for(const Tensor& k, int channels_per_tile) {
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(B > 0 && T > 0 && C > 0, "wkv: B, T, C must be >= 1");
  TORCH_CHECK(B <= kIntMax && T <= kIntMax - kTile && C <= kIntMax, "wkv: B, T or C too large");
  const int64_t NT = (T + kTile - 1) / kTile;
  const int64_t groups = (C + channels_per_tile - 1) / channels_per_tile;
  TORCH_CHECK(B * groups * NT < kIntMax, "wkv: input too large (", B * groups * NT,
              " tiles of ", kTile, " steps x ", channels_per_tile, " channels)");
  return {static_cast<int>(B), static_cast<int>(T), static_cast<int>(C), static_cast<int>(NT),
          static_cast<int>(groups)};
}

int64_t tiles_of(const Dims& d) { return static_cast<int64_t>(d.B) * d.groups * d.NT; }

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
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

template <typename T, class Sh>
void launch_forward(ForwardArgs<T> args, const Tensor& k, bool gated) {
  args.d = dims_for(k, Sh::CW);
  const int64_t tiles = tiles_of(args.d);
  const auto f32 = k.options().dtype(at::kFloat);
  // scratch: each tile's aggregate; the flags and the tile counter start at zero
  const Tensor aggregate = at::empty({args.d.B, args.d.NT, 3, args.d.C}, f32);
  const Tensor zeroed = at::zeros({tiles + 1}, k.options().dtype(at::kInt));
  args.aggregate = aggregate.data_ptr<float>();
  args.flags = zeroed.data_ptr<int>();
  args.counter = args.flags + tiles;
  launch(gated ? wkv_forward_kernel<T, Sh::V, Sh::S, true>
              : wkv_forward_kernel<T, Sh::V, Sh::S, false>,
         static_cast<unsigned>(tiles), args);
}

template <typename T, class Sh>
void launch_backward(BackwardArgs<T> args, const Tensor& k, bool gated) {
  args.d = dims_for(k, Sh::CW);
  const int64_t tiles = tiles_of(args.d);
  const auto f32 = k.options().dtype(at::kFloat);
  const Tensor aggregate = at::empty({2, args.d.B, args.d.NT, 3, args.d.C}, f32);
  // zeroed scratch: the double sums of dL/dw, dL/du (2 C), then the counters (2) and flags
  const int64_t sums_bytes = 2 * static_cast<int64_t>(args.d.C) * 8;
  const Tensor zeroed = at::zeros({sums_bytes + (tiles + 2) * 4}, k.options().dtype(at::kByte));
  args.aggregate = aggregate.data_ptr<float>();
  args.prefix = args.aggregate + aggregate.numel() / 2;
  args.sums = reinterpret_cast<double*>(zeroed.data_ptr<uint8_t>());
  args.counter = reinterpret_cast<int*>(zeroed.data_ptr<uint8_t>() + sums_bytes);
  args.flags = args.counter + 2;
  launch(gated ? wkv_backward_kernel<T, Sh::V, Sh::S, true>
              : wkv_backward_kernel<T, Sh::V, Sh::S, false>,
         static_cast<unsigned>(tiles), args, static_cast<int>(sizeof(StepCache<Sh>)));
}

std::tuple<Tensor, Tensor, Tensor> wkv_forward_cuda(const Tensor& decay_, const Tensor& first_,
                                                    const Tensor& k_, const Tensor& v_,
                                                    const OptTensor& state_,
                                                    const OptTensor& r_) {
  TORCH_CHECK(on_kernel_device(k_) && k_.dim() == 3, "wkv: k must be a (B, T, C) CUDA tensor");
  check_io(k_, v_, "v");
  if (r_) check_io(k_, *r_, "r");
  const int64_t B = k_.size(0), T = k_.size(1), C = k_.size(2);
  check_float(k_, decay_, {C}, "decay");
  check_float(k_, first_, {C}, "first");
  if (state_) check_float(k_, *state_, {B, 3, C}, "state");
  const DeviceGuard guard(k_.device());
  const Tensor k = k_.contiguous(), v = v_.contiguous(), decay = decay_.contiguous();
  const Tensor first = first_.contiguous();
  const Tensor r = r_ ? r_->contiguous() : Tensor();
  const Tensor state = state_ ? state_->contiguous() : Tensor();
  const auto f32 = k.options().dtype(at::kFloat);
  Tensor y = at::empty(k.sizes(), k.options());
  Tensor state_out = at::empty({B, 3, C}, f32);
  Tensor saved = at::empty({B, (T + kTile - 1) / kTile, 3, C}, f32);
  dispatch_io(k.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    ForwardArgs<T_> args{};
    args.decay = decay.data_ptr<float>();
    args.first = first.data_ptr<float>();
    args.k = k.data_ptr<T_>();
    args.v = v.data_ptr<T_>();
    args.r = ptr_or_null<T_>(r);
    args.state_in = ptr_or_null<float>(state);
    args.y = y.data_ptr<T_>();
    args.state_out = state_out.data_ptr<float>();
    args.saved = saved.data_ptr<float>();
    using Vec = ForwardShape<true>;
    if (vectors_fit<T_, Vec::V>(C, {&k, &v, &r, &y})) {
      launch_forward<T_, Vec>(args, k, r.defined());
    } else {
      launch_forward<T_, ForwardShape<false>>(args, k, r.defined());
    }
  });
  return {y, state_out, saved};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> wkv_backward_cuda(
    const Tensor& decay_, const Tensor& first_, const Tensor& k_, const Tensor& v_,
    const OptTensor& state_, const OptTensor& r_, const Tensor& saved_,
    const Tensor& state_out_, const Tensor& gy_, const OptTensor& gstate_) {
  TORCH_CHECK(on_kernel_device(k_) && k_.dim() == 3, "wkv: k must be a (B, T, C) CUDA tensor");
  check_io(k_, v_, "v");
  if (r_) check_io(k_, *r_, "r");
  const int64_t B = k_.size(0), T = k_.size(1), C = k_.size(2);
  check_float(k_, decay_, {C}, "decay");
  check_float(k_, first_, {C}, "first");
  check_float(k_, saved_, {B, (T + kTile - 1) / kTile, 3, C}, "saved");
  check_float(k_, state_out_, {B, 3, C}, "state_out");
  if (gstate_) check_float(k_, *gstate_, {B, 3, C}, "gstate");
  TORCH_CHECK(gy_.device() == k_.device() && gy_.sizes() == k_.sizes(),
              "wkv: gy must have k's shape, on k's device");
  const DeviceGuard guard(k_.device());
  const Tensor k = k_.contiguous(), v = v_.contiguous(), decay = decay_.contiguous();
  const Tensor first = first_.contiguous(), saved = saved_.contiguous();
  const Tensor state_out = state_out_.contiguous();
  const Tensor gy = gy_.to(k.scalar_type()).contiguous();  // autograd may hand in an expand
  const Tensor r = r_ ? r_->contiguous() : Tensor();
  const Tensor gstate = gstate_ ? gstate_->contiguous() : Tensor();
  const auto f32 = k.options().dtype(at::kFloat);
  Tensor gk = at::empty(k.sizes(), k.options()), gv = at::empty(k.sizes(), k.options());
  Tensor gr = r.defined() ? at::empty(k.sizes(), k.options()) : at::empty({0}, k.options());
  Tensor gstate_in = state_ ? at::empty({B, 3, C}, f32) : at::empty({0}, f32);
  Tensor gdecay = at::empty({C}, f32), gfirst = at::empty({C}, f32);
  dispatch_io(k.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    BackwardArgs<T_> args{};
    args.decay = decay.data_ptr<float>();
    args.first = first.data_ptr<float>();
    args.k = k.data_ptr<T_>();
    args.v = v.data_ptr<T_>();
    args.r = ptr_or_null<T_>(r);
    args.gy = gy.data_ptr<T_>();
    args.saved = saved.data_ptr<float>();
    args.state_out = state_out.data_ptr<float>();
    args.gstate = ptr_or_null<float>(gstate);
    args.gk = gk.data_ptr<T_>();
    args.gv = gv.data_ptr<T_>();
    args.gr = r.defined() ? gr.data_ptr<T_>() : nullptr;
    args.gstate_in = state_ ? gstate_in.data_ptr<float>() : nullptr;
    args.gdecay = gdecay.data_ptr<float>();
    args.gfirst = gfirst.data_ptr<float>();
    using Vec = BackwardShape<true>;
    const Tensor none;
    // (saved is read V floats at a time too: it must be aligned like the vectors)
    if (vectors_fit<T_, Vec::V>(C, {&k, &v, &gy, &r, &gk, &gv, r.defined() ? &gr : &none}) &&
        aligned(saved.data_ptr(), static_cast<int>(sizeof(float)) * Vec::V)) {
      launch_backward<T_, Vec>(args, k, r.defined());
    } else {
      launch_backward<T_, BackwardShape<false>>(args, k, r.defined());
    }
  });
  return {gdecay, gfirst, gk, gv, gstate_in, gr};
}

}  // namespace

#ifndef WKV_EMULATION
TORCH_LIBRARY_IMPL(rwkv_signal, CUDA, m) {
  m.impl("wkv", &wkv_forward_cuda);
  m.impl("wkv_backward", &wkv_backward_cuda);
}
#endif
