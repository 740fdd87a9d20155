"""Precision of the per-example arithmetic under ``torch.autocast``.

A forward under autocast hands the rules bf16/fp16 activations and output gradients.
Rules run with autocast off, on inputs and gradients upcast to the parameters' dtype, so
norms and clipped sums are computed in float32 for float32 parameters.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

# True while rules run: a forward they cause (activation checkpointing recomputes a
# region when a rule unpacks a tensor its nodes saved) is not recorded (capture.py)
RULES_RUNNING: ContextVar[bool] = ContextVar("indigrad_rules_running", default=False)


def _exact(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a rule without autograd recording and without autocast: rules compute in the
    parameters' precision even when the forward ran under ``torch.autocast``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        grad = torch.is_grad_enabled()
        if RULES_RUNNING.get() and not grad:
            return fn(*args, **kwargs)  # called by another: its settings hold
        token = RULES_RUNNING.set(True)
        torch._C._set_grad_enabled(False)  # torch.no_grad(), without its objects' cost
        try:
            if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
                with _no_autocast():
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(grad)
            RULES_RUNNING.reset(token)

    return wrapper


@contextmanager
def _no_autocast() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _param_dtype(call: Any) -> torch.dtype:
    return next(iter(call.params.values())).dtype


def _upcast(t: Any, dtype: torch.dtype) -> Any:
    """A low-precision floating tensor (autocast's bf16/fp16) in the parameters' dtype."""
    low = isinstance(t, Tensor) and t.is_floating_point() and dtype.is_floating_point
    if low and t.dtype.itemsize < dtype.itemsize:
        return t.to(dtype)
    return t
