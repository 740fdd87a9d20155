"""The README's Python examples run as written, and its example rule is right."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import indigrad

README = Path(__file__).parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run():
    blocks = _blocks()
    assert len(blocks) == 4  # the last, a CUDA graph, runs below on a CUDA device
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    ns = {
        "torch": torch,
        "model": model,
        "x": x,
        "y": y,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "loss_fn": lambda x, y: F.cross_entropy(model(x), y, reduction="none"),
    }
    exec(blocks[0], ns)  # the contract
    assert ns["grads"]["0.weight"].shape == (5, 3, 4) and ns["norms"].shape == (5,)
    dp = {"model": model}  # DP-SGD on 2000 random examples of the same task
    dp["train_set"] = torch.utils.data.TensorDataset(
        torch.randn(2000, 4), torch.randint(0, 3, (2000,))
    )
    exec(blocks[1], dp)
    assert 2.9 < dp["eps"] <= 3.0
    try:
        ns = {}
        exec(blocks[2], ns)  # a user rule, as written: it imports and builds all it uses
        scale = ns["Scale"]
        assert indigrad.lookup_rule(scale(3)) is not None
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), scale(3)).double()
        indigrad.testing.check(net, lambda x: net(x).square().sum(1), x.double())
    finally:
        indigrad.unregister_rule(ns["Scale"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_readme_cuda_graph_example_runs():
    """The DP step captured as a CUDA graph: each replay trains on the batch copied in."""
    from indigrad.dp import GaussianNoise

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model.cuda()
    batches = [(torch.randn(6, 4), torch.randint(0, 3, (6,))) for _ in range(3)]
    ns = {
        "torch": torch,
        "F": F,
        "indigrad": indigrad,
        "GaussianNoise": GaussianNoise,
        "model": model,
        "opt": torch.optim.SGD(model.parameters(), lr=0.1),
        "noise_multiplier": 1.0,
        "max_norm": 1.0,
        "expected_batch_size": 6,
        "x": batches[0][0],
        "y": batches[0][1],
        "loader": batches,
    }
    before = [p.detach().clone() for p in model.parameters()]
    exec(_blocks()[3], ns)
    torch.cuda.synchronize()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(p).all() and not torch.equal(p, b)
    torch.testing.assert_close(ns["x"], batches[-1][0].cuda())  # the last batch copied in
