"""Whole-step timing of indigrad against plain training and other ways to get per-example
gradients, in one process, as ratios to the plain step.

Every method times the same thing a user would run per batch: the forward, the backward
work, and (for steps) ``optimizer.step()``. Times are medians over repeats after warm-up,
with device synchronisation on CUDA.

    plain        forward, loss.mean().backward(), SGD step
    grads        forward, cap.grads(losses)                 (n, *p.shape) per parameter
    norms        forward, cap.norms(losses)                 (n,)
    clipped      forward, cap.clip_(losses, 1.0), SGD step
    loop         one forward/backward per example           (n, *p.shape) per parameter
    torch.func   vmap(grad(loss of one example))            (n, *p.shape) per parameter

Example (tiny, so it runs in a doctest):
    >>> import torch, indigrad.bench as bench
    >>> problem = bench.mlp_problem(8, [8], 2, batch=4)
    >>> results = bench.run(problem, ["plain", "norms"], repeats=2, warmup=1)
    >>> sorted(results), results["plain"]["ratio"]
    (['norms', 'plain'], 1.0)
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import capture
from .testing import loop_grads

__all__ = ["METHODS", "Problem", "mlp_problem", "run", "table"]


class MLP(nn.Module):
    """Hidden Linear layers with ReLU and an output layer (the seed's architecture, with
    ``num_classes`` outputs)."""

    def __init__(self, input_size: int, hidden_sizes: list[int], num_classes: int = 1) -> None:
        super().__init__()
        self.act = F.relu
        sizes = [input_size, *hidden_sizes]
        self.hidden_layers = nn.ModuleList([nn.Linear(i, o) for i, o in itertools.pairwise(sizes)])
        self.output_layer = nn.Linear(hidden_sizes[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden_layers:
            x = self.act(layer(x))
        return self.output_layer(x)


@dataclass
class Problem:
    """A model, a batch, and a per-example loss ``loss(model(x), y) -> (n,)``."""

    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    loss: Callable[[Tensor, Tensor], Tensor]

    @property
    def batch(self) -> int:
        return self.x.shape[0]


def mlp_problem(
    input_size: int = 784,
    hidden_sizes: Sequence[int] = (512, 256),
    num_classes: int = 10,
    batch: int = 256,
    device: str = "cpu",
    seed: int = 0,
) -> Problem:
    """The seed MLP (784-512-256-10 by default) on random data, cross-entropy."""
    torch.manual_seed(seed)
    model = MLP(input_size, list(hidden_sizes), num_classes).to(device)
    x = torch.randn(batch, input_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    sizes = "-".join(str(s) for s in (input_size, *hidden_sizes, num_classes))
    return Problem(f"MLP {sizes}, n={batch}", model, x, y, _cross_entropy)


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")  # (n,)


def _plain(p: Problem, opt: torch.optim.Optimizer) -> None:
    p.loss(p.model(p.x), p.y).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _grads(p: Problem, opt: torch.optim.Optimizer) -> None:
    with capture(p.model) as cap:
        cap.grads(p.loss(p.model(p.x), p.y))


def _norms(p: Problem, opt: torch.optim.Optimizer) -> None:
    with capture(p.model) as cap:
        cap.norms(p.loss(p.model(p.x), p.y))


def _clipped(p: Problem, opt: torch.optim.Optimizer) -> None:
    with capture(p.model) as cap:
        cap.clip_(p.loss(p.model(p.x), p.y), max_norm=1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _loop(p: Problem, opt: torch.optim.Optimizer) -> None:
    loop_grads(p.model, lambda x, y: p.loss(p.model(x), y), p.x, p.y)


def _torch_func(p: Problem, opt: torch.optim.Optimizer) -> None:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in p.model.named_parameters() if v.requires_grad}

    def one(theta: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(p.model, theta, (x[None],))
        return p.loss(out, y[None]).sum()

    vmap(grad(one), in_dims=(None, 0, 0))(params, p.x, p.y)


METHODS: dict[str, Callable[[Problem, torch.optim.Optimizer], None]] = {
    "plain": _plain,
    "grads": _grads,
    "norms": _norms,
    "clipped": _clipped,
    "loop": _loop,
    "torch.func": _torch_func,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    problem: Problem,
    methods: Sequence[str],
    repeats: int = 20,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Median seconds per step of each method on ``problem``, and the ratio to ``plain``
    (timed too if not asked for). Methods are timed round-robin, one step each per round,
    so that a slow drift of the machine affects them all alike. The per-example loop is
    slow by design and runs in every tenth round only. A method that raises is reported
    with its error instead of a time.
    """
    order = ["plain", *[m for m in methods if m != "plain"]]
    opt = torch.optim.SGD(problem.model.parameters(), lr=1e-3)
    device = problem.x.device
    times: dict[str, list[float]] = {m: [] for m in order}
    errors: dict[str, str] = {}
    peaks: dict[str, int] = {}

    def step(method: str) -> float:
        start = time.perf_counter()
        METHODS[method](problem, opt)
        _sync(device)
        return time.perf_counter() - start

    for method in order:
        try:
            for _ in range(warmup):
                step(method)
        except Exception as err:  # a method that crashes is reported, not hidden
            errors[method] = f"{type(err).__name__}: {err}"
    for r in range(repeats):
        if progress is not None:
            progress(f"round {r + 1}/{repeats}")
        for method in order:
            if method in errors or (method == "loop" and r % 10):
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[method].append(step(method))
            if device.type == "cuda":
                peaks[method] = torch.cuda.max_memory_allocated(device)
    results: dict[str, dict[str, Any]] = {}
    for method in order:
        if method in errors:
            results[method] = {"error": errors[method]}
        else:
            results[method] = {"seconds": statistics.median(times[method])}
            results[method]["repeats"] = len(times[method])
            if method in peaks:
                results[method]["peak_bytes"] = peaks[method]
    base = results["plain"].get("seconds")
    for res in results.values():
        if "seconds" in res and base:
            res["ratio"] = res["seconds"] / base
    if "plain" not in methods:
        results.pop("plain")
    return results


def table(problem: Problem, results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of ``run``'s results."""
    lines = [f"{problem.name} on {problem.x.device.type}, torch {torch.__version__}"]
    lines.append(f"{'method':<12} {'ms/step':>10} {'× plain':>9}")
    for method, r in results.items():
        if "error" in r:
            lines.append(f"{method:<12} {'fails':>10}   {r['error'][:60]}")
        else:
            lines.append(f"{method:<12} {r['seconds'] * 1e3:>10.2f} {r['ratio']:>8.2f}×")
    return "\n".join(lines)
