"""A conv's per-example weight gradients two ways: im2col and a batched product, or one
weight gradient of a conv with the examples as its groups (``indigrad/rules/conv.py``,
``_grouped``), over a grid of shapes; float32, milliseconds per call (median).

On a CPU the rules take the groups where this measured faster (``conv._by_groups``); on a
GPU they keep im2col, and this grid is what a device session would look at to decide
otherwise (there the grouped weight gradient is also one operator for the host instead of
two or three).

    python benchmarks/conv_by_groups.py
    python benchmarks/conv_by_groups.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import functools
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from _rounds import interleaved
from torch import nn

from indigrad.rules import conv


def im2col(layer: nn.Conv2d, x: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    L, R = conv._factors(layer, x, G)  # (n, a, P), (n, b, P)
    return torch.bmm(L, R.transpose(1, 2))  # (n, a, b)


WIDTHS = [(3, 32), (16, 16), (32, 64), (64, 64), (128, 128), (256, 256)]


def grid(device: str, batches: list[int], max_mb: float) -> Iterator[dict[str, Any]]:
    """Both ways timed for each shape of the grid (3×3 and 1×1 convs, padding 1 and 0, on
    32² to 4² images) whose gradients take at most ``max_mb`` MB."""
    for n, (c_in, c_out), side, k in itertools.product(batches, WIDTHS, [32, 16, 8, 4], [3, 1]):
        if n * c_in * c_out * k * k * 4 > max_mb * 1e6:
            continue
        layer = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False).to(device)
        x = torch.randn(n, c_in, side, side, device=device)
        G = torch.randn(n, c_out, side, side, device=device)
        padding, xp = conv._conv_padding(layer, x)
        ways = {
            "im2col": functools.partial(im2col, layer, x, G),
            "groups": functools.partial(conv._grouped, layer, xp, G, padding),
        }
        ms = {k: v * 1e3 for k, v in interleaved(ways, 15, cuda=device == "cuda").items()}
        a, b = ms["im2col"], ms["groups"]
        yield {
            "n": n,
            "c_in": c_in,
            "c_out": c_out,
            "side": side,
            "k": k,
            "im2col_ms": a,
            "groups_ms": b,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--max-mb", type=float, default=200, help="skip larger gradients")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.device}, float32; ms per call")
    print(f"{'n':>4} {'C_in':>5} {'C_out':>5} {'side':>4} {'k':>2}   im2col+bmm  groups  ratio")
    for r in grid(args.device, args.batch, args.max_mb):
        a, b = r["im2col_ms"], r["groups_ms"]
        print(
            f"{r['n']:4d} {r['c_in']:5d} {r['c_out']:5d} {r['side']:4d} {r['k']:2d}   "
            f"{a:10.3f} {b:7.3f} {b / a:6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
