"""``indigrad demo``: train an MLP on scikit-learn's digits with per-example clipping, then
time plain training against indigrad's quantities and a per-example loop.

Everything runs on the CPU from data that ships inside scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import bench
from .bench import MLP
from .capture import capture


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise SystemExit(
            f"indigrad demo needs {module.split('.')[0]}: pip install 'indigrad[demo]'"
        ) from err


@dataclass
class Digits:
    x_train: Tensor  # (n_train, 64) in [0, 1]
    y_train: Tensor  # (n_train,)
    x_test: Tensor
    y_test: Tensor


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Digits:
    """scikit-learn's 8×8 digits (1797 images, 10 classes), split into train and test."""
    datasets = _need("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(data.target, dtype=torch.long)  # (1797,)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(
    data: Digits,
    epochs: int,
    batch_size: int,
    max_norm: float,
    lr: float,
    seed: int,
    progress: bool = True,
) -> tuple[MLP, dict[str, list[Any]]]:
    """SGD on the summed clipped per-example gradients, divided by the batch size."""
    tqdm = _need("tqdm").tqdm
    torch.manual_seed(seed)
    model = MLP(64, [128, 64], 10)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    history: dict[str, list[Any]] = {"test_accuracy": [], "norms": [], "clipped_fraction": []}
    n = len(data.y_train)
    steps = epochs * -(-n // batch_size)
    bar = tqdm(total=steps, desc="training with per-example clipping", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(n)
        epoch_norms = []
        for idx in perm.split(batch_size):
            x, y = data.x_train[idx], data.y_train[idx]
            with capture(model) as cap:
                norms = cap.clip_(F.cross_entropy(model(x), y, reduction="none"), max_norm)
            for p in model.parameters():
                assert p.grad is not None
                p.grad /= len(idx)
            opt.step()
            opt.zero_grad(set_to_none=True)
            epoch_norms.append(norms)
            bar.update(1)
        norms = torch.cat(epoch_norms)
        history["norms"].append(norms)
        history["clipped_fraction"].append(float((norms > max_norm).float().mean()))
        history["test_accuracy"].append(accuracy(model, data.x_test, data.y_test))
        bar.set_postfix(test_acc=f"{history['test_accuracy'][-1]:.3f}")
    bar.close()
    return model, history


def timing(
    model: MLP, data: Digits, batch_size: int, repeats: int, progress: bool = True
) -> tuple[bench.Problem, dict[str, dict[str, Any]]]:
    tqdm = _need("tqdm").tqdm
    problem = bench.Problem(
        f"digits MLP 64-128-64-10, n={batch_size}",
        lambda: copy.deepcopy(model),
        data.x_train[:batch_size],
        data.y_train[:batch_size],
        lambda out, y: F.cross_entropy(out, y, reduction="none"),
    )
    methods = ["plain", "grads", "norms", "clipped", "loop", "torch.func"]
    bar = tqdm(total=repeats, desc="timing", disable=not progress)
    def tick(message: str) -> None:
        if message.startswith("round"):
            bar.update(1)

    results = bench.run(problem, methods, repeats=repeats, progress=tick)
    bar.close()
    return problem, results


def _quantiles(norms: Tensor) -> str:
    q = torch.quantile(norms, torch.tensor([0.0, 0.5, 0.9, 1.0]))
    names = ["min", "median", "p90", "max"]
    return "  ".join(f"{k} {float(v):.3f}" for k, v in zip(names, q, strict=True))


def plot(history: dict[str, list[Any]], max_norm: float, path: Path) -> None:
    matplotlib = _need("matplotlib")
    matplotlib.use("Agg")
    plt = _need("matplotlib.pyplot")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    first, last = history["norms"][0], history["norms"][-1]
    bins = torch.logspace(
        float(torch.log10(torch.cat([first, last]).min().clamp(min=1e-6))),
        float(torch.log10(torch.cat([first, last]).max())),
        40,
    ).numpy()
    ax1.hist(first.numpy(), bins=bins, alpha=0.6, label="first epoch")
    ax1.hist(last.numpy(), bins=bins, alpha=0.6, label="last epoch")
    ax1.axvline(max_norm, color="k", linestyle="--", label=f"max_norm = {max_norm}")
    ax1.set_xscale("log")
    ax1.set_xlabel("per-example gradient norm ‖g_i‖")
    ax1.set_ylabel("examples")
    ax1.legend()
    epochs = range(1, len(history["test_accuracy"]) + 1)
    ax2.plot(epochs, history["test_accuracy"], marker="o", label="test accuracy")
    ax2.plot(epochs, history["clipped_fraction"], marker=".", label="fraction clipped")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1.02)
    ax2.legend()
    fig.suptitle("indigrad demo: MLP on digits with per-example clipping")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(
    epochs: int = 30,
    batch_size: int = 64,
    max_norm: float = 1.0,
    lr: float = 0.5,
    seed: int = 0,
    repeats: int = 30,
    plot_path: str | None = "indigrad-demo.png",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and print its report; returns the figures it printed."""
    data = load_digits(seed)
    print(f"digits: {len(data.y_train)} train / {len(data.y_test)} test images (8×8, 10 classes)")
    start = time.perf_counter()
    model, history = train(data, epochs, batch_size, max_norm, lr, seed, progress)
    elapsed = time.perf_counter() - start
    print(
        f"\ntrained {epochs} epochs in {elapsed:.1f} s: test accuracy "
        f"{history['test_accuracy'][-1]:.3f} (batch {batch_size}, max_norm {max_norm})"
    )
    print("\nper-example gradient norms (before clipping)")
    for label, norms, frac in [
        ("first epoch", history["norms"][0], history["clipped_fraction"][0]),
        ("last epoch ", history["norms"][-1], history["clipped_fraction"][-1]),
    ]:
        print(f"  {label}  {_quantiles(norms)}   clipped {frac:.0%}")

    problem, results = timing(model, data, batch_size, repeats, progress)
    print()
    print(bench.table(problem, results))
    print(
        "\nplain = forward + backward + SGD step; grads = all per-example gradients; "
        "norms = their norms only;\nclipped = forward + clip_ + SGD step; loop = one "
        "backward per example; torch.func = vmap(grad)."
    )
    if plot_path:
        plot(history, max_norm, Path(plot_path))
        print(f"\nplot written to {plot_path}")
    return {"history": history, "timing": results}
