"""Privacy accounting through Google's dp-accounting (RDP and PLD)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

Method = Literal["rdp", "pld"]


# -- accounting ---------------------------------------------------------------------------


def _dpa() -> Any:
    try:
        import dp_accounting
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "privacy accounting uses Google's dp-accounting library: "
            'pip install "indigrad[dp]" (or pip install dp-accounting)'
        ) from err
    return dp_accounting


def _event(sample_rate: float, noise_multiplier: float, steps: int) -> Any:
    """DP-SGD as a dp-accounting event: ``steps`` Poisson-subsampled Gaussian mechanisms."""
    dpa = _dpa()
    step = dpa.PoissonSampledDpEvent(sample_rate, dpa.GaussianDpEvent(noise_multiplier))
    return dpa.SelfComposedDpEvent(step, steps)


def _accountant_factory(method: str, pld_discretization: float) -> Callable[[], Any]:
    dpa = _dpa()
    if method == "rdp":
        return lambda: dpa.rdp.RdpAccountant()
    if method == "pld":
        return lambda: dpa.pld.PLDAccountant(value_discretization_interval=pld_discretization)
    raise ValueError(f'method must be "rdp" or "pld", got {method!r}')


def _check_common(sample_rate: float, steps: int, delta: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}; choose delta < 1/len(dataset)")


def compute_epsilon(
    *,
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    method: Method = "rdp",
    pld_discretization: float = 1e-4,
) -> float:
    """ε of DP-SGD after ``steps`` steps, at the given δ, from ``dp-accounting``.

    The mechanism is ``steps`` compositions of the Poisson-subsampled Gaussian mechanism
    (each example in a step's batch independently with probability ``sample_rate``; noise
    ``σ = noise_multiplier`` times the sensitivity), under add-or-remove-one neighbouring
    datasets. This is what :class:`GaussianNoise` with :class:`PoissonSampler` implements.

    Args:
        sample_rate: ``q``, the probability that an example is in a step's batch.
        noise_multiplier: ``σ``.
        steps: number of noisy steps taken (``epochs * len(sampler)``).
        delta: ``δ``; choose it well below ``1 / len(dataset)``.
        method: ``"rdp"`` (Rényi DP, fast, a slightly loose upper bound) or ``"pld"``
            (privacy loss distributions, tighter, slower).
        pld_discretization: ``value_discretization_interval`` of the PLD accountant:
            smaller is tighter and slower. Ignored by ``"rdp"``.

    Returns:
        ε as a float (``inf`` for ``σ = 0``, ``0.0`` for ``steps = 0``).

    Example:
        >>> from indigrad.dp import compute_epsilon
        >>> eps = compute_epsilon(sample_rate=0.01, noise_multiplier=1.0, steps=1000, delta=1e-5)
        >>> round(eps, 2)
        2.1
    """
    _check_common(sample_rate, steps, delta)
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    accountant = _accountant_factory(method, pld_discretization)()
    if steps == 0:
        return 0.0
    with _quiet_absl():  # RDP's compose logs the orders that fail to converge
        accountant.compose(_event(sample_rate, noise_multiplier, int(steps)))
        return float(accountant.get_epsilon(delta))


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    method: Method = "rdp",
    tol: float = 1e-4,
    pld_discretization: float = 1e-4,
) -> float:
    """The smallest σ (within ``tol``) for which DP-SGD meets ``(target_epsilon, delta)``.

    Uses ``dp_accounting.calibrate_dp_mechanism`` on the same mechanism as
    :func:`compute_epsilon`: the returned σ always satisfies
    ``compute_epsilon(..., noise_multiplier=σ) <= target_epsilon`` and is at most ``tol``
    above the smallest σ that does.

    Args:
        target_epsilon: the ε to reach after ``steps`` steps.
        delta: ``δ``; choose it well below ``1 / len(dataset)``.
        sample_rate: ``q``.
        steps: number of noisy steps that will be taken.
        method: ``"rdp"`` or ``"pld"``, as in :func:`compute_epsilon`.
        tol: tolerance on σ.
        pld_discretization: as in :func:`compute_epsilon`.

    Returns:
        σ, the ``noise_multiplier`` to give :class:`GaussianNoise`.

    Example:
        >>> from indigrad.dp import calibrate_noise_multiplier, compute_epsilon
        >>> sigma = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5,
        ...                                    sample_rate=0.01, steps=1000, tol=1e-2)
        >>> 1.01 <= sigma <= 1.04                      # the smallest σ is 1.022…
        True
        >>> compute_epsilon(sample_rate=0.01, noise_multiplier=sigma, steps=1000, delta=1e-5) <= 2.0
        True
    """
    _check_common(sample_rate, steps, delta)
    if not 0 < target_epsilon < math.inf:
        raise ValueError(
            f"target_epsilon must be a positive finite number, got {target_epsilon} "
            "(no privacy at all needs no noise: noise_multiplier=0)"
        )
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if steps == 0:
        return 0.0
    factory = _accountant_factory(method, pld_discretization)
    with _quiet_absl():
        sigma = _dpa().calibrate_dp_mechanism(
            factory,
            lambda s: _event(sample_rate, s, int(steps)),
            target_epsilon,
            delta,
            tol=tol,
        )
    return float(sigma)


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """For small σ the RDP accountant logs (through absl) that it drops some Rényi orders
    whose computation does not converge. Dropping orders only makes the bound looser, never
    invalid, so these warnings are silenced."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        log.setLevel(level)
