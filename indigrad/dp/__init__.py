"""DP-SGD building blocks: Gaussian noise, privacy accounting and Poisson sampling.

indigrad's :meth:`capture.clip_` puts the clipped sum ``Σ_i min(1, C/‖g_i‖)·g_i`` into each
``p.grad``. This module supplies the rest of a DP-SGD step and its privacy bookkeeping:

- :class:`GaussianNoise` adds ``N(0, σ²C²)`` to every gradient and divides by the *expected*
  batch size ``q·N``, after which any ``torch.optim`` optimizer takes the step;
- :func:`compute_epsilon` and :func:`calibrate_noise_multiplier` ask Google's
  ``dp-accounting`` library (``pip install "indigrad[dp]"``) for ε, or for the σ that meets
  a target ε;
- :class:`PoissonSampler` and :func:`poisson_loader` draw the batches the accountant
  assumes: every example independently with probability ``q``, so sizes vary and a batch
  may be empty.

Example:
    >>> import torch, torch.nn.functional as F, indigrad
    >>> from indigrad.dp import GaussianNoise, poisson_loader
    >>> data = torch.utils.data.TensorDataset(torch.randn(100, 4), torch.randint(0, 3, (100,)))
    >>> model = torch.nn.Linear(4, 3)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> loader = poisson_loader(data, sample_rate=0.25, seed=0)   # 4 steps, ~25 examples each
    >>> noise = GaussianNoise(noise_multiplier=1.0, max_norm=1.0, expected_batch_size=25, seed=0)
    >>> for x, y in loader:
    ...     opt.zero_grad()
    ...     with indigrad.capture(model) as cap:
    ...         _ = cap.clip_(F.cross_entropy(model(x), y, reduction="none"), max_norm=1.0)
    ...     noise.add_(model)
    ...     opt.step()
    >>> len(loader)
    4
"""

from ._accounting import calibrate_noise_multiplier, compute_epsilon
from ._noise import GaussianNoise
from ._sampling import PoissonSampler, poisson_loader

__all__ = [
    "GaussianNoise",
    "PoissonSampler",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "poisson_loader",
]
