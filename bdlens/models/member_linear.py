"""A linear layer that stays one fused matmul when ``torch.func.vmap`` batches its weights.

Posterior members run as ``vmap`` over a functional call with K weight sets (:mod:`bdlens.bayes.sampling`).
PyTorch's vmap rule for ``F.linear`` with batched weights computes ``bmm`` and then adds the bias in a
second pass over the whole output; for the demo model that made a batch of K = 10 members 1.35× the
cost of the deterministic model on 10 inputs. Here ``linear`` is a custom operator with its own vmap
rule, one ``torch.baddbmm`` per layer (bias fused): benchmarks/bench_bayes.py measures the gain.
A custom operator costs Python dispatch on every call (+5 % on a plain training step of the demo
model), so :class:`Linear` routes through it only inside :func:`member_batched` (which
:func:`bdlens.bayes.sampling.forward_members` enters) and is plain ``F.linear`` elsewhere, including
under autocast. Every op of the fused path (``F.linear``, ``bmm``, ``baddbmm``) is device-generic and its
outputs are made from its inputs, so it runs on whatever device the inputs are (CPU, CUDA; shapes
only on ``meta``) with no device-specific code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.library.custom_op("bdlens::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias``: x (..., in), weight (out, in), bias (out,) or None → (..., out)."""
    return F.linear(x, weight, bias)


@linear.register_fake
def _linear_fake(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor | None], output: Tensor) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    x, weight = ctx.saved_tensors
    flat_grad = grad.reshape(-1, grad.shape[-1])
    grad_weight = flat_grad.t() @ x.reshape(-1, x.shape[-1])
    return grad @ weight, grad_weight, flat_grad.sum(0) if ctx.has_bias else None


linear.register_autograd(_backward, setup_context=_setup_context)


def _linear_vmap(info: Any, in_dims: tuple[int | None, ...], x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, int]:
    x_dim, weight_dim, bias_dim = in_dims
    if weight_dim is None and bias_dim is None:  # shared weights: an ordinary linear over the batch
        return F.linear(x.movedim(x_dim, 0), weight, bias), 0
    k = info.batch_size

    def batched(t: Tensor, dim: int | None) -> Tensor:
        return t.movedim(dim, 0) if dim is not None else t.expand(k, *t.shape)

    x, weight = batched(x, x_dim), batched(weight, weight_dim)
    rows = x.reshape(k, -1, x.shape[-1])  # (K, N, in)
    if bias is None:
        out = torch.bmm(rows, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(batched(bias, bias_dim)[:, None, :], rows, weight.transpose(1, 2))
    return out.reshape(*x.shape[:-1], weight.shape[1]), 0


linear.register_vmap(_linear_vmap)


_MEMBER_BATCHED: ContextVar[bool] = ContextVar("bdlens_member_batched", default=False)


@contextmanager
def member_batched() -> Iterator[None]:
    """Within this context :class:`Linear` layers use :func:`linear` (enter it around a vmap over weights)."""
    token = _MEMBER_BATCHED.set(True)
    try:
        yield
    finally:
        _MEMBER_BATCHED.reset(token)


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for this device type (False where torch has no autocast, e.g. ``meta``,
    whose ``is_autocast_enabled`` raises)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys); computed by :func:`linear` inside :func:`member_batched`."""

    def forward(self, x: Tensor) -> Tensor:
        if _MEMBER_BATCHED.get() and not _autocast_enabled(x.device.type):
            return linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
