"""The RWKV-4 WKV operator: one public entry point, four backends.

Per channel, with w = -exp(decay) < 0 and u = first, inputs k, v of shape (B, T, C):

    y_t     = (A_t + e^{u+k_t} v_t) / (B_t + e^{u+k_t})
    A_{t+1} = e^w A_t + e^{k_t} v_t,    B_{t+1} = e^w B_t + e^{k_t}

The state (A, B) is carried as (a, b, p) with A = a e^p, B = b e^p, p a running max of
exponents, so nothing overflows for any k or T. A state tensor has shape (B, 3, C) and holds
[a, b, p]; an empty state is a = b = 0, p = -1e38. Two bounds keep every backend finite (the
kernels apply the same, cuda/wkv_common.h): decay is read as min(decay, 30) (beyond ~4.5,
e^w is 0 in any float anyway; from 88.7 on, w itself would be -inf and 0 * w NaN), and k as
min(k, 1e30) (an fp16 k that overflowed to +inf under autocast; e^{1e30} dominates just as
+inf would). Neither bound passes a gradient, as a clamp would not.

Gradient convention: p is a scale, treated as a constant by autograd (its incoming gradient is
ignored, the gradient of p in an *input* state is exact). Gradients of y are exact; gradients
through a state are exact for any loss that uses it through A = a e^p and B = b e^p, which is
what happens when a long signal is cut into pieces and the state is carried along.

Backends (see `wkv`):
  reference  the sequential loop below: the definition, the test oracle, any float dtype
  torch      vectorised chunked PyTorch (`wkv_chunked`), CPU and GPU, plain autograd
  cuda       the single-pass CUDA kernel (cuda/wkv_kernel.cu)
  cpu        the C++ CPU kernel (cuda/wkv_cpu.cpp: vectorised over channels, threads over
             batch x channel blocks)
The two native backends are one C++ operator, `torch.ops.rwkv_signal.wkv` (schema, autograd
and the shapes torch.compile needs: cuda/wkv_op.cpp), with a kernel per device; the libraries
are built by models/wkv_build.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import Tensor

from models import wkv_build

log = logging.getLogger(__name__)

EMPTY_P = -1e38  # p of an empty state: exp(EMPTY_P - anything) == 0 without inf - inf
BACKENDS = ("auto", "reference", "torch", "cuda", "cpu")
_NATIVE = ("cuda", "cpu")  # backends that run the C++ operator (the kernel of that device)
# the input bounds of cuda/wkv_common.h (see the module docstring), for the PyTorch backends
DECAY_MAX = 30.0
K_MAX = 1e30

# Factorised chunks are exact while the exponents inside a chunk span less than this (float64
# holds e^-745 .. e^709); a chunk that spans more is recomputed step by step.
_SPAN_LIMIT = 600.0
_PAD_K = -1e30  # k of padding steps: they add nothing to the state


def empty_state(batch: int, channels: int, device=None, dtype=torch.float32) -> Tensor:
    """An empty WKV state, (batch, 3, channels): a = b = 0, p = -1e38."""
    state = torch.zeros(batch, 3, channels, device=device, dtype=dtype)
    state[:, 2] = EMPTY_P
    return state


# ----------------------------------------------------------------------------------------------
# The definition: one step of the recurrence, and the sequential reference built from it.


def _step_output(a: Tensor, b: Tensor, p: Tensor, u: Tensor, kt: Tensor, vt: Tensor) -> Tensor:
    ww = u + kt
    q = torch.maximum(p, ww).detach()  # a scale: cancels between numerator and denominator
    e1 = torch.exp(p - q)
    e2 = torch.exp(ww - q)
    return (e1 * a + e2 * vt) / (e1 * b + e2)


def _step_state(a: Tensor, b: Tensor, p: Tensor, w: Tensor, kt: Tensor, vt: Tensor):
    ww = p + w
    q = torch.maximum(ww, kt).detach()
    e1 = torch.exp(ww - q)
    e2 = torch.exp(kt - q)
    return e1 * a + e2 * vt, e1 * b + e2, q


def wkv_reference(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Tensor):
    """Sequential WKV, one step at a time: the exact definition.

    w, u: (C,) in the compute dtype; k, v: (B, T, C); state: (B, 3, C).
    Returns y (B, T, C) and the final state (B, 3, C), both in the compute dtype.
    """
    a, b, p = state.unbind(1)
    ys = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        ys.append(_step_output(a, b, p, u, kt, vt))
        a, b, p = _step_state(a, b, p, w, kt, vt)
    return torch.stack(ys, 1), torch.stack((a, b, p), 1)


def wkv_reference_backward(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Tensor,
                           gy: Tensor, gstate: Tensor):
    """The backward the CUDA kernel computes, written out step by step (no autograd).

    Runs in reverse time on the gradient state R = dL/dA_t = r e^rho, S = dL/dB_t = s e^rho:
        gA_t = gy_t / D_t + e^w gA_{t+1},   gB_t = -gy_t y_t / D_t + e^w gB_{t+1},
    starting from dL/dA_T = g_a e^{-p_T} (the p row of gstate is ignored: p is a scale).
    Returns (gw, gu, gk, gv, gstate_in); gw is the gradient of w, not of decay.
    """
    states = []
    a, b, p = state.unbind(1)
    for t in range(k.shape[1]):
        states.append((a, b, p))
        a, b, p = _step_state(a, b, p, w, k[:, t], v[:, t])
    r, s, rho = gstate[:, 0], gstate[:, 1], -p
    gk, gv = torch.empty_like(k), torch.empty_like(v)
    gw = torch.zeros_like(k[:, 0])
    gu = torch.zeros_like(k[:, 0])
    for t in reversed(range(k.shape[1])):
        a, b, p = states[t]
        kt, vt = k[:, t], v[:, t]
        q = torch.maximum(p, u + kt)
        e1, e2 = torch.exp(p - q), torch.exp(u + kt - q)
        d = e1 * b + e2  # D_t = d e^q
        y = (e1 * a + e2 * vt) / d
        g = gy[:, t] / d
        ek = torch.exp(kt + rho)
        bonus = e2 * g
        gk[:, t] = (r * vt + s) * ek + bonus * (vt - y)
        gv[:, t] = r * ek + bonus
        gu = gu + bonus * (vt - y)
        gw = gw + (r * a + s * b) * torch.exp(w + p + rho)
        new_rho = torch.maximum(rho + w, -q)
        f1, f2 = torch.exp(rho + w - new_rho), torch.exp(-q - new_rho)
        r, s, rho = f1 * r + f2 * g, f1 * s - f2 * g * y, new_rho
    a0, b0, p0 = state.unbind(1)
    scale = torch.exp(rho + p0)
    ga, gb = r * scale, s * scale
    gstate_in = torch.stack((ga, gb, ga * a0 + gb * b0), 1)
    return gw.sum(0), gu.sum(0), gk, gv, gstate_in


# ----------------------------------------------------------------------------------------------
# Vectorised chunked PyTorch: no Python loop over time steps.


def _combine(state: tuple[Tensor, Tensor, Tensor], local: tuple[Tensor, Tensor, Tensor], decay):
    """State after a chunk: the incoming state decayed by `decay` (= length * w) plus the
    chunk's own contribution `local` (its state when started from empty)."""
    a, b, p = state
    la, lb, lp = local
    pd = p + decay
    q = torch.maximum(pd, lp).detach()
    e1 = torch.exp(pd - q)
    e2 = torch.exp(lp - q)
    return e1 * a + e2 * la, e1 * b + e2 * lb, q


def wkv_chunked(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Tensor, chunk: int = 16):
    """Chunked WKV in float64 PyTorch, differentiable by plain autograd.

    (1) every chunk's own final state in parallel, (2) a short scan over chunks for the state
    entering each chunk, (3) every step's output in parallel: inside a chunk the decayed sum is
    a cumulative sum after factoring e^{(t-1-i)w} = e^{(t-L)w} e^{(L-1-i)w}. A chunk whose
    exponents span too much for that factorisation (more than float64's range can hold, e.g.
    k jumping by hundreds) is recomputed step by step from its incoming state.

    Returns y (B, T, C), the final state (B, 3, C) and the state entering each chunk
    (B, N, 3, C), all in float64.
    """
    f64 = torch.float64
    w, u = w.to(f64), u.to(f64)
    k, v, state = k.to(f64), v.to(f64), state.to(f64)
    bsz, steps, channels = k.shape
    L = chunk
    n_chunks = -(-steps // L)
    pad = n_chunks * L - steps
    kc = torch.nn.functional.pad(k, (0, 0, 0, pad), value=_PAD_K).view(bsz, n_chunks, L, channels)
    vc = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(bsz, n_chunks, L, channels)
    j = torch.arange(L, device=k.device, dtype=f64)[:, None]  # position inside the chunk

    # (1) each chunk started from an empty state: exponents k_i + (L-1-i) w
    e = kc + (L - 1 - j) * w
    lp = e.amax(2).detach()
    x = torch.exp(e - lp.unsqueeze(2))
    xv = x * vc
    la, lb = xv.sum(2), x.sum(2)
    # the factorised sums below stay exact while every x_i a row needs is far from underflow
    wide = ((lp - e[:, :, 0]) > _SPAN_LIMIT).any(-1)  # (B, N)

    # (2) scan over chunks (a loop over T / L chunks, not over T)
    carry = tuple(state.unbind(1))
    incoming = []
    # unbind once: indexing chunk n in the loop would make autograd fill a zero (B, N, C)
    # gradient per chunk
    for local in zip(la.unbind(1), lb.unbind(1), lp.unbind(1), strict=True):
        incoming.append(torch.stack(carry, 1))
        carry = _combine(carry, local, L * w)
    a_out, b_out, p_out = carry
    # padding steps added nothing but decay: undo their decay on the scale
    state_out = torch.stack((a_out, b_out, p_out - pad * w), 1)
    chunk_states = torch.stack(incoming, 1)  # (B, N, 3, C)
    a_in, b_in, p_in = (s.unsqueeze(2) for s in chunk_states.unbind(2))

    # (3) outputs. Row j of a chunk sums three kinds of terms: the incoming state,
    # e^{p_in + j w}; the steps before it in the chunk, sum_{i<j} e^{k_i + (j-1-i) w} v_i
    # = e^{lp + (j-L) w} * sum_{i<j} x_i v_i (x from step 1, a cumulative sum); and the bonus
    # e^{u + k_j} v_j. q bounds the row's exponents so every factor is <= 1.
    # exclusive sums (i < j) by shifting, not by subtracting x_j: that would cancel
    cs_v = torch.nn.functional.pad(torch.cumsum(xv[:, :, :-1], 2), (0, 0, 1, 0))
    cs_1 = torch.nn.functional.pad(torch.cumsum(x[:, :, :-1], 2), (0, 0, 1, 0))
    s_state = p_in + j * w
    s_intra = (lp.unsqueeze(2) + (j - L) * w).masked_fill(j == 0, EMPTY_P)  # row 0: no terms
    s_bonus = u + kc
    q = torch.maximum(torch.maximum(s_state, s_intra), s_bonus).detach()
    f_intra = torch.exp(s_intra - q)
    f_state = torch.exp(s_state - q)
    f_bonus = torch.exp(s_bonus - q)
    num = cs_v * f_intra + a_in * f_state + vc * f_bonus
    den = cs_1 * f_intra + b_in * f_state + f_bonus
    # wide chunks are recomputed below; their factorised denominator may underflow to 0, and a
    # 0/0 there would turn the zero gradient it receives into NaN
    den = torch.where(wide[:, :, None, None], 1.0, den)
    y = num / den

    # chunks whose span defeats the factorisation: step through them from their incoming state
    if torch.compiler.is_exporting():
        # an exported graph cannot branch on data: step through every chunk, keep the wide ones
        y = torch.where(wide[:, :, None, None], _stepped_rows(chunk_states, kc, vc, w, u), y)
    elif bool(wide.any()):
        bi, ni = wide.nonzero(as_tuple=True)
        rows = _stepped_rows(chunk_states[bi, ni], kc[bi, ni], vc[bi, ni], w, u)
        y = torch.index_put(y, (bi, ni), rows)

    y = y.reshape(bsz, n_chunks * L, channels)[:, :steps]
    return y, state_out, chunk_states


def _stepped_rows(states: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor) -> Tensor:
    """Outputs of chunks computed step by step from their incoming states: states (..., 3, C),
    k, v (..., L, C) -> (..., L, C)."""
    a, b, p = states.unbind(-2)
    rows = []
    for t in range(k.shape[-2]):
        kt, vt = k[..., t, :], v[..., t, :]
        rows.append(_step_output(a, b, p, u, kt, vt))
        a, b, p = _step_state(a, b, p, w, kt, vt)
    return torch.stack(rows, -2)


# ----------------------------------------------------------------------------------------------
# The public operator.

_logged_choice: set[str] = set()  # "backend:reason" lines already logged
_unlogged = False  # inside backend_choices_unlogged()
_LOADED = {"cuda": "kernel built and loaded", "cpu": "C++ CPU kernel built and loaded"}


@contextlib.contextmanager
def backend_choices_unlogged() -> Iterator[None]:
    """Backend choices made inside are neither logged nor remembered as logged: for a probe
    whose device is not the run's (the memory estimate of a GPU run runs on the CPU)."""
    global _unlogged
    before, _unlogged = _unlogged, True
    try:
        yield
    finally:
        _unlogged = before


def _log_backend_once(backend: str, reason: str) -> None:
    if _unlogged:
        return
    key = f"{backend}:{reason}"
    if key not in _logged_choice:
        _logged_choice.add(key)
        log.info("WKV backend: %s (%s)", backend, reason)


# Without the C++ kernel, on CPU without autograd, the sequential loop's per-step Python cost
# (~40 us) is paid back by its lower per-element cost once B * C reaches about this (measured
# on 2 cores: at B=8, T=3750, C=256 the loop's forward takes 0.18 s, the chunked scan's 0.63 s;
# the C++ kernel's 0.017 s).
_CPU_LOOP_MIN_WIDTH = 512


def _choose_backend(k: Tensor, tensors: tuple) -> str:
    kind = "cuda" if k.is_cuda else "cpu"  # the native kernel for k's device
    if torch.compiler.is_compiling():
        # no building or logging inside a traced graph: use what eager code already loaded
        usable = k.dtype != torch.float64 and wkv_build.loaded_extension(kind) is not None
        return kind if usable else "torch"
    if k.dtype == torch.float64:
        why = "float64 inputs" + (" on CPU (the C++ kernel is float32)" if kind == "cpu" else "")
    elif wkv_build.load_extension_or_none(kind) is not None:
        _log_backend_once(kind, _LOADED[kind])
        return kind
    elif kind == "cuda":
        why = wkv_build.why_unavailable("cuda")
    else:
        why = f"on CPU, C++ kernel unavailable: {wkv_build.why_unavailable('cpu')}"
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)
    if kind == "cpu" and not needs_grad and k.shape[0] * k.shape[2] >= _CPU_LOOP_MIN_WIDTH:
        _log_backend_once("reference", f"{why}; without autograd the step loop is faster")
        return "reference"
    _log_backend_once("torch", why)
    return "torch"


def prepare_backend(device: torch.device | str) -> str:
    """Build/load the native kernel for `device` now (outside any torch.compile trace: a trace
    can only use a kernel that is already loaded), and return the backend "auto" will pick
    there for float32 inputs. Cheap once loaded: models call it at their first eager forward."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    if wkv_build.load_extension_or_none(kind) is None:
        return "torch"
    # said here too: a compiled model's first forward is a trace, which logs nothing
    _log_backend_once(kind, _LOADED[kind])
    return kind


def _native_op(backend: str):
    """torch.ops.rwkv_signal.wkv once the library of `backend` is loaded; raises with the
    reason when it cannot be."""
    if torch.compiler.is_compiling():
        available = wkv_build.loaded_extension(backend) is not None
    else:
        available = wkv_build.load_extension_or_none(backend) is not None
    if not available:
        why = wkv_build.why_unavailable(backend) if not torch.compiler.is_compiling() else (
            "not loaded before torch.compile traced this call (call prepare_backend first)")
        raise RuntimeError(f"the WKV {backend.upper()} kernel is unavailable: {why}")
    return torch.ops.rwkv_signal.wkv.default


def _validate(decay: Tensor, first: Tensor, k: Tensor, v: Tensor, state, r, check_finite: bool):
    for name, t in (("decay", decay), ("first", first), ("k", k), ("v", v), ("r", r)):
        if name == "r" and t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    if k.dim() != 3:
        raise ValueError(f"k must have 3 dims (B, T, C); got shape {tuple(k.shape)}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape (B, T, C); got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if r is not None and r.shape != k.shape:
        raise ValueError(f"r must have k's shape (B, T, C) = {tuple(k.shape)}; "
                         f"got {tuple(r.shape)}")
    bsz, steps, channels = k.shape
    if steps < 1 or channels < 1 or bsz < 1:
        raise ValueError(f"k must have B, T, C >= 1; got shape {tuple(k.shape)}")
    for name, t in (("decay", decay), ("first", first)):
        if t.shape != (channels,):
            raise ValueError(f"{name} must have shape (C,) = ({channels},); got {tuple(t.shape)}")
    tensors = [("decay", decay), ("first", first), ("k", k), ("v", v)]
    if r is not None:
        tensors.append(("r", r))
    if state is not None:
        if not isinstance(state, Tensor) or state.shape != (bsz, 3, channels):
            shape = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise ValueError(
                f"state must have shape (B, 3, C) = ({bsz}, 3, {channels}); got {shape}"
            )
        if not state.is_floating_point():
            raise ValueError(f"state must be a floating-point tensor; got dtype {state.dtype}")
        tensors.append(("state", state))
    device = k.device
    if any(t.device != device for _, t in tensors):
        where = ", ".join(f"{n} on {t.device}" for n, t in tensors)
        raise ValueError(f"all WKV inputs must be on one device; got {where}")
    if check_finite and not torch.compiler.is_compiling():
        for name, t in tensors:
            if name == "state":
                t = t[:, :2]  # p may legitimately be very negative, but not NaN
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf values")


def _clamp_p(state: Tensor) -> Tensor:
    # p = -inf would give inf - inf; -1e38 is just as empty
    return torch.cat((state[:, :2], state[:, 2:].clamp(min=EMPTY_P)), 1)


def _float32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()  # no op (no launch) when it already is


def wkv(
    decay: Tensor,
    first: Tensor,
    k: Tensor,
    v: Tensor,
    state: Tensor | None = None,
    backend: str = "auto",
    check_finite: bool = True,
    r: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """RWKV-4 WKV time mixing.

    decay, first: (C,) parameters (w = -exp(decay), u = first).
    k, v: (B, T, C) float64/float32/bfloat16/float16, T >= 1.
    state: optional (B, 3, C) [a, b, p] entering the sequence; empty when None.
    backend: "auto" (the native kernel of the inputs' device when it builds: cuda on a GPU,
        cpu on the CPU; else torch, or on CPU the reference loop for wide inputs that need no
        gradient, where it is faster; float64 inputs: torch), "reference", "torch", "cuda"
        or "cpu".
    check_finite: refuse NaN/Inf inputs (costs a device sync; models check their input once
        and pass False). The operator itself never syncs.
    r: optional (B, T, C) receptance: the result is then sigmoid(r) * wkv, the time mix's
        output gate, fused into the native kernels (forward and backward).
    Returns y (B, T, C) in k's dtype and the final state (B, 3, C) in float32 (float64 for
    float64 inputs). Half-precision inputs are accumulated in float32. decay above 30 acts as
    30 and k above 1e30 (+inf included) as 1e30 (see the module docstring).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    _validate(decay, first, k, v, state, r, check_finite)
    if backend == "auto":
        backend = _choose_backend(k, (decay, first, k, v, state, r))
    if backend in _NATIVE:
        if k.device.type != backend:
            raise ValueError(
                f"backend {backend!r} needs {backend.upper()} tensors; got k on {k.device}")
        if k.dtype == torch.float64:
            raise ValueError(f"backend {backend!r} takes float32/bfloat16/float16; got float64")
        op = _native_op(backend)
        if v.dtype != k.dtype:
            v = v.to(k.dtype)
        if r is not None and r.dtype != k.dtype:
            r = r.to(k.dtype)
        # the kernel bounds p and decay itself (no extra launches here)
        y, state_out, _ = op(_float32(decay), _float32(first), k, v,
                             None if state is None else _float32(state), r)
        return y, state_out

    compute = torch.float64 if k.dtype == torch.float64 else torch.float32
    w = -torch.exp(decay.to(compute).clamp(max=DECAY_MAX))
    u = first.to(compute)
    kc = k.to(compute).clamp(max=K_MAX)  # in the compute dtype: 1e30 is inf in float16
    if state is None:
        state = empty_state(k.shape[0], k.shape[2], k.device, compute)
    else:
        state = _clamp_p(state.to(compute))
    if backend == "reference":
        y, state_out = wkv_reference(w, u, kc, v.to(compute), state)
    else:
        y, state_out, _ = wkv_chunked(w, u, kc, v, state)
    if r is not None:
        y = torch.sigmoid(r.to(y.dtype)) * y
    return y.to(k.dtype), state_out.to(compute)


__all__ = [
    "BACKENDS",
    "backend_choices_unlogged",
    "DECAY_MAX",
    "EMPTY_P",
    "K_MAX",
    "empty_state",
    "prepare_backend",
    "wkv",
    "wkv_chunked",
    "wkv_reference",
    "wkv_reference_backward",
]
