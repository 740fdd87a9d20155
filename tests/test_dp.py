"""DP-SGD building blocks: noise, accounting against dp-accounting itself, Poisson sampling.

Statistical checks use fixed seeds (or, for os.urandom, a 6-standard-error band, which a
correct sampler leaves with probability ~2e-9) and say their tolerance where they make it.
"""

import importlib.util
import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import run_processes
from torch.utils._python_dispatch import TorchDispatchMode

import indigrad
from indigrad.dp import (
    GaussianNoise,
    PoissonSampler,
    calibrate_noise_multiplier,
    compute_epsilon,
    poisson_loader,
)

# accounting tests need the optional dependency; imported lazily so that the two spawned
# processes of the multi-process test do not pay for it
needs_dpa = pytest.mark.skipif(
    importlib.util.find_spec("dp_accounting") is None, reason='pip install "indigrad[dp]"'
)

Z = 6.0  # tolerance of statistical checks, in standard errors


def _library_epsilon(accountant, q, sigma, steps, delta):
    import dp_accounting as dpa

    event = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))
    accountant.compose(dpa.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def _assert_std(z, std, mean=0.0):
    """Sample mean and std of ``z`` within Z standard errors of ``mean`` and ``std``."""
    z = z.double().flatten()
    n = z.numel()
    assert abs(z.mean().item() - mean) <= Z * std / math.sqrt(n), (z.mean().item(), mean)
    # the sample std of n Gaussians has standard error std / √(2(n-1))
    assert abs(z.std().item() - std) <= Z * std / math.sqrt(2 * (n - 1)), (z.std().item(), std)


# -- accounting ---------------------------------------------------------------------------


@needs_dpa
@pytest.mark.parametrize(
    ("q", "sigma", "steps", "delta"), [(0.01, 1.1, 500, 1e-5), (0.1, 2.0, 30, 1e-6)]
)
def test_epsilon_matches_rdp_library(q, sigma, steps, delta):
    from dp_accounting.rdp import RdpAccountant

    ours = compute_epsilon(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=delta)
    theirs = _library_epsilon(RdpAccountant(), q, sigma, steps, delta)
    assert ours == theirs


@needs_dpa
def test_epsilon_matches_pld_library():
    q, sigma, steps, delta = 0.05, 1.0, 100, 1e-5
    ours = compute_epsilon(
        sample_rate=q,
        noise_multiplier=sigma,
        steps=steps,
        delta=delta,
        method="pld",
        pld_discretization=1e-3,
    )
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant(value_discretization_interval=1e-3)
    assert ours == _library_epsilon(accountant, q, sigma, steps, delta)
    # PLD is the tighter analysis
    rdp = compute_epsilon(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=delta)
    assert ours < rdp


@needs_dpa
@pytest.mark.parametrize(("method", "disc"), [("rdp", 1e-4), ("pld", 1e-2)])
def test_calibration_round_trips(method, disc):
    q, steps, delta, target, tol = 0.02, 200, 1e-5, 3.0, 1e-3
    sigma = calibrate_noise_multiplier(
        target_epsilon=target,
        delta=delta,
        sample_rate=q,
        steps=steps,
        method=method,
        tol=tol,
        pld_discretization=disc,
    )

    def eps(s):
        return compute_epsilon(
            sample_rate=q,
            noise_multiplier=s,
            steps=steps,
            delta=delta,
            method=method,
            pld_discretization=disc,
        )

    # the library guarantees ε(σ) ≤ target and σ within tol of the smallest such σ
    assert eps(sigma) <= target
    assert eps(sigma - 2 * tol) > target
    assert eps(sigma) == pytest.approx(target, rel=2e-2)


@needs_dpa
def test_epsilon_is_monotone():
    base = {"sample_rate": 0.01, "noise_multiplier": 1.0, "steps": 300, "delta": 1e-5}
    eps = compute_epsilon(**base)
    assert 0 < eps < math.inf
    assert compute_epsilon(**{**base, "noise_multiplier": 1.5}) < eps  # more noise
    assert compute_epsilon(**{**base, "steps": 600}) > eps  # more steps
    assert compute_epsilon(**{**base, "sample_rate": 0.02}) > eps  # bigger batches
    assert compute_epsilon(**{**base, "delta": 1e-7}) > eps  # smaller δ
    assert compute_epsilon(**{**base, "steps": 0}) == 0.0
    assert compute_epsilon(**{**base, "noise_multiplier": 0.0}) == math.inf
    cal = {"delta": 1e-5, "sample_rate": 0.01, "steps": 300, "tol": 1e-2}
    s1 = calibrate_noise_multiplier(target_epsilon=1.0, **cal)
    s8 = calibrate_noise_multiplier(target_epsilon=8.0, **cal)
    assert s1 > s8 > 0


@needs_dpa
def test_accounting_errors_say_what_to_do():
    with pytest.raises(ValueError, match='"rdp" or "pld"'):
        compute_epsilon(sample_rate=0.1, noise_multiplier=1, steps=1, delta=1e-5, method="x")
    with pytest.raises(ValueError, match="delta"):
        compute_epsilon(sample_rate=0.1, noise_multiplier=1, steps=1, delta=0)
    with pytest.raises(ValueError, match="sample_rate"):
        compute_epsilon(sample_rate=1.5, noise_multiplier=1, steps=1, delta=1e-5)
    with pytest.raises(ValueError, match="noise_multiplier=0"):
        calibrate_noise_multiplier(target_epsilon=math.inf, delta=1e-5, sample_rate=0.1, steps=10)


# -- noise --------------------------------------------------------------------------------


@pytest.mark.parametrize("secure", [False, True], ids=["seeded", "secure"])
def test_noise_has_stated_std_and_divides_by_expected_batch_size(secure):
    sigma, C, B = 1.3, 0.7, 12.5
    w = torch.nn.Parameter(torch.zeros(1000, 500))
    w.grad = torch.full((1000, 500), 5.0)  # a clipped sum
    noise = GaussianNoise(sigma, C, B, seed=None if secure else 0, secure=secure)
    assert noise.std == pytest.approx(sigma * C / B)
    noise.add_([w])
    _assert_std(w.grad, sigma * C / B, mean=5.0 / B)  # 5e5 entries: std within 0.85%


def test_noise_dtype_and_float64():
    w = torch.nn.Parameter(torch.zeros(400, 500, dtype=torch.float64))
    GaussianNoise(2.0, 1.0, 4.0, secure=True).add_([w])  # grad None → zeros, then noise
    assert w.grad.dtype == torch.float64
    _assert_std(w.grad, 0.5)
    h = torch.nn.Parameter(torch.zeros(10, dtype=torch.bfloat16))
    GaussianNoise(1.0, 1.0, 1.0, seed=0).add_([h])
    assert h.grad.dtype == torch.bfloat16 and h.grad.abs().sum() > 0


def test_division_by_expected_not_realised_batch_size():
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.tensor([1.0, -2.0, 4.0])
    GaussianNoise(0.0, 1.0, expected_batch_size=8.0, seed=0).add_([w])  # σ = 0: no noise
    torch.testing.assert_close(w.grad, torch.tensor([0.125, -0.25, 0.5]), rtol=0, atol=0)


def test_seeding_reproduces_exactly():
    def draw(seed=None, secure=False):
        w = torch.nn.Parameter(torch.zeros(50, 7))
        noise = GaussianNoise(1.0, 1.0, 1.0, seed=seed, secure=secure)
        noise.add_([w])
        first = w.grad.clone()
        noise.add_([w])  # the generator moves on between steps
        assert not torch.equal(w.grad, first)
        return first

    torch.testing.assert_close(draw(3), draw(3), rtol=0, atol=0)
    assert not torch.equal(draw(3), draw(4))
    assert not torch.equal(draw(secure=True), draw(secure=True))
    with pytest.raises(ValueError, match="cannot be seeded"):
        GaussianNoise(1.0, 1.0, 1.0, seed=0, secure=True)


def test_noise_is_drawn_from_its_generator():
    """``generator(device)`` is the source ``add_`` draws from (a CUDA graph registers it)."""
    w = torch.nn.Parameter(torch.zeros(50, 7))
    noise = GaussianNoise(1.0, 1.0, 1.0, seed=3)
    g = noise.generator("cpu")
    assert noise.generator(torch.device("cpu")) is g
    g.manual_seed(11)
    noise.add_([w])
    expected = torch.randn(50 * 7, generator=torch.Generator().manual_seed(11)).view(50, 7)
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=0)


def test_noise_covers_every_trainable_parameter_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    GaussianNoise(1.0, 1.0, 1.0, seed=0).add_(model)  # all grads None before
    assert model[0].weight.grad is None
    for p in [model[0].bias, model[1].weight, model[1].bias]:
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.abs().sum() > 0


def test_one_seed_gives_the_sampler_and_the_noise_unrelated_streams():
    # one Mersenne Twister stream for both would draw the noise from the batch's words
    noise = GaussianNoise(1.0, 1.0, 10.0, seed=0).generator("cpu")
    sampler = PoissonSampler(100, 0.1, seed=0)._generator
    assert noise.initial_seed() != sampler.initial_seed()
    assert not torch.equal(torch.rand(64, generator=noise), torch.rand(64, generator=sampler))


def test_noise_once_per_parameter_listed_twice():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), 10.0)
    GaussianNoise(0.0, 1.0, 10.0).add_([p, p])
    torch.testing.assert_close(p.grad, torch.ones(3))  # divided by B once


def test_noise_refuses_a_sparse_grad():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse=False"):
        GaussianNoise(1.0, 1.0, 2.0, seed=0).add_(emb)


@pytest.mark.parametrize("secure", [False, True], ids=["seeded", "secure"])
def test_noise_is_one_draw_per_dtype_shared_out_by_shape(secure):
    # float32 and float64 parameters, one frozen, one without a grad, a scalar, and grads
    # that are disjoint views of one buffer (as clip_ makes the small ones' sums)
    shapes32 = [(300, 200), (7,), (), (20, 30)]
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in shapes32]
    buffer = torch.ones(60_000 + 7 + 1 + 600)
    for p, part in zip(ps, buffer.split([p.numel() for p in ps]), strict=True):
        p.grad = part.view(p.shape)
    ps[1].grad = None
    frozen = torch.nn.Parameter(torch.zeros(5), requires_grad=False)
    wide = torch.nn.Parameter(torch.zeros(50_000, dtype=torch.float64))
    wide.grad = torch.ones(50_000, dtype=torch.float64)
    sigma, C, B = 1.0, 2.0, 4.0
    noise = GaussianNoise(sigma, C, B, seed=None if secure else 0, secure=secure)
    draws = []

    class Draws(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("randn", "normal_", "log1p"):
                draws.append(str(func))
            return func(*args, **(kwargs or {}))

    with Draws():
        noise.add_([ps[0], frozen, ps[1], wide, ps[2], ps[3]])
    assert len(draws) == 2, draws  # one per dtype, not one per parameter
    assert frozen.grad is None
    assert ps[1].grad.shape == (7,) and ps[2].grad.shape == ()
    assert wide.grad.dtype == torch.float64
    std = sigma * C / B
    _assert_std(torch.cat([p.grad.flatten() for p in (ps[0], ps[2], ps[3])]), std, mean=1 / B)
    _assert_std(ps[1].grad, std)  # None: zeros, then noise
    _assert_std(wide.grad, std, mean=1 / B)
    # the grads stay views of their buffer, each with its own noise
    assert ps[0].grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert not torch.equal(ps[0].grad[:1, :20].flatten(), ps[3].grad[:1].flatten())


def test_secure_normal_is_standard_normal():
    from indigrad.dp._noise import _secure_normal

    z = _secure_normal(300_001)  # odd length: Box–Muller pairs, cut
    assert z.shape == (300_001,) and z.dtype == torch.float64
    _assert_std(z, 1.0)
    # tails: P(|z| > 3) = 0.0027 → binomial, Z standard errors
    n, p = z.numel(), 0.0026998
    assert abs((z.abs() > 3).sum().item() - n * p) <= Z * math.sqrt(n * p * (1 - p))


# -- Poisson sampling ---------------------------------------------------------------------


@pytest.mark.parametrize("secure", [False, True], ids=["seeded", "secure"])
def test_poisson_inclusion_rate(secure):
    N, q = 2000, 0.03
    sampler = PoissonSampler(N, q, seed=None if secure else 1, secure=secure)
    assert len(sampler) == 33 and sampler.expected_batch_size == pytest.approx(60.0)
    batches = [b for _ in range(3) for b in sampler]  # 3 epochs: 99 steps
    hits = torch.zeros(N)
    for b in batches:
        assert b == sorted(set(b)) and all(0 <= i < N for i in b)
        hits[b] += 1
    # total inclusions ~ Binomial(99·N, q); Z standard deviations
    trials = len(batches) * N
    assert abs(hits.sum().item() - trials * q) <= Z * math.sqrt(trials * q * (1 - q))
    assert len({len(b) for b in batches}) > 5  # sizes vary
    # each index is included ~ Binomial(99, q) times: mean 2.97 per index
    assert hits.max() < 15 and (hits == 0).float().mean() < 0.1


def test_poisson_seed_and_steps():
    a = list(PoissonSampler(100, 0.1, seed=5, steps=7))
    assert len(a) == 7
    assert a == list(PoissonSampler(100, 0.1, seed=5, steps=7))
    sampler = PoissonSampler(100, 0.1, seed=5, steps=7)
    first, second = list(sampler), list(sampler)  # epochs continue the sequence
    assert first == a and second != a


def test_poisson_loader_yields_empty_batches_of_right_shape():
    data = torch.utils.data.TensorDataset(
        torch.randn(20, 3, 2), torch.arange(20), torch.zeros(20, 5, dtype=torch.float16)
    )
    loader = poisson_loader(data, sample_rate=0.02, seed=0, steps=60)  # q·N = 0.4
    sizes = []
    for x, y, h in loader:
        sizes.append(len(y))
        assert x.shape == (len(y), 3, 2) and x.dtype == torch.float32
        assert y.shape == (len(y),) and y.dtype == torch.int64
        assert h.shape == (len(y), 5) and h.dtype == torch.float16
    assert 0 in sizes and max(sizes) > 0  # P(empty) = 0.98²⁰ ≈ 0.67


def test_poisson_loader_empty_batch_of_dicts_and_strings():
    class Text(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"ids": torch.full((4,), i), "text": f"ex{i}", "pair": (torch.ones(2), i)}

    collate = poisson_loader(Text(), sample_rate=0.5, seed=0).collate_fn
    empty = collate([])
    assert empty["ids"].shape == (0, 4) and empty["ids"].dtype == torch.int64
    assert empty["text"] == []
    assert empty["pair"][0].shape == (0, 2) and empty["pair"][1].shape == (0,)
    assert collate([Text()[1], Text()[2]])["text"] == ["ex1", "ex2"]


# -- end to end ---------------------------------------------------------------------------


def test_step_on_an_empty_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(0, 4), torch.zeros(0, dtype=torch.long)
    opt.zero_grad(set_to_none=True)
    with indigrad.capture(model) as cap:
        norms = cap.clip_(F.cross_entropy(model(x), y, reduction="none"), max_norm=1.0)
    assert norms.shape == (0,)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    GaussianNoise(1.0, 1.0, expected_batch_size=2.0, seed=0).add_(model)
    opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(p).all() and not torch.equal(p, b)  # noise alone moved it


def test_training_loop():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = poisson_loader(data, sample_rate=0.05, seed=0)  # q·N = 2: some empty batches
    noise = GaussianNoise(1.0, 1.0, loader.batch_sampler.expected_batch_size, seed=0)
    sizes = []
    for x, y in loader:
        opt.zero_grad()
        with indigrad.capture(model) as cap:
            cap.clip_(F.cross_entropy(model(x), y, reduction="none"), max_norm=1.0)
        noise.add_(model)
        opt.step()
        sizes.append(len(y))
    assert len(sizes) == 20 and 0 in sizes
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- several processes --------------------------------------------------------------------


def _rank_main(rank, world, out, sigma, C, B):
    init = f"file://{os.path.join(out, 'rendezvous')}"
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        w = torch.nn.Parameter(torch.zeros(400, 500))
        v = torch.nn.Parameter(torch.zeros(7))
        w.grad = torch.ones(400, 500)  # (1/W)·Σ_ranks clipped sums, identical on every rank
        # v.grad stays None on every rank
        GaussianNoise(sigma, C, B, seed=rank).add_([w, v])  # the seeds differ: only rank 0's counts
        s = torch.nn.Parameter(torch.zeros(1000))
        GaussianNoise(sigma, C, B, secure=True).add_([s])
        torch.save({"w": w.grad, "v": v.grad, "s": s.grad}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_share_one_processs_noise(tmp_path):
    world, sigma, C, B = 2, 1.5, 0.8, 6.0
    run_processes(_rank_main, (world, str(tmp_path), sigma, C, B), world)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in range(world))
    for k in r0:  # every rank ends with the identical noised gradient
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0)
    # the signal is Σ_ranks = W·(average), over B; the noise is one process's N(0, σ²C²)/B
    _assert_std(r0["w"], sigma * C / B, mean=world * 1.0 / B)
    # and it is exactly what a single process with rank 0's seed draws
    w, v = torch.nn.Parameter(torch.zeros(400, 500)), torch.nn.Parameter(torch.zeros(7))
    GaussianNoise(sigma, C, B, seed=0).add_([w, v])
    torch.testing.assert_close(r0["w"] - world / B, w.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(r0["v"], v.grad, rtol=0, atol=0)
