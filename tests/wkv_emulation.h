// A CPU stand-in for the parts of the CUDA runtime that cuda/wkv_kernel.cuh uses, so that the
// tests run the kernels' own code on machines without a GPU (tests/test_wkv_emulated.py).
//
// Every GPU thread is a fiber (ucontext) with its own stack; the blocks of a launch run
// `concurrency` at a time on one OS thread. A seeded scheduler picks a random block at every
// switch and switches at every barrier and at every operation between blocks (flag loads and
// stores, atomics, fences), so blocks interleave in arbitrary, reproducible orders; publishing
// an inclusive prefix can be delayed to make look-backs walk past many aggregates. Shared memory
// starts as NaN bytes, so a read before a write shows. What this checks: indexing, tails, the
// scans, the look-back protocol, the reductions, barriers that not every thread reaches
// (reported as a deadlock). What it cannot: the GPU memory model (fences are switches here,
// every access is sequentially consistent), warp-level behaviour, timing.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace wkv_emulation {

struct Index {
  unsigned x, y, z;
};

struct Options {
  int concurrency = 8;       // blocks in flight at once
  uint64_t seed = 0;         // the scheduler's choices
  int release_delay = 0;     // switches a release store of value >= 2 waits before it lands
};

struct Stats {
  int64_t flag_loads = 0, saw_not_ready = 0, saw_aggregate = 0, saw_prefix = 0;
  int64_t windows_continued = 0;  // __syncthreads_and that returned false: another look-back round
  int64_t blocks = 0;
  int64_t misaligned_vector_loads = 0;  // a GPU would fault on these ("misaligned address")
};

struct Block;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Block* block = nullptr;
  Index thread{0, 0, 0};
  bool finished = false;
  bool waiting = false;  // at a barrier
};

struct Block {
  std::vector<std::unique_ptr<Fiber>> fibers;
  std::vector<Fiber*> runnable;
  std::vector<unsigned char> shared;
  std::vector<unsigned char> dynamic;  // the launch's dynamic shared memory
  size_t static_bytes = 0;
  int arrived = 0, live = 0;
  bool and_acc = true, and_result = true;
};

class Runtime {
 public:
  static constexpr int kThreads = 256;
  static constexpr size_t kStack = 64 * 1024;
  static constexpr size_t kShared = 48 * 1024;  // the static shared memory limit of a block
  static constexpr size_t kSharedOptIn = 227 * 1024;  // static + dynamic, opted in (sm_90)

  static Runtime& get() {
    static Runtime runtime;
    return runtime;
  }

  Options options;
  Stats stats;

  // Runs body() as `grid` blocks of kThreads threads, with `dynamic` bytes of dynamic shared
  // memory each.
  void launch(unsigned grid, const std::function<void()>& body, size_t dynamic = 0) {
    std::mt19937_64 rng(options.seed);
    body_ = &body;
    dynamic_ = dynamic;
    std::vector<std::unique_ptr<Block>> active;
    unsigned next = 0;
    while (next < grid || !active.empty()) {
      while (next < grid && static_cast<int>(active.size()) < options.concurrency) {
        active.push_back(start_block());
        ++next;
        ++stats.blocks;
      }
      std::vector<size_t> ready;
      for (size_t i = 0; i < active.size(); ++i)
        if (!active[i]->runnable.empty()) ready.push_back(i);
      if (ready.empty()) {
        throw std::runtime_error("emulated kernel deadlocked: every thread waits at a barrier "
                                 "that not all threads of its block reach");
      }
      Block* block = active[ready[rng() % ready.size()]].get();
      // run one fiber of the block until its next switch point
      const size_t pick = rng() % block->runnable.size();
      Fiber* fiber = block->runnable[pick];
      block->runnable.erase(block->runnable.begin() + static_cast<std::ptrdiff_t>(pick));
      current_ = fiber;
      swapcontext(&scheduler_, &fiber->context);
      current_ = nullptr;
      if (fiber->finished) {
        if (--block->live == 0) {
          for (size_t i = 0; i < active.size(); ++i) {
            if (active[i].get() == block) {
              recycle(std::move(active[i]));
              active.erase(active.begin() + static_cast<std::ptrdiff_t>(i));
              break;
            }
          }
        }
      } else if (!fiber->waiting) {
        block->runnable.push_back(fiber);
      }
    }
    if (error_) {
      const std::string what = *error_;
      error_.reset();
      throw std::runtime_error(what);
    }
  }

  Fiber& fiber() { return *current_; }

  // a switch point: back to the scheduler, which may run any other thread first
  void yield() { swapcontext(&current_->context, &scheduler_); }

  bool barrier(bool predicate) {
    Block& b = *current_->block;
    b.and_acc = b.and_acc && predicate;
    if (++b.arrived == kThreads) {
      b.arrived = 0;
      b.and_result = b.and_acc;
      b.and_acc = true;
      for (auto& f : b.fibers) {
        if (f->waiting) {
          f->waiting = false;
          b.runnable.push_back(f.get());
        }
      }
      yield();
    } else {
      current_->waiting = true;
      yield();
    }
    return b.and_result;
  }

  void* shared_memory(size_t bytes) {
    if (bytes > kShared) throw std::runtime_error("emulated kernel: too much shared memory");
    current_->block->static_bytes = bytes;
    return current_->block->shared.data();
  }

  // (after the static shared memory: a kernel declares that first)
  void* dynamic_shared_memory(size_t bytes) {
    if (bytes > dynamic_) {
      throw std::runtime_error("emulated kernel: more dynamic shared memory than the launch gave");
    }
    if (current_->block->static_bytes + dynamic_ > kSharedOptIn)
      throw std::runtime_error("emulated kernel: too much shared memory (static + dynamic)");
    return current_->block->dynamic.data();
  }

 private:
  std::unique_ptr<Block> start_block() {
    std::unique_ptr<Block> block;
    if (!spare_.empty()) {
      block = std::move(spare_.back());
      spare_.pop_back();
    } else {
      block = std::make_unique<Block>();
      block->shared.resize(kShared);
      for (int t = 0; t < kThreads; ++t) {
        auto f = std::make_unique<Fiber>();
        f->stack.reset(new char[kStack]);
        f->block = block.get();
        f->thread = {static_cast<unsigned>(t), 0, 0};
        block->fibers.push_back(std::move(f));
      }
    }
    block->dynamic.resize(dynamic_);
    std::memset(block->shared.data(), 0xff, block->shared.size());  // NaN floats, -1 ints
    std::memset(block->dynamic.data(), 0xff, block->dynamic.size());
    block->arrived = 0;
    block->live = kThreads;
    block->and_acc = block->and_result = true;
    block->runnable.clear();
    for (auto& f : block->fibers) {
      f->finished = f->waiting = false;
      getcontext(&f->context);
      f->context.uc_stack.ss_sp = f->stack.get();
      f->context.uc_stack.ss_size = kStack;
      f->context.uc_link = &scheduler_;
      makecontext(&f->context, &Runtime::entry, 0);
      block->runnable.push_back(f.get());
    }
    return block;
  }

  void recycle(std::unique_ptr<Block> block) { spare_.push_back(std::move(block)); }

  static void entry() {
    Runtime& rt = get();
    try {
      (*rt.body_)();
    } catch (const std::exception& exc) {
      if (!rt.error_) rt.error_ = std::make_unique<std::string>(exc.what());
    }
    rt.current_->finished = true;  // uc_link returns to the scheduler
  }

  ucontext_t scheduler_;
  Fiber* current_ = nullptr;
  const std::function<void()>* body_ = nullptr;
  std::vector<std::unique_ptr<Block>> spare_;
  size_t dynamic_ = 0;  // the current launch's dynamic shared memory per block
  std::unique_ptr<std::string> error_;
};

inline const Index& thread_index() { return Runtime::get().fiber().thread; }

template <typename T>
T& shared_variable() {
  return *static_cast<T*>(Runtime::get().shared_memory(sizeof(T)));
}

template <typename T>
T& dynamic_shared_variable() {
  return *static_cast<T*>(Runtime::get().dynamic_shared_memory(sizeof(T)));
}

}  // namespace wkv_emulation

#define threadIdx (wkv_emulation::thread_index())
#define WKV_SHARED(type, name) type& name = wkv_emulation::shared_variable<type>()
#define WKV_DYNAMIC_SHARED(type, name) type& name = wkv_emulation::dynamic_shared_variable<type>()

inline void __syncthreads() { wkv_emulation::Runtime::get().barrier(true); }
inline int __syncthreads_and(int predicate) {
  auto& rt = wkv_emulation::Runtime::get();
  const bool all = rt.barrier(predicate != 0);
  if (!all) ++rt.stats.windows_continued;
  return all;
}
inline void __threadfence() { wkv_emulation::Runtime::get().yield(); }
inline int atomicAdd(int* p, int value) {
  wkv_emulation::Runtime::get().yield();
  const int old = *p;
  *p += value;
  return old;
}
inline double atomicAdd(double* p, double value) {
  wkv_emulation::Runtime::get().yield();
  const double old = *p;
  *p += value;
  return old;
}
inline float __ldcg(const float* p) { return *p; }
inline double __ldcg(const double* p) { return *p; }
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 __ldcg(const float4* p) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(float4) != 0)
    ++wkv_emulation::Runtime::get().stats.misaligned_vector_loads;
  return *p;
}
inline float __fdividef(float x, float y) { return x / y; }
// glibc declares __expf but does not export it; <cmath> is in, so a macro is safe here
#define __expf(x) std::exp(static_cast<float>(x))

namespace wkv::gpu {
inline int load_acquire(int* flag) {
  auto& rt = wkv_emulation::Runtime::get();
  rt.yield();
  const int value = *flag;
  ++rt.stats.flag_loads;
  if (value == 0) ++rt.stats.saw_not_ready;
  if (value == 1) ++rt.stats.saw_aggregate;
  if (value == 2) ++rt.stats.saw_prefix;
  return value;
}
inline void pause() {}
inline void store_release(int* flag, int value) {
  auto& rt = wkv_emulation::Runtime::get();
  for (int i = value >= 2 ? rt.options.release_delay : 0; i >= 0; --i) rt.yield();
  *flag = value;
}
}  // namespace wkv::gpu

template <class Args>
void launch(void (*kernel)(Args), unsigned grid, const Args& args, int dynamic_shared = 0) {
  wkv_emulation::Runtime::get().launch(grid, [kernel, &args] { kernel(args); },
                                       static_cast<size_t>(dynamic_shared));
}
