"""The README's Python examples run as written, and its example rule is right."""

import re
from pathlib import Path

import torch
import torch.nn.functional as F

import indigrad

README = Path(__file__).parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 3
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
        exec(blocks[2], ns)  # a user rule
        scale = ns["Scale"]
        assert indigrad.lookup_rule(scale(3)) is not None
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), scale(3)).double()
        indigrad.testing.check(net, lambda x: net(x).square().sum(1), x.double())
    finally:
        indigrad.unregister_rule(ns["Scale"])
