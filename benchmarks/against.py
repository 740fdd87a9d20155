"""Another revision's clipped step (or ``grads``, ``norms``) against this tree's,
interleaved in one process.

Timings of separate processes, on a shared machine or a GPU machine's host, differ by
10–30 % from one process to the next: more than most changes to a step. So this loads the
other revision's ``indigrad`` beside this one (as the package ``indigrad_base``; the
package imports itself relatively) and times plain, the other's step and this tree's in
turn, round after round, on one model. ``--tiny-mlp`` times what a step costs besides its
layers' work: an MLP so small that its operators cost next to nothing. ``--two-inputs``
hands the model its batch with a mask of ones beside it, as a Hugging Face model takes
``attention_mask``: a model with two inputs of the batch's size has them followed through
the graph each step (which rows are the examples' is then a question), and this times that.

    python benchmarks/against.py 0ad6047                          # the zoo's ResNet-18
    python benchmarks/against.py 0ad6047 --problem gpt --rounds 20
    python benchmarks/against.py 0ad6047 --tiny --as cuda         # host_time.py's model
    python benchmarks/against.py 0ad6047 --tiny-mlp --methods grads,clipped --rounds 3000
    python benchmarks/against.py 0ad6047 --problem gpt --two-inputs   # (ids, mask) inputs
    python benchmarks/against.py --base DIR --device cuda   # DIR/indigrad_base, made
                                                            # here (a device has no git)

``--export REV DIR`` only writes ``DIR/indigrad_base`` from a revision, to carry to a
machine without the repository's history.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from _rounds import interleaved

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# the cost settings host_ops.act_as changes, by module: copied onto the other revision's
SETTINGS = {
    "_alloc": ["_MIN_BYTES"],
    "_joint": ["_MAX_ELEMENTS"],
    "rules._cost": ["_PASS_COST", "_GROWTH", "_BUDGET_SHARE"],
    "rules.conv": [
        "_BATCHED_UNFOLD",
        "_ONE_IMAGE_UNFOLD",
        "_BY_POSITION",
        "_DEPTHWISE_BY_CONV",
        "_BY_GROUPS",
        "_RAGGED_ROWS",
        "_STACKED",
    ],
    "rules.normalization": ["_GN_KERNEL_DEVICES", "_LN_SAVED_DEVICES", "_GN_STACKED"],
}


def export(rev: str, into: Path) -> None:
    """Write ``rev``'s ``indigrad`` package to ``into/indigrad_base``."""
    tar = subprocess.run(
        ["git", "archive", rev, "indigrad"], cwd=HERE.parent, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    (into / "indigrad").rename(into / "indigrad_base")


def train_step(lib: Any, method: str, *, model: Any, x: Any, y: Any, loss: Any, opt: Any) -> None:
    """One training step: ``plain`` (the summed losses' backward), or ``lib``'s (an
    ``indigrad`` package) clipped step, ``grads`` or ``norms``; then the optimizer's step,
    after ``grads`` and ``norms`` too, as in ``indigrad bench``: a step's cost."""
    if method == "plain":
        loss(model(x), y).sum().backward()
    else:
        with lib.capture(model) as cap:
            if method == "clipped":
                cap.clip_(loss(model(x), y), max_norm=1.0)
            else:
                getattr(cap, method)(loss(model(x), y))
    opt.step()
    opt.zero_grad(set_to_none=True)


def act_as_both(device: str) -> None:
    """``host_ops.act_as`` for this tree, then the same settings on the other revision."""
    from host_ops import act_as

    act_as(device)
    for module, names in SETTINGS.items():
        mine = importlib.import_module(f"indigrad.{module}")
        theirs = importlib.import_module(f"indigrad_base.{module}")
        for name in names:
            if hasattr(theirs, name):
                setattr(theirs, name, getattr(mine, name))


class Masked(torch.nn.Module):
    """A model whose output is multiplied by a mask handed in beside its input."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, keep = pair  # (n, T, …), (n, T)
        out = self.inner(x)  # (n, T, …)
        return out * keep.view(*keep.shape, *[1] * (out.dim() - 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rev", nargs="?", help="the other revision (git)")
    parser.add_argument("--base", type=Path, help="a folder holding indigrad_base instead")
    parser.add_argument("--export", type=Path, help="only write REV's package into this folder")
    parser.add_argument("--problem", default="resnet18", help="a problem of the zoo, or an extra")
    parser.add_argument("--tiny", action="store_true", help="host_time.py's tiny ResNet-18")
    parser.add_argument(
        "--tiny-mlp", action="store_true", help="an MLP 8-16-16-4 on 4 examples: the fixed costs"
    )
    parser.add_argument(
        "--two-inputs", action="store_true", help="the batch and a mask of ones, as a tuple"
    )
    parser.add_argument("--methods", default="clipped", help="of clipped, grads, norms")
    parser.add_argument("--as", dest="act_as", help="take this device's cost settings")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    if args.export:
        export(args.rev, args.export)
        return
    folder = args.base or Path(tempfile.mkdtemp(prefix="indigrad-against-"))
    if args.base is None:
        if args.rev is None:
            parser.error("give a revision or --base")
        export(args.rev, folder)
    sys.path.insert(0, str(folder))
    import indigrad_base  # type: ignore[import-not-found]

    import indigrad
    from indigrad import bench

    if args.act_as:
        act_as_both(args.act_as)
    if args.tiny:
        from host_time import tiny_problem

        torch.set_num_threads(1)
        problem = tiny_problem()
    elif args.tiny_mlp:
        torch.set_num_threads(1)
        problem = bench.mlp_problem(8, [16, 16], 4, batch=4)
    else:
        problem = bench.by_name(args.problem, args.device)
    model = problem.model()
    x, y, loss = problem.x, problem.y, problem.loss
    if args.two_inputs:
        model, x = Masked(model), (x, torch.ones(x.shape[:2], device=x.device))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=args.device != "cpu")
    cuda = torch.device(args.device).type == "cuda"

    step = functools.partial(train_step, model=model, x=x, y=y, loss=loss, opt=opt)
    label = args.rev or str(args.base)
    steps: dict[str, Any] = {"plain": functools.partial(step, None, "plain")}
    for method in args.methods.split(","):
        if method not in ("clipped", "grads", "norms"):
            parser.error(f"unknown method {method!r}")
        steps[f"{method} ({label})"] = functools.partial(step, indigrad_base, method)
        steps[f"{method} (this tree)"] = functools.partial(step, indigrad, method)
    median = {k: s * 1e3 for k, s in interleaved(steps, args.rounds, cuda=cuda).items()}
    print(f"{problem.name}, torch {torch.__version__}, {args.rounds} interleaved rounds")
    for name, ms in median.items():
        print(f"  {name:<28} {ms:8.3f} ms  {ms / median['plain']:.3f}× plain")


if __name__ == "__main__":
    main()
