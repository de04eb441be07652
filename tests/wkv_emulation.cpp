// The CUDA kernel's host and device code (cuda/wkv_kernel.cu, cuda/wkv_kernel.cuh) compiled for
// the CPU over tests/wkv_emulation.h, as a Python module for tests/test_wkv_emulated.py. The
// functions take and return CPU tensors exactly as the CUDA kernel does CUDA tensors.
#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>

#define WKV_EMULATION
#include "wkv_emulation.h"

namespace {
bool on_kernel_device(const at::Tensor& t) { return t.device().is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
}  // namespace

#include "../cuda/wkv_kernel.cu"

namespace {

void configure(int concurrency, uint64_t seed, int release_delay) {
  auto& rt = wkv_emulation::Runtime::get();
  rt.options = {concurrency, seed, release_delay};
  rt.stats = {};
}

py::dict stats() {
  const auto& s = wkv_emulation::Runtime::get().stats;
  py::dict d;
  d["flag_loads"] = s.flag_loads;
  d["saw_not_ready"] = s.saw_not_ready;
  d["saw_aggregate"] = s.saw_aggregate;
  d["saw_prefix"] = s.saw_prefix;
  d["windows_continued"] = s.windows_continued;
  d["blocks"] = s.blocks;
  d["misaligned_vector_loads"] = s.misaligned_vector_loads;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("configure", &configure, "concurrency, seed, release_delay for the next launches");
  m.def("stats", &stats, "what the launches since configure() saw");
  m.def("forward", &wkv_forward_cuda, "rwkv_signal::wkv on the emulated GPU");
  m.def("backward", &wkv_backward_cuda, "rwkv_signal::wkv_backward on the emulated GPU");
}
