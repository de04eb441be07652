// The kernel boundary: one narrow, typed function per direction. Python (models/wkv_ops.py)
// registers them as torch.library custom ops and owns shapes, dtypes and user-facing checks;
// here we only refuse what would make the kernels read out of bounds.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "wkv_chunk.h"

std::vector<at::Tensor> wkv_forward_cuda(const at::Tensor& decay, const at::Tensor& u,
                                         const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& state, bool sequential);
std::vector<at::Tensor> wkv_backward_cuda(const at::Tensor& decay, const at::Tensor& u,
                                          const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& chunk_states,
                                          const at::Tensor& state_out, const at::Tensor& gy,
                                          const at::Tensor& gstate_out, bool has_state,
                                          bool sequential);

namespace {

void check_io(const at::Tensor& k, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.device() == k.device(), "wkv: ", name, " must be on ", k.device());
  TORCH_CHECK(x.is_contiguous(), "wkv: ", name, " must be contiguous");
  TORCH_CHECK(x.sizes() == k.sizes(), "wkv: ", name, " must have k's shape ", k.sizes());
  TORCH_CHECK(x.scalar_type() == k.scalar_type(), "wkv: ", name, " must have k's dtype");
}

void check_float(const at::Tensor& k, const at::Tensor& x, at::IntArrayRef shape,
                 const char* name) {
  TORCH_CHECK(x.is_cuda() && x.device() == k.device(), "wkv: ", name, " must be on ", k.device());
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat, "wkv: ", name,
              " must be contiguous float32");
  TORCH_CHECK(x.sizes() == shape, "wkv: ", name, " must have shape ", shape, ", got ", x.sizes());
}

void check_common(const at::Tensor& decay, const at::Tensor& u, const at::Tensor& k,
                  const at::Tensor& v) {
  TORCH_CHECK(k.is_cuda() && k.dim() == 3 && k.is_contiguous(),
              "wkv: k must be a contiguous (B, T, C) CUDA tensor");
  TORCH_CHECK(k.size(0) > 0 && k.size(1) > 0 && k.size(2) > 0, "wkv: B, T, C must be >= 1");
  TORCH_CHECK(k.numel() < (int64_t(1) << 31) * 16, "wkv: input too large");
  check_io(k, v, "v");
  check_float(k, decay, {k.size(2)}, "decay");
  check_float(k, u, {k.size(2)}, "u");
}

// state may be None: an empty initial state
std::vector<at::Tensor> forward(const at::Tensor& decay, const at::Tensor& u, const at::Tensor& k,
                                const at::Tensor& v, const std::optional<at::Tensor>& state,
                                bool sequential) {
  check_common(decay, u, k, v);
  at::Tensor s;
  if (state.has_value()) {
    s = *state;
    check_float(k, s, {k.size(0), 3, k.size(2)}, "state");
  }
  const c10::cuda::CUDAGuard guard(k.device());
  return wkv_forward_cuda(decay, u, k, v, s, sequential);
}

std::vector<at::Tensor> backward(const at::Tensor& decay, const at::Tensor& u,
                                 const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& chunk_states, const at::Tensor& state_out,
                                 const at::Tensor& gy,
                                 const std::optional<at::Tensor>& gstate_out, bool has_state,
                                 bool sequential) {
  check_common(decay, u, k, v);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  check_float(k, chunk_states, {B, (T + kChunk - 1) / kChunk, 3, C}, "chunk_states");
  check_float(k, state_out, {B, 3, C}, "state_out");
  at::Tensor gs;  // undefined: the final state's gradient is zero
  if (gstate_out.has_value()) {
    gs = *gstate_out;
    check_float(k, gs, {B, 3, C}, "gstate_out");
  }
  check_io(k, gy, "gy");
  const c10::cuda::CUDAGuard guard(k.device());
  return wkv_backward_cuda(decay, u, k, v, chunk_states, state_out, gy, gs, has_state,
                           sequential);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RWKV-4 WKV forward/backward, chunked-parallel CUDA kernels";
  m.def("forward", &forward,
        "y, state_out, chunk_states = forward(decay, first, k, v, state or None, sequential)");
  m.def("backward", &backward,
        "gdecay, gfirst, gk, gv, gstate_in = backward(decay, first, k, v, chunk_states, "
        "state_out, gy, gstate_out, has_state, sequential)");
  m.attr("chunk") = kChunk;
}
