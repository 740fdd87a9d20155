"""The ATen operators one step of each method dispatches, on CPU tensors, with the cost
choices a GPU would make.

A GPU step of a small model is bound by the host: every operator costs it a few
microseconds to dispatch and launch, whatever the size of its tensors. The count does not
need a GPU, but which operators run depends on the cost choices of ``indigrad.rules._cost``
(and the size limit of ``indigrad._joint``, and the CPU's buffer pool), which differ
between CPU and GPU; ``--as`` makes the CPU take another device's settings. The shapes are
the zoo's GPU shapes unless ``--cpu-shapes`` (the GPT's take minutes on a 2-core CPU).

    python benchmarks/host_ops.py                       # ResNet-18, as on a GPU
    python benchmarks/host_ops.py --problems mlp --batch 8     # faster: fewer examples
    python benchmarks/host_ops.py --problems mlp,cnn --as cpu --cpu-shapes
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

import indigrad._joint as joint
from indigrad import _alloc, bench
from indigrad.bench.methods import METHODS
from indigrad.rules import _cost, conv, normalization

TABLES = [
    (_cost, "_PASS_COST"),
    (_cost, "_GROWTH"),
    (_cost, "_BUDGET_SHARE"),
    (joint, "_MAX_ELEMENTS"),
]


def act_as(device: str, set_attr: Callable[[Any, str, Any], None] = setattr) -> None:
    """Give the CPU ``device``'s settings (a device without its own entry: the default),
    and on behalf of a GPU no buffer pool (it changes how convs unfold), ``F.unfold`` of
    the batch as one image (CUDA's launches a kernel per image), GroupNorm's dγ and dβ
    from its backward kernel (same-shaped GroupNorms' from one call), LayerNorm's x̂ from
    ``layer_norm``, convs' per-example gradients and im2col as on a GPU (by im2col and a
    batched product; copied in the strided window's order), and same-shaped convs stacked
    (``indigrad/_stack.py``). Each setting is replaced through ``set_attr`` (a test's
    ``monkeypatch.setattr`` undoes them)."""
    if device != "cpu":
        set_attr(_alloc, "_MIN_BYTES", sys.maxsize)
        set_attr(conv, "_BATCHED_UNFOLD", conv._BATCHED_UNFOLD - {"cpu"})
        set_attr(conv, "_ONE_IMAGE_UNFOLD", conv._ONE_IMAGE_UNFOLD | {"cpu"})
        set_attr(normalization, "_GN_KERNEL_DEVICES", normalization._GN_KERNEL_DEVICES | {"cpu"})
        set_attr(normalization, "_GN_STACKED", normalization._GN_STACKED | {"cpu"})
        set_attr(normalization, "_LN_SAVED_DEVICES", normalization._LN_SAVED_DEVICES - {"cpu"})
        set_attr(conv, "_BY_POSITION", conv._BY_POSITION - {"cpu"})
        set_attr(conv, "_DEPTHWISE_BY_CONV", conv._DEPTHWISE_BY_CONV - {"cpu"})
        set_attr(conv, "_BY_GROUPS", conv._BY_GROUPS - {"cpu"})
        set_attr(conv, "_RAGGED_ROWS", conv._RAGGED_ROWS - {"cpu"})
        set_attr(conv, "_STACKED", conv._STACKED | {"cpu"})
    for module, name in TABLES:
        table = dict(getattr(module, name))
        if device in table:
            table["cpu"] = table[device]
        else:
            table.pop("cpu", None)
        set_attr(module, name, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", default="resnet18")
    parser.add_argument("--methods", default="plain,norms,clipped,grads")
    parser.add_argument("--as", dest="device", default="cuda", help="whose cost settings")
    parser.add_argument("--cpu-shapes", action="store_true", help="the zoo's CPU sizes")
    parser.add_argument(
        "--batch",
        type=int,
        help="fewer examples, for speed (GPU shapes only); the count may differ where a "
        "gradient's size decides (the joint's limit counts all examples' elements)",
    )
    args = parser.parse_args()
    act_as(args.device)
    zoo = bench.zoo("cpu", sizes="cpu" if args.cpu_shapes else "cuda")
    print(f"torch {torch.__version__}; cost settings of {args.device}")
    print(f"{'problem':<58} {'method':<8} {'ops':>6} {'not views':>10}")
    for key in args.problems.split(","):
        problem = zoo[key]()
        if args.batch and not args.cpu_shapes:
            name = f"{problem.name} (counted at n={args.batch})"
            x, y = problem.x[: args.batch], problem.y[: args.batch]
            problem = bench.Problem(name, problem.make_model, x, y, problem.loss)
        for method in args.methods.split(","):
            step = METHODS[method](problem)
            step()  # the first step may build what later ones reuse
            ops = bench.count_ops(step)
            not_views = ops["all"] - ops["views"]
            print(f"{problem.name:<58} {method:<8} {ops['all']:>6} {not_views:>10}", flush=True)


if __name__ == "__main__":
    main()
