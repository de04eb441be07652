"""The native WKV kernels for autograd: torch.library custom ops, and an eager shortcut.

Two kernel libraries with one interface: the CUDA kernel (cuda/wkv_kernel.cu) for GPU tensors
and the C++ CPU kernel (cuda/wkv_cpu.cpp) for CPU tensors. `wkv_kernel` is the entry point.
Under torch.compile it calls the custom ops; in eager mode it calls the same kernels through a
plain autograd.Function, whose per-call host cost is a small fraction of the custom-op
dispatch's (that cost exceeds the kernels' own time at B=1).

Two ops, `rwkv_signal::wkv_forward` and `rwkv_signal::wkv_backward`, each with a fake
implementation (shapes for torch.compile) and the backward wired in with register_autograd,
so a compiled model traces through the kernel without a graph break and the backward is
itself an op that compile can trace around. On CUDA tensors the ops run the CUDA kernel; on
CPU tensors the C++ CPU kernel, or where that cannot be built the chunked PyTorch math with
the same outputs. Either way the registration is tested (torch.library.opcheck) on machines
without a GPU.

Inputs here are already validated by models/wkv.py: decay, first float32 (C,) (the kernel
computes w = -exp(decay) itself and returns the gradient of decay); k, v (B, T, C) in
float32/bfloat16/float16; state (B, 3, C) float32 or None for an empty one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.wkv import empty_state, wkv_chunked, wkv_reference_backward

CHUNK = 16  # must match cuda/wkv_chunk.h: the saved chunk states have one row per CHUNK steps


def _kernels(k: Tensor, required: bool = True):
    """The kernel library for k's device (the CUDA or the C++ CPU kernel). If it cannot be
    had: raises with the reason, or returns None when not `required`."""
    from cuda.build import load_extension_or_none, why_unavailable

    kind = "cuda" if k.is_cuda else "cpu"
    module = load_extension_or_none(kind)
    if module is None:
        if not required:
            return None
        raise RuntimeError(f"the WKV {kind.upper()} kernel is unavailable: "
                           f"{why_unavailable(kind)}")
    if module.chunk != CHUNK:
        raise RuntimeError(f"WKV {kind.upper()} kernel built with chunk {module.chunk}, "
                           f"Python expects {CHUNK}")
    return module


@torch.library.custom_op("rwkv_signal::wkv_forward", mutates_args=())
def wkv_forward(
    decay: Tensor, first: Tensor, k: Tensor, v: Tensor, state: Tensor | None, sequential: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """y (B, T, C) in k's dtype, final state (B, 3, C) and the state entering every chunk of
    CHUNK steps (B, N, 3, C), float32. state None means empty."""
    # on CPU without the C++ kernel: the chunked PyTorch math below
    kernels = _kernels(k, required=k.is_cuda)
    if kernels is not None:
        y, state_out, chunk_states = kernels.forward(
            decay.contiguous(), first.contiguous(), k.contiguous(), v.contiguous(),
            None if state is None else state.contiguous(), sequential,
        )
        return y, state_out, chunk_states
    if state is None:
        state = empty_state(k.shape[0], k.shape[2], k.device)
    y, state_out, chunk_states = wkv_chunked(-torch.exp(decay), first, k, v, state, chunk=CHUNK)
    return y.to(k.dtype), state_out.float(), chunk_states.float()


@wkv_forward.register_fake
def _(decay, first, k, v, state, sequential):
    bsz, steps, channels = k.shape
    n_chunks = (steps + CHUNK - 1) // CHUNK
    return (
        torch.empty_like(k),
        decay.new_empty((bsz, 3, channels)),
        decay.new_empty((bsz, n_chunks, 3, channels)),
    )


@torch.library.custom_op("rwkv_signal::wkv_backward", mutates_args=())
def wkv_backward(
    decay: Tensor,
    first: Tensor,
    k: Tensor,
    v: Tensor,
    state: Tensor | None,
    chunk_states: Tensor,
    state_out: Tensor,
    gy: Tensor,
    gstate: Tensor,
    sequential: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (gdecay, gfirst, gk, gv, gstate_in) from gy and the final state's gradient
    gstate (whose p row is ignored: p is a scale, see models/wkv.py). gstate_in is empty when
    state is None."""
    kernels = _kernels(k, required=k.is_cuda)
    if kernels is not None:
        return kernels.backward(
            decay.contiguous(), first.contiguous(), k.contiguous(), v.contiguous(), chunk_states,
            state_out, gy.to(k.dtype).contiguous(), gstate.contiguous(), state is not None,
            sequential,
        )
    # no CPU kernel: its backward written out step by step (autograd is off inside an op)
    f64 = torch.float64
    w = -torch.exp(decay.to(f64))
    s = empty_state(k.shape[0], k.shape[2], k.device) if state is None else state
    gw, gu, gk, gv, gs = wkv_reference_backward(
        w, *(t.to(f64) for t in (first, k, v, s, gy, gstate))
    )
    gs = gs.float() if state is not None else gs.new_empty(0, dtype=torch.float32)
    return (gw * w).float(), gu.float(), gk.to(k.dtype), gv.to(v.dtype), gs


@wkv_backward.register_fake
def _(decay, first, k, v, state, chunk_states, state_out, gy, gstate, sequential):
    gstate_in = decay.new_empty((0,)) if state is None else torch.empty_like(state)
    return (
        torch.empty_like(decay),
        torch.empty_like(first),
        torch.empty_like(k),
        torch.empty_like(v),
        gstate_in,
    )


def _setup_context(ctx, inputs, output):
    decay, first, k, v, state, sequential = inputs
    _, state_out, chunk_states = output
    ctx.has_state = state is not None
    ctx.save_for_backward(decay, first, k, v, state, chunk_states, state_out)
    ctx.sequential = sequential
    ctx.mark_non_differentiable(chunk_states)


def _backward(ctx, gy, gstate, _gchunk):
    decay, first, k, v, state, chunk_states, state_out = ctx.saved_tensors
    if gy is None:
        gy = torch.zeros_like(k)
    if gstate is None:
        gstate = torch.zeros_like(state_out)
    gdecay, gfirst, gk, gv, gstate_in = wkv_backward(
        decay, first, k, v, state, chunk_states, state_out, gy, gstate, ctx.sequential
    )
    return gdecay, gfirst, gk, gv, gstate_in if ctx.has_state else None, None


torch.library.register_autograd("rwkv_signal::wkv_forward", _backward, setup_context=_setup_context)


class _WKVFunction(torch.autograd.Function):
    """The same kernels for eager mode without the custom-op dispatch: an eager call then
    costs tens of microseconds of Python instead of hundreds, which matters at the operator's
    own speed. torch.compile goes through the custom ops above instead."""

    @staticmethod
    def forward(ctx, decay, first, k, v, state, sequential):
        y, state_out, chunk_states = _kernels(k).forward(decay, first, k, v, state, sequential)
        ctx.save_for_backward(decay, first, k, v, chunk_states, state_out)
        ctx.has_state, ctx.sequential = state is not None, sequential
        return y, state_out

    @staticmethod
    def backward(ctx, gy, gstate):
        decay, first, k, v, chunk_states, state_out = ctx.saved_tensors
        gy = torch.zeros_like(k) if gy is None else gy.to(k.dtype).contiguous()
        gstate = None if gstate is None else gstate.contiguous()
        gdecay, gfirst, gk, gv, gstate_in = _kernels(k).backward(
            decay, first, k, v, chunk_states, state_out, gy, gstate, ctx.has_state,
            ctx.sequential,
        )
        return gdecay, gfirst, gk, gv, gstate_in if ctx.has_state else None, None


def wkv_kernel(decay: Tensor, first: Tensor, k: Tensor, v: Tensor, state: Tensor | None,
               sequential: bool = False, through_ops: bool = False):
    """y (B, T, C) and the final state (B, 3, C) from the native kernel of k's device (the
    CUDA kernel, or the C++ CPU kernel). Raises if that kernel cannot be had. through_ops:
    call the custom ops even in eager mode (as torch.compile does; for tests)."""
    decay, first = decay.float().contiguous(), first.float().contiguous()
    state = None if state is None else state.float().contiguous()
    if torch.compiler.is_compiling() or through_ops:
        y, state_out, _ = wkv_forward(decay, first, k, v, state, sequential)
        return y, state_out
    return _WKVFunction.apply(decay, first, k.contiguous(), v.contiguous(), state, sequential)
