"""The CUDA WKV kernel as torch.library custom ops.

Two ops, `rwkv_signal::wkv_forward` and `rwkv_signal::wkv_backward`, each with a fake
implementation (shapes for torch.compile) and the backward wired in with register_autograd,
so a compiled model traces through the kernel without a graph break and the backward is
itself an op that compile can trace around. On CUDA tensors the ops run the kernel in cuda/;
on CPU tensors they run the chunked PyTorch math with the same outputs, so the registration
itself is tested (torch.library.opcheck) on machines without a GPU.

Inputs here are already validated by models/wkv.py: w, u float32 (C,); k, v (B, T, C) in
float32/bfloat16/float16; state (B, 3, C) float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.wkv import wkv_chunked, wkv_reference_backward

CHUNK = 16  # must match cuda/wkv_chunk.h: the saved chunk states have one row per CHUNK steps


def _extension():
    from cuda.build import load_extension_or_none, why_unavailable

    module = load_extension_or_none()
    if module is None:
        raise RuntimeError(f"the WKV CUDA kernel is unavailable: {why_unavailable()}")
    if module.chunk != CHUNK:
        raise RuntimeError(f"WKV kernel built with chunk {module.chunk}, Python expects {CHUNK}")
    return module


@torch.library.custom_op("rwkv_signal::wkv_forward", mutates_args=())
def wkv_forward(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Tensor, sequential: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """y (B, T, C) in k's dtype, final state (B, 3, C) and the state entering every chunk of
    CHUNK steps (B, N, 3, C), float32."""
    if k.is_cuda:
        y, state_out, chunk_states = _extension().forward(
            w.contiguous(), u.contiguous(), k.contiguous(), v.contiguous(), state.contiguous(),
            sequential,
        )
        return y, state_out, chunk_states
    y, state_out, chunk_states = wkv_chunked(w, u, k, v, state, chunk=CHUNK)
    return y.to(k.dtype), state_out.float(), chunk_states.float()


@wkv_forward.register_fake
def _(w, u, k, v, state, sequential):
    bsz, steps, channels = k.shape
    n_chunks = (steps + CHUNK - 1) // CHUNK
    return (
        torch.empty_like(k),
        torch.empty_like(state),
        state.new_empty((bsz, n_chunks, 3, channels)),
    )


@torch.library.custom_op("rwkv_signal::wkv_backward", mutates_args=())
def wkv_backward(
    w: Tensor,
    u: Tensor,
    k: Tensor,
    v: Tensor,
    state: Tensor,
    chunk_states: Tensor,
    state_out: Tensor,
    gy: Tensor,
    gstate: Tensor,
    sequential: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (gw, gu, gk, gv, gstate_in) from gy and the final state's gradient gstate
    (whose p row is ignored: p is a scale, see models/wkv.py)."""
    if k.is_cuda:
        gw, gu, gk, gv, gstate_in = _extension().backward(
            w.contiguous(), u.contiguous(), k.contiguous(), v.contiguous(), chunk_states,
            state_out, gy.to(k.dtype).contiguous(), gstate.contiguous(), sequential,
        )
        return gw, gu, gk, gv, gstate_in
    # CPU: the kernel's backward written out step by step (autograd is off inside an op)
    f64 = torch.float64
    gw, gu, gk, gv, gs = wkv_reference_backward(
        *(t.to(f64) for t in (w, u, k, v, state, gy, gstate))
    )
    return gw.float(), gu.float(), gk.to(k.dtype), gv.to(v.dtype), gs.float()


@wkv_backward.register_fake
def _(w, u, k, v, state, chunk_states, state_out, gy, gstate, sequential):
    return (
        torch.empty_like(w),
        torch.empty_like(u),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(state),
    )


def _setup_context(ctx, inputs, output):
    w, u, k, v, state, sequential = inputs
    _, state_out, chunk_states = output
    ctx.save_for_backward(w, u, k, v, state, chunk_states, state_out)
    ctx.sequential = sequential
    ctx.mark_non_differentiable(chunk_states)


def _backward(ctx, gy, gstate, _gchunk):
    w, u, k, v, state, chunk_states, state_out = ctx.saved_tensors
    if gy is None:
        gy = torch.zeros_like(k)
    if gstate is None:
        gstate = torch.zeros_like(state_out)
    gw, gu, gk, gv, gstate_in = wkv_backward(
        w, u, k, v, state, chunk_states, state_out, gy, gstate, ctx.sequential
    )
    return gw, gu, gk, gv, gstate_in, None


torch.library.register_autograd("rwkv_signal::wkv_forward", _backward, setup_context=_setup_context)


def wkv_cuda(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Tensor, sequential: bool = False):
    """y (B, T, C) and the final state (B, 3, C) through the custom op."""
    y, state_out, _ = wkv_forward(w, u, k, v, state.float(), sequential)
    return y, state_out
