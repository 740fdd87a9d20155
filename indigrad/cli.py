"""The ``indigrad`` command: ``indigrad demo`` and ``indigrad bench``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> None:
    from . import demo

    demo.main(
        epsilons=tuple(float(e) for e in args.epsilons.split(",") if e),
        delta=args.delta,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_norm=args.max_norm,
        lr=args.lr,
        seed=args.seed,
        repeats=args.repeats,
        plot_path=None if args.no_plot else args.plot,
        progress=not args.no_progress,
    )


def _bench(args: argparse.Namespace) -> None:
    from . import bench

    if args.sizes:
        sizes = [int(s) for s in args.sizes.split("-")]
        if len(sizes) < 3:
            raise SystemExit("--sizes needs at least input-hidden-output, e.g. 784-512-256-10")
        problems = {
            "mlp": lambda: bench.mlp_problem(
                sizes[0], sizes[1:-1], sizes[-1], args.batch or 256, args.device
            )
        }
    else:
        zoo = bench.zoo(args.device)
        available = {**zoo, **bench.extras(args.device)}
        names = args.problems.split(",") if args.problems else list(zoo)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise SystemExit(f"unknown problems {unknown}; choose from {list(available)}")
        problems = {n: available[n] for n in names}
    if args.graphs and not args.device.startswith("cuda"):
        raise SystemExit(f"--graphs needs a CUDA device (--device cuda), not {args.device}")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in bench.METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(bench.METHODS)}")

    where = bench.machine(args.device)
    print(f"{where}\n", flush=True)
    report: dict[str, object] = {
        "torch": torch_version(),
        "device": args.device,
        "machine": where,
        "problems": {},
    }
    for key, make in problems.items():
        try:
            problem = make()
        except ImportError as err:
            print(f"{key}: skipped ({err})\n")
            continue

        def progress(msg: str, name: str = problem.name) -> None:
            if not args.no_progress:
                print(f"\r\033[K{name}: {msg}", end="", file=sys.stderr, flush=True)

        results = bench.run(
            problem,
            methods,
            repeats=args.repeats,
            progress=progress,
            ops=args.ops,
            graphs=args.graphs,
        )
        if not args.no_progress:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        print(bench.table(problem, results) + "\n", flush=True)
        report["problems"][problem.name] = results  # type: ignore[index]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot and report["problems"]:
        bench.plot(report["problems"], args.plot)  # type: ignore[arg-type]
        print(f"plot written to {args.plot}")


def torch_version() -> str:
    import torch

    return str(torch.__version__)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="indigrad", description="Per-example gradients for PyTorch models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="DP-SGD on scikit-learn's digits, then timings")
    demo.add_argument("--epsilons", default="3,8", help="target ε of each private run")
    demo.add_argument("--delta", type=float, default=1e-5)
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--batch-size", type=int, default=64, help="expected batch size")
    demo.add_argument("--max-norm", type=float, default=0.3)
    demo.add_argument("--lr", type=float, default=2.0)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--repeats", type=int, default=30, help="timing rounds")
    demo.add_argument("--plot", default="indigrad-demo.png", help="where to write the plot")
    demo.add_argument("--no-plot", action="store_true")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_demo)

    from . import bench as _zoo
    from .bench.methods import METHODS

    bench = sub.add_parser("bench", help="time indigrad against plain training and peers")
    bench.add_argument(
        "--problems",
        help=f"comma-separated problems of the zoo ({', '.join(_zoo.zoo('cpu'))}; default: "
        "all of them), or the extras 'vit', 'convnext' (torchvision's VisionTransformer and "
        "ConvNeXt), 'lstm', 'gru', 'rnn' (2-layer recurrent classifiers) and 'seq2seq' "
        "(nn.Transformer)",
    )
    bench.add_argument("--sizes", help="a custom MLP instead, e.g. 784-512-256-10")
    bench.add_argument("--batch", type=int, help="batch size of the custom MLP (256)")
    bench.add_argument("--device", default="cuda" if _cuda() else "cpu")
    bench.add_argument("--repeats", type=int, default=20)
    bench.add_argument(
        "--methods",
        default="plain,grads,norms,clipped,torch.func,opacus,opacus-ew,opacus-ghost,"
        "backpack,backpack-norms",
        help=f"comma-separated, of {', '.join(METHODS)}; loop is one backward per example, "
        "dp the clipped step with GaussianNoise added, the others after 'clipped' peers "
        "(one that is not installed, or fails, is reported so in its row)",
    )
    bench.add_argument("--json", help="also write the results to this JSON file")
    bench.add_argument("--plot", help="also write a bar chart of the ratios to this PNG file")
    bench.add_argument(
        "--ops",
        action="store_true",
        help="also count the ATen operators of one step of each method (those that are "
        "not views launch kernels on a GPU): where a GPU step is bound by the host, they "
        "set its time",
    )
    bench.add_argument(
        "--graphs",
        action="store_true",
        help="CUDA: capture every method's step, plain's too, as a CUDA graph and time its "
        "replays: the device's work without the host's",
    )
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(run=_bench)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
