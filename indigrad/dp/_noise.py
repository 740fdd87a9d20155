"""Gaussian noise for DP-SGD: seeded or from os.urandom, one draw for all ranks."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

_CHUNK = 1 << 20  # secure draws are made this many numbers at a time, to bound memory


# -- random sources -----------------------------------------------------------------------


def _stream_seed(seed: int, stream: str) -> int:
    """The generator seed of one stream of random numbers (``"noise"``, ``"batches"``)
    from a user's seed: the same integer given to the sampler and to the noise seeds two
    unrelated generators, rather than one Mersenne Twister stream twice (the noise would
    then come from the very words that chose the batch, which the accounting takes to be
    independent of it)."""
    digest = hashlib.sha256(f"indigrad.dp.{stream}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits


def _secure_uniform(n: int) -> Tensor:
    """``n`` uniforms on the grid ``{k·2⁻⁵³ : 0 ≤ k < 2⁵³}`` from ``os.urandom``: (n,) float64."""
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    k = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64)  # (n,) 64 random bits
    k = (k >> 11) & ((1 << 53) - 1)  # (n,) top 53 bits, as a non-negative integer
    return k.to(torch.float64).mul_(2.0**-53)  # (n,) in [0, 1)


def _secure_normal(n: int) -> Tensor:
    """``n`` standard Gaussians by Box–Muller in float64 from ``os.urandom``: (n,) float64."""
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, 2 * _CHUNK):
        m = min(2 * _CHUNK, n - start)
        pairs = (m + 1) // 2
        u = _secure_uniform(2 * pairs)  # (2·pairs,)
        r = torch.log1p(-u[:pairs]).mul_(-2.0).sqrt_()  # (pairs,) √(−2 ln(1−u₁)), 1−u₁ ∈ (0, 1]
        theta = u[pairs:].mul_(2.0 * math.pi)  # (pairs,)
        z = torch.cat([r * torch.cos(theta), r * torch.sin(theta)])  # (2·pairs,)
        out[start : start + m] = z[:m]
    return out


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# -- noise --------------------------------------------------------------------------------


class GaussianNoise:
    """Add DP-SGD's Gaussian noise to the clipped sums in ``.grad`` and average them.

    After :meth:`capture.clip_` has put ``S = Σ_i min(1, C/‖g_i‖)·g_i`` into ``p.grad``,
    :meth:`add_` replaces it by ``(S + z) / B`` with ``z ~ N(0, σ²C²)`` drawn independently
    for every entry, ``σ`` the noise multiplier, ``C`` the clipping norm and ``B`` the
    *expected* batch size (``q·N`` under Poisson sampling with rate ``q`` over ``N``
    examples). Dividing by the expected rather than the realised batch size keeps the
    realised size, which depends on the data, out of the update; it is what the accountant
    analyses. Any ``torch.optim`` optimizer then takes the step.

    Every trainable parameter gets noise, also one whose ``.grad`` is ``None`` (it is
    created as zeros first): skipping it would reveal, e.g., that a batch was empty. The
    noise of all gradients of one dtype and device is drawn at once and added by two
    multi-tensor operations, so a GPU step pays a few launches for it, not four per
    parameter.

    Args:
        noise_multiplier: ``σ``, the noise standard deviation in units of ``max_norm``.
        max_norm: ``C``, the clipping norm given to ``clip_``.
        expected_batch_size: ``B``, the expected number of examples per step, over all
            processes (``sample_rate * len(dataset)``).
        seed: seeds the default source, a ``torch.Generator`` per device (Philox on CUDA,
            Mersenne Twister on CPU); the same seed on the same device gives the same noise,
            and one unrelated to a sampler's given the same seed.
            ``None`` seeds it unpredictably. Not allowed with ``secure=True``.
        secure: draw the noise from the operating system's cryptographically secure
            generator instead: ``os.urandom`` bytes → 53-bit uniforms → Box–Muller in
            float64 on the CPU, then cast to the gradient's dtype and moved to its device.

    **What ``secure=True`` protects against, and what it does not.** A seeded or
    Mersenne-Twister generator is predictable: whoever learns the seed, or enough outputs
    to reconstruct the state, can subtract the noise from a released gradient or model and
    nothing remains of the privacy guarantee. ``secure=True`` closes that hole: the noise is
    unpredictable and not reproducible. It does **not** mitigate floating-point attacks:
    the Gaussian is sampled in float64 and rounded to the gradient's dtype, and the set of
    values such a sampler can produce is uneven in ways that can, in principle, reveal the
    unnoised value (Mironov, CCS 2012, shows this for the Laplace mechanism); no snapping or
    discrete-Gaussian mitigation is implemented. Box–Muller on 53-bit uniforms also cannot
    produce ``|z| > 8.57`` standard deviations (a tail of probability ~1e-17 is cut, not
    accounted for). Nor does it cover timing side channels,
    the randomness of the batch sampling (use ``PoissonSampler(..., secure=True)``), or
    anything else in the training pipeline. It costs 8 bytes of ``os.urandom`` per gradient
    entry per step and a host-to-device copy for GPU parameters.

    **Several processes.** When ``torch.distributed`` is initialised with more than one
    process, :meth:`add_` expects the DDP averaging convention: on entry, every rank's
    ``p.grad`` equals ``(1/W)·Σ_ranks S_rank`` (``W`` the world size, e.g. after
    ``dist.all_reduce(p.grad); p.grad /= W``), identical on all ranks. Rank 0 alone draws
    the noise and broadcasts it over the default process group, one collective per dtype
    of the gradients, so the total noise is that of *one* process and every rank ends with the
    identical ``(W·p.grad + z) / B = (Σ_ranks S_rank + z) / B``. Every rank must call
    :meth:`add_` with its parameters in the same order. The noise sources of the other
    ranks are not used (their seeds do not matter). Without an initialised process group
    (or with ``torch.distributed`` unavailable) nothing of this happens.

    Example:
        >>> import torch
        >>> from indigrad.dp import GaussianNoise
        >>> w = torch.nn.Parameter(torch.zeros(1000, 100))
        >>> w.grad = torch.ones(1000, 100)              # a clipped sum over a batch
        >>> noise = GaussianNoise(noise_multiplier=2.0, max_norm=0.5, expected_batch_size=10,
        ...                       seed=0)
        >>> noise.std                                   # σ·C / B
        0.1
        >>> noise.add_([w])
        >>> round(w.grad.mean().item(), 2), round(w.grad.std().item(), 2)   # 1/B, σ·C/B
        (0.1, 0.1)
    """

    def __init__(
        self,
        noise_multiplier: float,
        max_norm: float,
        expected_batch_size: float,
        *,
        seed: int | None = None,
        secure: bool = False,
    ) -> None:
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        if not expected_batch_size > 0:
            raise ValueError(
                f"expected_batch_size must be > 0, got {expected_batch_size}; under Poisson "
                "sampling it is sample_rate * len(dataset)"
            )
        if secure and seed is not None:
            raise ValueError(
                "secure=True draws from os.urandom, which cannot be seeded; drop seed= "
                "(or use secure=False for reproducible noise)"
            )
        self.noise_multiplier = float(noise_multiplier)
        self.max_norm = float(max_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.secure = secure
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def std(self) -> float:
        """Standard deviation of the noise in the final gradient: ``σ·C / B``."""
        return self.noise_multiplier * self.max_norm / self.expected_batch_size

    def __repr__(self) -> str:
        return (
            f"GaussianNoise(noise_multiplier={self.noise_multiplier}, max_norm={self.max_norm}, "
            f"expected_batch_size={self.expected_batch_size}, secure={self.secure})"
        )

    def add_(self, params: nn.Module | Iterable[Tensor]) -> None:
        """Replace each ``p.grad`` by ``(p.grad + z) / B``, ``z ~ N(0, σ²C²)`` per entry.

        Args:
            params: a module (its parameters) or an iterable of parameters; those with
                ``requires_grad=False`` are skipped. A ``None`` grad counts as zeros.

        In a multi-process run, ``p.grad`` on entry is the average over ranks and the
        result is ``(W·p.grad + z) / B``, identical on every rank (see the class docstring).
        """
        if isinstance(params, nn.Module):
            params = params.parameters()
        rank, world = _world()
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        done: set[int] = set()  # a parameter listed twice gets its noise once
        for p in params:
            if not p.requires_grad or id(p) in done:
                continue
            done.add(id(p))
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif p.grad.layout != torch.strided:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} has a {p.grad.layout} .grad "
                    "(an Embedding with sparse=True?): the noise is dense, so the noised "
                    "gradient could not stay sparse. Use sparse=False."
                )
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in groups.values():
            self._add_to(grads, rank, world)

    def _add_to(self, grads: list[Tensor], rank: int, world: int) -> None:
        """``(W·g + z) / B`` for gradients of one device and dtype: one draw of noise for
        all of them and two multi-tensor operations, not four operations per parameter (on
        a GPU each one costs the host a launch)."""
        sizes = [g.numel() for g in grads]
        like = grads[0]
        # (Σ sizes,) N(0, 1), drawn on rank 0 only
        z = self._standard_normal(sum(sizes), like) if rank == 0 else like.new_empty(sum(sizes))
        if world > 1:
            dist.broadcast(z, src=0)
        parts = [t.view(g.shape) for t, g in zip(z.split(sizes), grads, strict=True)]
        torch._foreach_mul_(grads, world / self.expected_batch_size)
        torch._foreach_add_(grads, parts, alpha=self.std)

    def _standard_normal(self, n: int, like: Tensor) -> Tensor:
        """``n`` standard Gaussians (n,) of ``like``'s dtype, on its device."""
        capturing = like.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.secure:
            if capturing:
                raise RuntimeError(
                    "GaussianNoise(secure=True) draws its noise on the host, from os.urandom: "
                    "a CUDA graph would replay the same noise at every step. Add the noise "
                    "outside the graph, or capture with secure=False and the noise's "
                    "generator registered (see GaussianNoise.generator)"
                )
            z = _secure_normal(n)  # (n,) float64, CPU
            return z.to(device=like.device, dtype=like.dtype)
        # draw in float32 at least (float64 for float64 grads), then cast
        dtype = torch.promote_types(like.dtype, torch.float32)
        g = self.generator(like.device)
        try:
            z = torch.randn(n, generator=g, device=like.device, dtype=dtype)  # (n,)
        except RuntimeError as err:
            if not capturing:
                raise
            raise RuntimeError(
                "GaussianNoise is drawing inside a CUDA graph's capture from a generator "
                "the graph does not know: register it before the capture, "
                "graph.register_generator_state(noise.generator(device)), so that every "
                "replay draws new noise"
            ) from err
        return z.to(like.dtype)

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The generator the noise for ``device`` is drawn from (made and seeded on first use).

        To capture a step that adds noise as a CUDA graph, register it with the graph
        before the capture; each replay then draws new noise from it::

            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(noise.generator("cuda"))
            with torch.cuda.graph(graph):
                step()              # forward, clip_, noise.add_, optimizer step

        Without ``secure=True`` only: secure noise is drawn on the host and cannot be
        captured (:meth:`add_` raises inside a capture).
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            if self.seed is None:
                g.seed()
            else:
                g.manual_seed(_stream_seed(self.seed, "noise"))
            self._generators[device] = g
        return g
