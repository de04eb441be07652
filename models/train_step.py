"""The whole train step as one CUDA graph: forward, mixup loss, backward, clipping, AdamW.

A `SignalClassifierModule` step on a GPU launches hundreds of kernels; on a small model the
host spends longer launching them (and running Lightning's loop around them) than the GPU
spends running them. `CapturedTrainStep` records the step once and then replays it: one graph
launch a step, whatever the model. It follows PyTorch's whole-network capture recipe
(docs: "CUDA Graphs", torch.cuda.graph):

- the first `warmup` steps run eagerly on a side stream (they are real training steps: cuBLAS,
  cuFFT and the optimizer's state are initialised there, outside the graph);
- the next step is captured with the gradients unset, so backward allocates them from the
  graph's memory pool and every replay overwrites them (nothing accumulates);
- each later step copies its batch, its mixup weight, its mixup partners and, for padded
  batches, the signals' lengths into the graph's static inputs and replays it.

A graph is recorded for one batch shape and one kind of batch: with lengths (zero-padded
signals, whose masks then take their values from the lengths input at every replay) or
without.

The learning rate lives in a device tensor (`GraphAdamW`) that the schedule fills in place, so
the replayed update follows the schedule. Random numbers drawn on the GPU inside the model
(dropout, SpecAugment masks) advance with every replay. Whatever cannot be captured (a host
sync inside the model, an unsupported op) is reported by `capture()` raising, and the step
runs eagerly instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class GraphAdamW(torch.optim.AdamW):
    """AdamW (fused, capturable) for `CapturedTrainStep`, whose update may already have run
    inside the train step (a replay, or an eager warm-up step): `step(closure)` then only runs
    Lightning's closure. Its learning rates are device tensors that LambdaLR fills in place
    (a replay reads them there); checkpoints hold them as plain numbers, so they load into any
    optimizer, and loading gives tensors back."""

    def __init__(self, params: Any, lr: float, **kwargs: Any) -> None:
        groups = list(params)
        device = _device_of(groups)
        super().__init__(groups, lr=torch.tensor(float(lr), device=device), fused=True,
                         capturable=True, **kwargs)
        for group in self.param_groups:  # groups may carry their own float lr
            group["lr"] = _lr_tensor(group["lr"], device)
        self.updated_in_step = False

    def update(self) -> None:
        """The AdamW update itself (what a captured step records)."""
        super().step()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.updated_in_step:  # the train step in the closure has updated the weights
            self.updated_in_step = False
            return loss
        self.update()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for group in state["param_groups"]:
            if isinstance(group["lr"], Tensor):
                group["lr"] = float(group["lr"])
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        device = _device_of(self.param_groups)
        for group in self.param_groups:
            group["lr"] = _lr_tensor(group["lr"], device)


def _device_of(groups: list[Any]) -> torch.device:
    for group in groups:
        params = group["params"] if isinstance(group, dict) else [group]
        for param in params:
            return param.device
    raise ValueError("GraphAdamW needs at least one parameter")


def _lr_tensor(lr: float | Tensor, device: torch.device) -> Tensor:
    if isinstance(lr, Tensor) and lr.device == device:
        return lr
    return torch.tensor(float(lr), dtype=torch.float32, device=device)


Loss = Callable[[Tensor, Tensor], Tensor]


class CapturedTrainStep:
    """One training step of `model` as a CUDA graph (see the module docstring).

    model: (B, T) -> logits ((B, K), or any shape `loss` takes), in training mode; a module or
    a function of one. loss: (logits, y) -> scalar.
    clip_norm / clip_value: gradient clipping (0: off), done inside the graph.
    Calls take one batch shape, with lengths or without as the graph was recorded: `accepts`
    says whether a batch is such (and is on the model's GPU); other batches take the eager
    step elsewhere. A model called with lengths takes model(x, lengths).
    """

    def __init__(self, model: Callable[..., Tensor], loss: Loss, optimizer: GraphAdamW,
                 clip_norm: float = 0.0, clip_value: float = 0.0, warmup: int = 3) -> None:
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.clip_norm, self.clip_value = clip_norm, clip_value
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.shape: tuple[int, ...] | None = None
        self.with_lengths: bool | None = None  # the kind of batch recorded
        self.steps = 0  # steps taken (eager warmup, capture and replays)
        self._inputs: tuple[Tensor, ...] | None = None
        self._outputs: tuple[Tensor, Tensor] | None = None
        self._params = [p for group in optimizer.param_groups for p in group["params"]]

    def accepts(self, x: Tensor, lengths: Tensor | None = None) -> bool:
        """Whether this batch can take the captured step (its shape and kind are the
        recorded ones, or nothing is recorded yet)."""
        if not x.is_cuda or (lengths is not None and not lengths.is_cuda):
            return False
        return self.shape is None or (tuple(x.shape) == self.shape
                                      and (lengths is not None) == self.with_lengths)

    def __call__(self, x: Tensor, y: Tensor, lam: float, other: Tensor,
                 lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Train on (x, y) blended with (x[other], y[other]) by lam (mixup; lam = 1 for none):
        the weights are updated in place. x: (B, T) float, y and other: (B,) int64; lengths:
        (B,) int64 real samples of zero-padded signals (a blend keeps the longer), or None.
        Returns (loss, logits as the model gave them), both detached; a replay overwrites
        them, so use them before the next call."""
        if self.shape is None:
            self.shape, self.with_lengths = tuple(x.shape), lengths is not None
        lam_t = torch.full((), float(lam), dtype=torch.float32, device=x.device)
        inputs = (x, y, lam_t, other) + (() if lengths is None else (lengths.long(),))
        if self.graph is None and self.steps < self.warmup:
            self.steps += 1
            return self._on_side_stream(*inputs)
        if self.graph is None:
            self._capture(*inputs)
        for static, value in zip(self._inputs, inputs, strict=True):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        self.steps += 1
        return self._outputs

    def _step(self, x: Tensor, y: Tensor, lam: Tensor, other: Tensor,
              lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """What the graph holds: the same as the eager training step, with lam a tensor."""
        mixed = lam * x + (1 - lam) * x[other]
        if lengths is None:
            logits = self.model(mixed)
        else:
            logits = self.model(mixed, torch.maximum(lengths, lengths[other]))
        loss = lam * self.loss(logits, y) + (1 - lam) * self.loss(logits, y[other])
        loss.backward()
        if self.clip_value > 0:
            nn.utils.clip_grad_value_(self._params, self.clip_value, foreach=True)
        if self.clip_norm > 0:
            nn.utils.clip_grad_norm_(self._params, self.clip_norm, foreach=True)
        self.optimizer.update()
        return loss.detach(), logits.detach()

    def _on_side_stream(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self._step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def _capture(self, *inputs: Tensor) -> None:
        """Record the step. Raises (a RuntimeError from CUDA or PyTorch) if the model does
        something a graph cannot hold; nothing has been trained then."""
        self._inputs = tuple(value.clone() for value in inputs)
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates them in the pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._outputs = self._step(*self._inputs)
        self.graph = graph


__all__ = ["CapturedTrainStep", "GraphAdamW"]
