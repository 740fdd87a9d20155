"""The recurrent rules' backward through time, alone: each cell type's ``backward`` (one
layer and direction) as this checkout has it and as another revision had it, timed
alternately in one process.

The other revision's ``indigrad/rules/recurrent.py`` is read with ``git show`` and loaded
beside this one (the rest of indigrad is this checkout's).

    python benchmarks/bptt_loops.py --against e5a3f55            # n = T = 32, H = 128
    python benchmarks/bptt_loops.py --against HEAD~3 --n 64 --T 100 --H 256
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from _rounds import interleaved

from indigrad.rules import recurrent


def _load(rev: str) -> types.ModuleType:
    """``indigrad/rules/recurrent.py`` at ``rev``, as a module of ``indigrad.rules``."""
    root = os.path.join(os.path.dirname(__file__), "..")
    source = subprocess.run(
        ["git", "show", f"{rev}:indigrad/rules/recurrent.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    name = "indigrad.rules._recurrent_at_rev"
    module = types.ModuleType(name)
    module.__package__ = "indigrad.rules"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:recurrent.py", "exec"), module.__dict__)
    return module


def _cells(n: int, T: int, H: int) -> dict[str, dict[str, torch.Tensor]]:
    """Each cell type's fields, random (gates in (0, 1)), one layer and direction."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int, unit: bool = False) -> torch.Tensor:
        return torch.rand(*shape, generator=g) if unit else torch.randn(*shape, generator=g)

    W = 0.05  # a recurrent weight that neither explodes nor vanishes over T steps
    return {
        "_LSTMCells": {
            "prev": r(n, T, H),
            **{k: r(n, T, H, unit=True) for k in ("i", "f", "g", "o")},
            "c": r(n, T, H),
            "c_prev": r(n, T, H),
            "W_hh": W * r(4 * H, H),
        },
        "_GRUCells": {
            "prev": r(n, T, H),
            "z": r(n, T, H, unit=True),
            "K_gi": r(n, T, 3 * H),
            "K_gh": r(n, T, 3 * H),
            "W_hh": W * r(3 * H, H),
        },
        "_RNNCells": {"prev": r(n, T, H), "slope": r(n, T, H, unit=True), "W_hh": W * r(H, H)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", required=True, help="the git revision to compare with")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--T", type=int, default=32)
    parser.add_argument("--H", type=int, default=128)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    other = _load(args.against)
    Gh = torch.randn(args.n, args.T, args.H)
    for kind, fields in _cells(args.n, args.T, args.H).items():
        runs: dict[str, Callable[[], Any]] = {}
        for label, module in (("this", recurrent), (args.against, other)):
            cells = getattr(module, kind)(**fields)
            runs[label] = lambda c=cells: c.backward(Gh, None, None, False)
        exact = [  # the same gradients, checked in float64
            getattr(module, kind)(**{k: v.double() for k, v in fields.items()}).backward(
                Gh.double(), None, None, False
            )[0]
            for module in (recurrent, other)
        ]
        torch.testing.assert_close(*exact, rtol=1e-10, atol=1e-12)
        times = interleaved(runs, args.calls, warmup=10, alternate=True)
        medians = {k: s * 1e3 for k, s in times.items()}
        print(
            f"{kind:<11} {args.against}: {medians[args.against]:.2f} ms   "
            f"this checkout: {medians['this']:.2f} ms"
        )


if __name__ == "__main__":
    main()
