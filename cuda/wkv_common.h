// Constants shared by the operator's shape functions (wkv_op.cpp), the CPU kernel and the CUDA
// kernel. models/wkv.py repeats the two input bounds for its PyTorch backends.
#pragma once

namespace wkv {

// The forward saves the state entering every kSaveSteps steps, shape (B, ceil(T / 64), 3, C);
// the backward recomputes the states in between. Device independent, so that the Meta kernel
// (which does not know the device) gives the shape both kernels produce.
constexpr int kSaveSteps = 64;

// p of an empty state: exp(kEmptyP - x) == 0 for any x the kernels see, never inf - inf.
constexpr float kEmptyP = -1e38f;

// decay is read as min(decay, kMaxDecay). Beyond ~4.5, e^w = e^{-e^decay} is 0 in float32
// anyway, so no output changes; but w = -e^decay is -inf from 88.7 on, and then 0 * w (a chunk
// of no steps, the gradient dL/ddecay = dL/dw * w) is NaN. At 30, |w| * 2^31 steps is finite.
constexpr float kMaxDecay = 30.f;

// k is read as min(k, kMaxK): an fp16 k that overflowed to +inf (autocast) would pin the
// running maximum p at inf and give inf - inf = NaN. e^{1e30} dominates every other term just as
// +inf would, and all sums of exponents stay finite. The gradient of such a k is 0.
constexpr float kMaxK = 1e30f;

}  // namespace wkv
