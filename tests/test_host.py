"""The garbage collector's automatic runs are paused while indigrad computes a step's
quantities, and left as the program had them."""

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indigrad


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    return model, torch.randn(6, 5), torch.randint(0, 3, (6,))


@pytest.fixture
def collections():
    """The collections Python runs, counted, with a threshold low enough that every few
    objects a step allocates would start one."""
    runs = []

    def count(phase, info):
        if phase == "start":
            runs.append(info["generation"])

    threshold = gc.get_threshold()
    gc.callbacks.append(count)
    gc.set_threshold(1)
    try:
        yield runs
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(count)


@pytest.mark.parametrize("quantity", ["grads", "norms", "clip_", "backward"])
def test_no_collection_while_the_quantities_are_computed(collections, quantity):
    model, x, y = _problem()
    with indigrad.capture(model) as cap:
        losses = F.cross_entropy(model(x), y, reduction="none")
        collections.clear()
        if quantity == "clip_":
            cap.clip_(losses, 1.0)
        elif quantity == "backward":
            per_example = cap.backward(losses)
            assert collections == []
            per_example.norms(), per_example.grads(), per_example.clip_(1.0)
        else:
            getattr(cap, quantity)(losses)
        assert collections == []
    assert gc.isenabled()
    model(x)  # the collector runs again, as before
    assert collections


def test_a_program_that_turned_the_collector_off_keeps_it_off():
    model, x, y = _problem()
    gc.disable()
    try:
        with indigrad.capture(model) as cap:
            cap.clip_(F.cross_entropy(model(x), y, reduction="none"), 1.0)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_runs_again_after_an_error():
    model, x, y = _problem()
    with indigrad.capture(model) as cap, pytest.raises(ValueError, match="max_norm"):
        cap.clip_(F.cross_entropy(model(x), y, reduction="none"), -1.0)
    assert gc.isenabled()
