"""indigrad's steps captured as CUDA graphs: each replay computes what the eager step does.

A step bound by the host (a small-image ResNet on a GPU) can be captured once and replayed
without any of the host's work. That needs a step that never makes the host wait for the
device (``tests/test_device_sync.py`` checks this on CPU) and whose Python takes the same
decisions at every call. Here a DP-SGD step (``clip_`` and an SGD step) and ``grads`` are
replayed on new batches copied into the captured inputs, against the same steps run
eagerly. CUDA only: skipped elsewhere; ``benchmarks/gpu_check.py`` runs it on the device.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import indigrad
from indigrad import bench
from indigrad.bench.methods import Noisy, graphed
from indigrad.dp import GaussianNoise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROBLEMS: dict[str, Callable[[], bench.Problem]] = {
    "mlp": lambda: bench.mlp_problem(12, [16, 8], 5, batch=6, device="cuda"),
    "cnn": lambda: bench.cnn_problem(batch=4, width=8, device="cuda"),
    # T = 40 lookups per example: the embedding's sorted segments
    "gpt": lambda: bench.gpt_problem(3, 2, 32, 4, 40, 50, device="cuda"),
}


@pytest.fixture(autouse=True)
def no_tf32() -> Iterator[None]:
    """Full float32 products, so that eager and replayed steps are compared exactly."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _batch(p: bench.Problem, i: int) -> tuple[Tensor, Tensor]:
    """The ``i``-th batch (0: the problem's own): the inputs paired with other targets."""
    return p.x, p.y.roll(i, 0)


def _dp_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    p: bench.Problem,
    max_norm: float,
    x: Tensor,
    y: Tensor,
) -> Tensor:
    with indigrad.capture(model) as cap:
        norms = cap.clip_(p.loss(model(x), y), max_norm)  # (n,)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norms


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_replayed_dp_steps_match_eager_ones(name):
    p = PROBLEMS[name]()
    replayed = p.model()
    eager = copy.deepcopy(replayed)
    opt_r = torch.optim.SGD(replayed.parameters(), lr=0.01)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.01)
    x, y = p.x.clone(), p.y.clone()  # the graph's inputs: each batch is copied into them
    norms = torch.zeros(p.batch, device=p.device)  # the graph's output
    with indigrad.capture(eager) as cap:
        # most examples are clipped, by coefficients that differ
        max_norm = 0.9 * cap.norms(p.loss(eager(x), y)).quantile(0.25).item()

    def step() -> None:
        norms.copy_(_dp_step(replayed, opt_r, p, max_norm, x, y))

    replay = graphed(step, p.device, warmup=2)  # two eager steps on batch 0, then the capture
    for _ in range(2):
        _dp_step(eager, opt_e, p, max_norm, p.x, p.y)
    for i in range(1, 4):
        xi, yi = _batch(p, i)
        x.copy_(xi)
        y.copy_(yi)
        replay()
        expected = _dp_step(eager, opt_e, p, max_norm, xi, yi)
        torch.cuda.synchronize()
        assert (expected > max_norm).any(), "some examples must be clipped"
        torch.testing.assert_close(norms, expected, msg=f"batch {i}: norms")
        for (k, a), b in zip(replayed.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(a, b, msg=f"batch {i}: {k} after the step")


def test_replayed_per_example_gradients_match_eager_ones():
    p = PROBLEMS["cnn"]()
    model = p.model()
    x, y = p.x.clone(), p.y.clone()
    out: dict[str, Tensor] = {}

    def step() -> None:
        with indigrad.capture(model) as cap:
            out.update(cap.grads(p.loss(model(x), y)))

    replay = graphed(step, p.device, warmup=1)
    captured = dict(out)  # the graph's outputs: each replay rewrites them
    for i in range(1, 3):
        xi, yi = _batch(p, i)
        x.copy_(xi)
        y.copy_(yi)
        replay()
        with indigrad.capture(model) as cap:
            expected: dict[str, Any] = cap.grads(p.loss(model(xi), yi))
        torch.cuda.synchronize()
        assert captured.keys() == expected.keys()
        for k, g in expected.items():
            torch.testing.assert_close(captured[k], g, msg=f"batch {i}: {k}")


def test_a_capture_reads_no_tensor_kept_for_eager_steps():
    # GroupNorm's γ of ones and the ghost guard's weights are kept from step to step. A
    # kept one can be freed later (a larger batch replaces the γ; the weights' cache
    # evicts), so a graph that read it would read freed memory at every replay; and one
    # made inside a capture is filled only on replay, so eager steps must not keep it.
    from indigrad.rules import _ghost, normalization

    cuda = torch.device("cuda")
    eager_ones = normalization._ones(4, 5, torch.float32, cuda)
    Z = torch.rand(3, 6, 6, device=cuda)
    eager_w = _ghost._weights(6, 0.5, Z)
    kept_ones, kept_w = dict(normalization._ONES), _ghost._cached_weights.cache_info().currsize
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        ones = normalization._ones(2, 5, torch.float32, cuda)
        w = _ghost._weights(6, 0.5, Z)
        fresh = normalization._ones(2, 7, torch.float32, cuda)  # a key not kept before
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    torch.cuda.synchronize()
    for inside, eager in ((ones, eager_ones), (w, eager_w)):
        assert inside.untyped_storage().data_ptr() != eager.untyped_storage().data_ptr()
    assert normalization._ONES.keys() == kept_ones.keys()
    assert _ghost._cached_weights.cache_info().currsize == kept_w
    assert (ones == 1).all() and (fresh == 1).all() and torch.equal(w, eager_w)


def _noise_step(noise: GaussianNoise, param: nn.Parameter) -> Callable[[], None]:
    def step() -> None:
        assert param.grad is not None
        param.grad.zero_()  # a clipped sum of zeros: what is left is the noise
        noise.add_([param])

    return step


def test_replayed_noise_is_new_at_every_replay():
    param = nn.Parameter(torch.zeros(1 << 14, device="cuda"))
    param.grad = torch.zeros_like(param)
    noise = GaussianNoise(2.0, max_norm=0.5, expected_batch_size=4, seed=0)  # std σC/B = 0.25
    replay = graphed(Noisy(_noise_step(noise, param), [noise.generator("cuda")]), param.device)
    draws = []
    for _ in range(3):
        replay()
        draws.append(param.grad.clone())
    torch.cuda.synchronize()
    for a, b in itertools.pairwise(draws):
        assert not torch.equal(a, b), "a replay added the noise of the replay before"
    for z in draws:  # 16,384 draws: the std within 3 % (about 5 standard errors)
        assert abs(z.std().item() / noise.std - 1) < 0.03
        assert abs(z.mean().item()) < 0.01


@pytest.mark.parametrize("secure", [False, True])
def test_noise_that_a_graph_cannot_replay_is_refused(secure):
    """An unregistered generator (every replay would fail or repeat) and secure noise (drawn
    on the host: every replay would add the same numbers) are refused inside a capture."""
    param = nn.Parameter(torch.zeros(64, device="cuda"))
    param.grad = torch.zeros_like(param)
    noise = GaussianNoise(1.0, max_norm=1.0, expected_batch_size=4, seed=None, secure=secure)
    step = _noise_step(noise, param)
    step()  # eagerly: drawing outside a capture is fine
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    match = "os.urandom" if secure else "register_generator_state"
    with pytest.raises(RuntimeError, match=match), torch.cuda.graph(torch.cuda.CUDAGraph()):
        step()
