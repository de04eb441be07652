"""Which part of a signal drove a decision: attributions over time with Captum.

`attribute_over_time(model, x, lengths, target)` gives a (B, T) attribution for the classifier's
`forward(x, lengths)` (a `DualBranchClassifier`, the LightningModule, or any module with that
call): positive where the signal raised the target class's probability, negative where it
lowered it, zero in the padding. Two methods:

  "occlusion":            the drop in the target probability when a window of the signal is
                          set to the baseline, slid along time (Captum `Occlusion`); a sample's
                          value averages the windows that cover it. Model-agnostic and robust,
                          costs about 2 T / window forward passes per signal.
  "integrated_gradients": gradients integrated along the straight path from the baseline to
                          the signal (Captum `IntegratedGradients`); per-sample resolution,
                          the values sum to p(signal) - p(baseline); needs a backward pass.

The baseline is a constant signal (default 0: the training mean after the data module's
dataset normalisation). The model runs in eval mode and fp32 (autocast off), with its
training flag restored afterwards, so the result is deterministic and the same on CPU and
GPU up to float rounding; it works inside Lightning's inference mode (test hooks) too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from captum.attr import IntegratedGradients, Occlusion
from torch import Tensor, nn

ATTRIBUTION_METHODS = ("occlusion", "integrated_gradients")
OUTPUTS = ("probability", "logit")
# occlusion windows per signal: windows of T / 32 samples, half a window apart, give about 63
# forward passes whatever T is, and resolve an event of a thirty-second of the signal
OCCLUSION_WINDOWS = 32


def occlusion_window(length: int) -> tuple[int, int]:
    """(window, stride) in samples for occluding a signal of `length` samples: a
    thirty-second of it (at least one sample), half a window apart. A 24-sample series is
    occluded sample by sample; a 10,000-sample one in windows of 313, 156 apart."""
    window = max(1, math.ceil(length / OCCLUSION_WINDOWS))
    return window, max(1, window // 2)


class _TargetOutput(nn.Module):
    """model(x, lengths) -> (B, K) fp32 probabilities or logits, what Captum differentiates
    or perturbs."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        logits = self.model(x, lengths).float()
        return torch.softmax(logits, -1) if self.output == "probability" else logits


def attribute_over_time(model: nn.Module, x: Tensor, lengths: Tensor | None,
                        target: int | Sequence[int] | Tensor,
                        method: str = "occlusion", *, window: int | None = None,
                        stride: int | None = None, steps: int = 32, baseline: float = 0.0,
                        output: str = "probability", batch_size: int = 64) -> Tensor:
    """Attribution of `target` to every time step of each signal.

    model:   a module called as model(x, lengths) -> (B, K) logits.
    x:       (B, T) or (B, T, 1) float signals, zero-padded beyond `lengths` (any device).
    lengths: (B,) int real samples per signal, or None (all T are real).
    target:  the class to explain, one for all or (B,) one per signal (e.g. the predicted one).
    method:  "occlusion" or "integrated_gradients" (see the module docstring).
    window, stride: occlusion window and step in samples; default `occlusion_window(n)` of
             each signal's real length n.
    steps:   integrated-gradients steps along the path.
    output:  explain the target's "probability" (softmax) or its "logit".
    batch_size: signals per model call (occluded copies or path points).
    Returns (B, T) float32 attributions on x's device, 0 in the padding.
    """
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"method must be one of {ATTRIBUTION_METHODS}; got {method!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}; got {output!r}")
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x.squeeze(-1)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"x must be (B, T) or (B, T, 1) with T >= 1; got {tuple(x.shape)}")
    batch, total = x.shape
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=x.device).long()
        if lengths.shape != (batch,) or int(lengths.min()) < 1 or int(lengths.max()) > total:
            raise ValueError(f"lengths must be ({batch},) sample counts in [1, {total}]; got "
                             f"{lengths.tolist() if lengths.ndim == 1 else lengths.shape}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1; got {steps}, {batch_size}")
    target = torch.as_tensor(target, device=x.device).long()
    if target.ndim == 0:
        target = target.expand(batch)
    if target.shape != (batch,):
        raise ValueError(f"target must be a class index or ({batch},) of them; got shape "
                         f"{tuple(target.shape)}")

    # signals of one length at a time, cut to it: an occlusion window never reaches into
    # padding, and a signal gets the attribution it gets alone, whatever else is in the batch
    if lengths is None:
        groups = [(total, torch.arange(batch, device=x.device))]
    else:
        groups = [(int(n), torch.nonzero(lengths == n).squeeze(1))
                  for n in torch.unique(lengths).tolist()]
    was_training = model.training
    model.eval()
    try:
        # out of Lightning's inference mode (its test hooks run inside it): a normal tensor,
        # and gradients for integrated gradients; fp32, so occluded differences are not
        # lost to bf16 rounding; eager even where the model (or its blocks) is compiled: every
        # occluded batch has a new shape, which would compile (and record a CUDA graph) again
        with (torch.inference_mode(False), torch.enable_grad(),
              torch.autocast(x.device.type, enabled=False),
              torch.compiler.set_stance("force_eager")):
            forward = _TargetOutput(model, output)
            result = torch.zeros(batch, total, device=x.device)  # 0 in the padding
            for n, rows in groups:
                inputs = x[rows, :n].detach().clone().float()
                extra = None if lengths is None else (lengths[rows].clone(),)
                if method == "occlusion":
                    size, step = occlusion_window(n)
                    size = min(window or size, n)
                    step = stride or (step if window is None else max(1, size // 2))
                    values = Occlusion(forward).attribute(
                        inputs, sliding_window_shapes=(size,), strides=(step,),
                        baselines=float(baseline), target=target[rows],
                        additional_forward_args=extra,
                        perturbations_per_eval=max(1, batch_size // len(rows)))
                else:
                    values = IntegratedGradients(forward).attribute(
                        inputs, baselines=float(baseline), target=target[rows],
                        additional_forward_args=extra, n_steps=steps,
                        internal_batch_size=max(batch_size, len(rows)))
                result[rows, :n] = values.detach().float()
    finally:
        model.train(was_training)
    return result
