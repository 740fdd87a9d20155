"""``indigrad demo``: DP-SGD on scikit-learn's digits (Poisson sampling, per-example
clipping, calibrated Gaussian noise, accounting), then timing of plain training against
indigrad's quantities, a per-example loop and torch.func.

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

from . import bench, dp
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
    target_epsilon: float | None,
    epochs: int,
    batch_size: int,
    max_norm: float,
    lr: float,
    delta: float,
    seed: int,
    progress: bool = True,
) -> tuple[MLP, dict[str, Any]]:
    """DP-SGD on digits: Poisson-sampled batches, per-example clipping with
    :meth:`capture.clip_`, Gaussian noise calibrated to ``target_epsilon`` at ``delta``
    (no noise for ``None``), SGD. Records each epoch's ε so far, test accuracy and the
    per-example gradient norms."""
    tqdm = _need("tqdm").tqdm
    torch.manual_seed(seed)
    model = MLP(64, [64], 10)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = len(data.y_train)
    q = batch_size / n
    per_epoch = max(1, round(1 / q))
    steps = epochs * per_epoch
    sigma = 0.0
    if target_epsilon is not None:
        sigma = dp.calibrate_noise_multiplier(
            target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps=steps
        )
    # one seed, two unrelated streams: indigrad.dp mixes it with each stream's name
    noise = dp.GaussianNoise(sigma, max_norm, expected_batch_size=q * n, seed=seed)
    sampler = iter(dp.PoissonSampler(n, q, steps=steps, seed=seed))
    history: dict[str, Any] = {"sigma": sigma, "epsilon": [], "test_accuracy": [], "norms": []}
    label = "no noise" if target_epsilon is None else f"DP-SGD to ε = {target_epsilon:g}"
    bar = tqdm(total=steps, desc=f"{label:<20}", disable=not progress)
    for epoch in range(1, epochs + 1):
        epoch_norms = []
        for _ in range(per_epoch):
            idx = torch.tensor(next(sampler), dtype=torch.long)  # Poisson: the size varies
            x, y = data.x_train[idx], data.y_train[idx]
            with capture(model) as cap:
                norms = cap.clip_(F.cross_entropy(model(x), y, reduction="none"), max_norm)
            noise.add_(model)  # (clipped sum + N(0, σ²C²)) / (q·N)
            opt.step()
            opt.zero_grad(set_to_none=True)
            epoch_norms.append(norms)
            bar.update(1)
        eps = (
            float("inf")
            if target_epsilon is None
            else dp.compute_epsilon(
                sample_rate=q, noise_multiplier=sigma, steps=epoch * per_epoch, delta=delta
            )
        )
        history["epsilon"].append(eps)
        history["test_accuracy"].append(accuracy(model, data.x_test, data.y_test))
        history["norms"].append(torch.cat(epoch_norms))
        bar.set_postfix(test_acc=f"{history['test_accuracy'][-1]:.3f}", eps=f"{eps:.2f}")
    bar.close()
    return model, history


def timing(
    model: MLP, data: Digits, batch_size: int, repeats: int, progress: bool = True
) -> tuple[bench.Problem, dict[str, dict[str, Any]]]:
    tqdm = _need("tqdm").tqdm
    problem = bench.Problem(
        f"digits MLP 64-64-10, n={batch_size}",
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


def plot(runs: dict[str, dict[str, Any]], max_norm: float, path: Path) -> None:
    """Test accuracy against ε for each run, and the per-example norms of the last one."""
    matplotlib = _need("matplotlib")
    matplotlib.use("Agg")
    plt = _need("matplotlib.pyplot")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, h in runs.items():
        if label == "no noise":
            ax1.axhline(h["test_accuracy"][-1], color="gray", ls=":", label="no noise")
        else:
            ax1.plot(h["epsilon"], h["test_accuracy"], marker=".", label=label)
    ax1.set_xlabel("ε spent so far (δ = 1e-5), one point per epoch")
    ax1.set_ylabel("test accuracy")
    ax1.set_ylim(0, 1.02)
    ax1.legend(loc="lower right")
    last = runs[list(runs)[-1]]
    first_norms, last_norms = last["norms"][0], last["norms"][-1]
    both = torch.cat([first_norms, last_norms])
    bins = torch.logspace(
        float(torch.log10(both.min().clamp(min=1e-4))), float(torch.log10(both.max())), 40
    ).numpy()
    ax2.hist(first_norms.numpy(), bins=bins, alpha=0.6, label="first epoch")
    ax2.hist(last_norms.numpy(), bins=bins, alpha=0.6, label="last epoch")
    ax2.axvline(max_norm, color="k", ls="--", label=f"max_norm C = {max_norm}")
    ax2.set_xscale("log")
    ax2.set_xlabel(f"per-example gradient norm ‖g_i‖ ({list(runs)[-1]})")
    ax2.set_ylabel("examples")
    ax2.legend()
    fig.suptitle("indigrad demo: DP-SGD on scikit-learn's digits")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(
    epsilons: tuple[float, ...] = (3.0, 8.0),
    epochs: int = 30,
    batch_size: int = 64,
    max_norm: float = 0.3,
    lr: float = 2.0,
    delta: float = 1e-5,
    seed: int = 0,
    repeats: int = 30,
    plot_path: str | None = "indigrad-demo.png",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and print its report; returns the figures it printed."""
    data = load_digits(seed)
    n = len(data.y_train)
    print(f"digits: {n} train / {len(data.y_test)} test images (8×8, 10 classes)")
    print(
        f"MLP 64-64-10, Poisson sampling q = {batch_size}/{n}, {epochs} epochs, "
        f"max_norm {max_norm}, SGD lr {lr}, δ = {delta:g}\n"
    )
    runs: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    model = None
    for target in [None, *epsilons]:
        label = "no noise" if target is None else f"ε = {target:g}"
        model, runs[label] = train(
            data, target, epochs, batch_size, max_norm, lr, delta, seed, progress
        )
    elapsed = time.perf_counter() - start
    print(f"\n{len(runs)} trainings in {elapsed:.1f} s")
    print(
        f"\n{'run':<12} {'σ':>6} {'ε (δ = ' + format(delta, 'g') + ')':>14} {'test accuracy':>14}"
    )
    for label, h in runs.items():
        eps = "∞" if label == "no noise" else f"{h['epsilon'][-1]:.2f}"
        sigma = "-" if label == "no noise" else f"{h['sigma']:.2f}"
        print(f"{label:<12} {sigma:>6} {eps:>14} {h['test_accuracy'][-1]:>14.3f}")

    last = runs[list(runs)[-1]]
    print(f"\nper-example gradient norms before clipping ({list(runs)[-1]})")
    for which, norms in [("first epoch", last["norms"][0]), ("last epoch ", last["norms"][-1])]:
        frac = float((norms > max_norm).float().mean())
        print(f"  {which}  {_quantiles(norms)}   clipped {frac:.0%}")

    assert model is not None
    problem, results = timing(model, data, batch_size, repeats, progress)
    print()
    print(bench.table(problem, results))
    print(
        "\nplain = forward + backward + SGD step; grads = all per-example gradients; "
        "norms = their norms only;\nclipped = forward + clip_ + SGD step; loop = one "
        "backward per example; torch.func = vmap(grad)."
    )
    if plot_path:
        plot(runs, max_norm, Path(plot_path))
        print(f"\nplot written to {plot_path}")
    return {"runs": runs, "timing": results}
