"""The host's time per operator at ResNet-18's layer shapes, on a device.

A small model's GPU step is bound by the host issuing operators; this times what one
costs: each operator issued ``--calls`` times in a row, the best of three rounds. At
n = 2 the GPU's own time is negligible, so the figure is the host's; at n = 256 a large
kernel can make the host wait (the second column, with the final synchronisation, shows
it).

    python benchmarks/op_cost.py --device cuda
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def per_call(fn: Callable[[], object], device: str, calls: int) -> tuple[float, float]:
    """µs per call: issuing only, and until the device has finished."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(20):
        fn()
    sync()
    best = (float("inf"), float("inf"))
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        issued = time.perf_counter()
        sync()
        done = time.perf_counter()
        best = min(best, ((issued - start) / calls * 1e6, (done - start) / calls * 1e6))
    return best


def operators(n: int, C: int, H: int, device: str) -> dict[str, Callable[[], object]]:
    """A conv's and a GroupNorm's operators in indigrad's rules, at (n, C, H, H)."""
    x = torch.randn(n, C, H, H, device=device)
    G, w = torch.randn_like(x), torch.randn(C, C, 3, 3, device=device)
    mean, rstd = torch.randn(n, 32, device=device), torch.rand(n, 32, device=device)
    ones, P, c = torch.ones(n, C, device=device), H * H, torch.rand(n, device=device)
    L = torch.randn(n, C, P, device=device)
    xp = F.pad(x, [1, 1, 1, 1])
    window = (n, C, 3, 3, H, H), (C * (H + 2) ** 2, (H + 2) ** 2, H + 2, 1, H + 2, 1)
    flags = [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]

    def group_norm_sums() -> object:  # what the kernel replaces: x̂ ⊙ G and G, summed
        xhat = (x.view(n, 32, -1) - mean[..., None]) * rstd[..., None]
        return xhat.view(n, C, P).mul_(G.view(n, C, P)).sum(2), G.sum((2, 3))

    return {
        "x + 1": lambda: x + 1,
        "view": lambda: x.view(n, C, P),
        "cat of two": lambda: torch.cat([x, G], 1),
        "vector_norm": lambda: torch.linalg.vector_norm(L, dim=(1, 2)),
        "G * c": lambda: G * c.view(-1, 1, 1, 1),
        "bmm (P×P Gram)": lambda: torch.bmm(L.transpose(1, 2), L),
        "pad": lambda: F.pad(x, [1, 1, 1, 1]),
        "im2col copy": lambda: xp.as_strided(*window).reshape(n, C * 9, P),
        "conv2d": lambda: F.conv2d(x, w, padding=1),
        "conv weight grad": lambda: aten.convolution_backward(G, x, w, None, *flags),
        "group_norm dγ dβ": lambda: aten.native_group_norm_backward(
            G, x, mean, rstd, ones, 1, n * C, P, n * 32, [False, True, True]
        ),
        "the same by sums": group_norm_sums,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    print(f"torch {torch.__version__} on {args.device}; µs per call: issued, finished")
    for n in (2, 256):
        for C, H in ((64, 8), (256, 2)):
            for name, fn in operators(n, C, H, args.device).items():
                issued, done = per_call(fn, args.device, args.calls)
                print(f"n={n:<3} C={C:<3} {H}×{H}  {name:<18} {issued:7.1f} {done:7.1f}")


if __name__ == "__main__":
    main()
