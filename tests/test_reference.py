"""Every zoo case against the per-example loop, for grads, norms and clip_."""

import pytest
import torch
from zoo import CASES

import indigrad


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float64_matches_loop(case):
    model, loss_fn, x, y = case.build(torch.float64)
    indigrad.testing.check(model, loss_fn, x, y, batch_dim=case.batch_dim)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float32_matches_loop(case):
    model, loss_fn, x, y = case.build(torch.float32)
    # float32 tolerances of torch.testing.assert_close (rtol 1.3e-6, atol 1e-5)
    indigrad.testing.check(model, loss_fn, x, y, batch_dim=case.batch_dim)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_train_mode_same_as_eval_without_randomness(case):
    model, loss_fn, x, y = case.build(torch.float64)
    if any(isinstance(m, torch.nn.Dropout) for m in model.modules()):
        pytest.skip("dropout draws random masks in training mode")
    model.train()
    indigrad.testing.check(model, loss_fn, x, y, batch_dim=case.batch_dim)
