"""What is timed: one step of each method, built once per problem.

A method is a factory ``make(problem) -> step`` that prepares its own copy of the model
(wrapping it, for peer libraries) and returns the function timed per step:

    plain          forward, loss.mean().backward(), SGD step
    grads          forward, cap.grads(losses)                    (n, *p.shape) per parameter
    norms          forward, cap.norms(losses)                    (n,)
    clipped        forward, cap.clip_(losses, 1.0), SGD step     (DP-SGD without noise)
    dp             clipped, and GaussianNoise(σ = 1).add_ before the SGD step (DP-SGD)
    loop           one forward/backward per example              (n, *p.shape) per parameter
    torch.func     vmap(grad(loss of one example))               (n, *p.shape) per parameter
    opacus         Opacus GradSampleModule, hooks mode           p.grad_sample
    opacus-ew      Opacus GradSampleModule, expanded weights     p.grad_sample
    opacus-ghost   Opacus fast gradient clipping, clipped step   (DP-SGD without noise)
    backpack       BackPACK BatchGrad                            p.grad_batch
    backpack-norms BackPACK BatchL2Grad                          p.batch_l2

Peers are optional: a missing library or a method that raises is reported, not hidden.
Each peer gets the model as it can take it (Opacus: its own recurrent layers in place of
PyTorch's, with the same weights, as its ``ModuleValidator.fix`` makes them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..capture import capture
from ..dp import GaussianNoise
from ..testing import loop_grads
from .problems import Problem

Step = Callable[[], None]


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def plain(p: Problem) -> Step:
    model, opt = p.model(), None
    opt = _sgd(model)

    def step() -> None:
        p.loss(model(p.x), p.y).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def grads(p: Problem) -> Step:
    model = p.model()

    def step() -> None:
        with capture(model) as cap:
            cap.grads(p.loss(model(p.x), p.y))

    return step


def norms(p: Problem) -> Step:
    model = p.model()

    def step() -> None:
        with capture(model) as cap:
            cap.norms(p.loss(model(p.x), p.y))

    return step


class Noisy:
    """A step that draws random numbers from ``generators``, which a CUDA graph of it must
    register (:func:`graphed` does) for each replay to draw new ones."""

    def __init__(self, step: Step, generators: list[torch.Generator]) -> None:
        self.step, self.generators = step, generators

    def __call__(self) -> None:
        self.step()


def clipped(p: Problem, noise: GaussianNoise | None = None) -> Step:
    model = p.model()
    opt = _sgd(model)

    def step() -> None:
        with capture(model) as cap:
            cap.clip_(p.loss(model(p.x), p.y), max_norm=1.0)
        if noise is not None:
            noise.add_(model)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step if noise is None else Noisy(step, [noise.generator(p.device)])


def dp(p: Problem) -> Step:
    return clipped(p, GaussianNoise(1.0, max_norm=1.0, expected_batch_size=p.batch, seed=0))


def loop(p: Problem) -> Step:
    model = p.model()

    def step() -> None:
        loop_grads(model, lambda x, y: p.loss(model(x), y), p.x, p.y)

    return step


def torch_func(p: Problem) -> Step:
    from torch.func import functional_call, grad, vmap

    model = p.model()
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def one(theta: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return p.loss(functional_call(model, theta, (x[None],)), y[None]).sum()

    per_example = vmap(grad(one), in_dims=(None, 0, 0))

    def step() -> None:
        per_example(params, p.x, p.y)

    return step


def _opacus_model(p: Problem) -> nn.Module:
    """The problem's model as Opacus can take it: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``,
    whose fused kernels neither its hooks nor its functorch fallback run, replaced by its
    drop-in ``DPLSTM``, ``DPGRU`` and ``DPRNN`` with the same weights (what
    ``ModuleValidator.fix`` does, for ``nn.RNN`` too). Other layers stay: those its
    fallback takes (``nn.MultiheadAttention``) are timed as Opacus runs them."""
    from opacus.layers import DPGRU, DPLSTM, DPRNN

    replacements: dict[type[nn.Module], type[nn.Module]] = {
        nn.LSTM: DPLSTM, nn.GRU: DPGRU, nn.RNN: DPRNN,
    }  # fmt: skip
    model = p.model()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            dp_class = replacements.get(type(child))
            if dp_class is None:
                continue
            rnn = cast(nn.RNNBase, child)
            options: dict[str, Any] = {"proj_size": rnn.proj_size} if rnn.proj_size else {}
            if isinstance(rnn, nn.RNN):
                options["nonlinearity"] = rnn.nonlinearity
            dp = dp_class(
                rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.bias, rnn.batch_first,
                rnn.dropout, rnn.bidirectional, **options,
            )  # fmt: skip
            dp.load_state_dict(rnn.state_dict())
            setattr(parent, name, dp.to(next(rnn.parameters()).device))
    return model


def _opacus(mode: str) -> Callable[[Problem], Step]:
    def make(p: Problem) -> Step:
        from opacus.grad_sample.utils import wrap_model

        model = wrap_model(_opacus_model(p), mode, batch_first=True, loss_reduction="sum")

        def step() -> None:
            p.loss(model(p.x), p.y).sum().backward()
            _complete(model, "grad_sample")
            for param in model.parameters():
                param.grad_sample = None
                param.grad = None

        return step

    return make


def opacus_ghost(p: Problem) -> Step:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model = GradSampleModuleFastGradientClipping(
        _opacus_model(p), max_grad_norm=1.0, use_ghost_clipping=True, loss_reduction="sum"
    )
    opt = DPOptimizerFastGradientClipping(
        _sgd(model), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=p.batch,
        loss_reduction="sum",
    )  # fmt: skip

    def per_example_loss(out: Tensor, y: Tensor) -> Tensor:
        losses = p.loss(out, y)
        return losses.reshape(losses.shape[0], -1).sum(1)  # (n,)

    criterion = DPLossFastGradientClipping(model, opt, per_example_loss, loss_reduction="sum")

    def step() -> None:
        loss = criterion(model(p.x), p.y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _backpack(extension: str) -> Callable[[Problem], Step]:
    def make(p: Problem) -> Step:
        import backpack
        import backpack.extensions

        model = backpack.extend(p.model())
        ext = getattr(backpack.extensions, extension)

        def step() -> None:
            loss = p.loss(model(p.x), p.y).sum()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its missing modules are checked below
                with backpack.backpack(ext()):
                    loss.backward()
            _complete(model, "batch_l2" if extension == "BatchL2Grad" else "grad_batch")
            for param in model.parameters():
                param.grad = None

        return step

    return make


def _complete(model: nn.Module, attribute: str) -> None:
    """A peer that silently skips parameters has not done the job: report it as failing."""
    missing = [
        k
        for k, q in model.named_parameters()
        if q.requires_grad and getattr(q, attribute, None) is None
    ]
    if missing:
        raise RuntimeError(
            f"incomplete: no per-example result for {len(missing)} parameters ({missing[0]}, …)"
        )
    for q in model.parameters():
        if hasattr(q, attribute):
            setattr(q, attribute, None)


def graphed(step: Step, device: torch.device, warmup: int = 3) -> Step:
    """``step`` captured once as a CUDA graph: each call of the result replays its kernels
    with none of the host's work (Python, dispatch, launches), which is what a step bound by
    the host costs the device alone. The step must read and write the same tensors at every
    call, as a benchmark's does; it runs ``warmup`` times eagerly first (on a side stream, as
    PyTorch asks before a capture), so its effects happen ``warmup`` more times.

    A step that makes the host wait for the device (``.item()``, ``nonzero``) cannot be
    captured and raises; indigrad's own steps dispatch no such operator
    (``tests/test_device_sync.py``). The generators of a :class:`Noisy` step are
    registered with the graph, so that each replay draws new numbers.
    """
    if device.type != "cuda":
        raise RuntimeError(f"CUDA graphs need a CUDA device, not {device.type}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for generator in getattr(step, "generators", ()):
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        step()
    return graph.replay


METHODS: dict[str, Callable[[Problem], Step]] = {
    "plain": plain,
    "grads": grads,
    "norms": norms,
    "clipped": clipped,
    "dp": dp,
    "loop": loop,
    "torch.func": torch_func,
    "opacus": _opacus("hooks"),
    "opacus-ew": _opacus("ew"),
    "opacus-ghost": opacus_ghost,
    "backpack": _backpack("BatchGrad"),
    "backpack-norms": _backpack("BatchL2Grad"),
}
