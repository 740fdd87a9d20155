"""Poisson sampling of batches, the sampling the accountant assumes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ._noise import _secure_uniform, _stream_seed

# -- Poisson sampling ---------------------------------------------------------------------


class PoissonSampler(Sampler[list[int]]):
    """Batches of indices in ``range(num_samples)``, each included independently with prob. q.

    This is the sampling that :func:`compute_epsilon` assumes. Batch sizes are
    ``Binomial(num_samples, q)``: they vary, and a batch may be empty. An "epoch" is a fixed
    number of steps, ``round(1/q)`` by default, so that on average each example is seen
    once; the accountant's ``steps`` is ``epochs * len(sampler)``.

    Args:
        num_samples: ``N``, the dataset length.
        sample_rate: ``q`` in (0, 1].
        steps: batches per iteration over the sampler (default ``max(1, round(1/q))``).
        seed: seeds the ``torch.Generator``; the whole sequence of batches, over all
            epochs, is then reproducible, and unrelated to the noise of a
            :class:`GaussianNoise` given the same seed. ``None`` seeds it unpredictably.
        secure: draw inclusions from ``os.urandom`` (53-bit uniforms compared with ``q``)
            instead; not reproducible, not allowed with ``seed``. The privacy analysis
            assumes the batch composition is secret, so pair it with
            ``GaussianNoise(..., secure=True)``.

    Example:
        >>> from indigrad.dp import PoissonSampler
        >>> sampler = PoissonSampler(1000, sample_rate=0.01, seed=0)
        >>> len(sampler), sampler.expected_batch_size
        (100, 10.0)
        >>> sizes = [len(batch) for batch in sampler]          # 100 batches of varying size
        >>> len(sizes), min(sizes) < 10 < max(sizes)
        (100, True)
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        steps: int | None = None,
        seed: int | None = None,
        secure: bool = False,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if secure and seed is not None:
            raise ValueError("secure=True draws from os.urandom, which cannot be seeded")
        self.num_samples = int(num_samples)
        self.sample_rate = float(sample_rate)
        self.steps = max(1, round(1 / sample_rate)) if steps is None else int(steps)
        self.secure = secure
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(_stream_seed(seed, "batches"))

    @property
    def expected_batch_size(self) -> float:
        """``q·N``: what :class:`GaussianNoise` divides by."""
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            if self.secure:
                u = _secure_uniform(self.num_samples)  # (N,) float64
            else:
                u = torch.rand(self.num_samples, generator=self._generator, dtype=torch.float64)
            yield (u < self.sample_rate).nonzero().view(-1).tolist()


class _EmptySafeCollate:
    """A collate function that turns an empty batch into (0, …) tensors.

    For an empty batch it collates ``[dataset[0]]`` once (then cached) and keeps zero rows
    of every tensor, so shapes after the first dimension and dtypes are the real ones.
    """

    def __init__(self, dataset: Dataset[Any], collate_fn: Callable[[list[Any]], Any]) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        self._empty: Any = None

    def __call__(self, batch: list[Any]) -> Any:
        if len(batch) > 0:
            return self.collate_fn(batch)
        if self._empty is None:
            self._empty = _zero_rows(self.collate_fn([self.dataset[0]]))
        return self._empty

    def __getstate__(self) -> dict[str, Any]:  # keep worker pickles small
        return {**self.__dict__, "_empty": None}


def _zero_rows(batch: Any) -> Any:
    """A collated batch of one example, cut to zero examples."""
    if isinstance(batch, Tensor):
        return batch[:0]  # (0, ...)
    if isinstance(batch, Mapping):
        return {k: _zero_rows(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_zero_rows(v) for v in batch))
    if isinstance(batch, tuple):
        return tuple(_zero_rows(v) for v in batch)
    if isinstance(batch, list):
        if all(
            isinstance(v, Tensor | Mapping | Sequence) and not isinstance(v, str) for v in batch
        ):
            return [_zero_rows(v) for v in batch]  # one entry per field of a sequence sample
        return []  # a list of raw values (e.g. strings), one per example
    return batch


def poisson_loader(
    dataset: Dataset[Any],
    sample_rate: float,
    *,
    steps: int | None = None,
    seed: int | None = None,
    secure: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    **kwargs: Any,
) -> DataLoader[Any]:
    """A ``DataLoader`` over ``dataset`` with :class:`PoissonSampler` batches.

    Empty batches come out as tensors with a leading 0 dimension and the dataset's trailing
    shapes and dtypes (lists of non-tensor values become ``[]``), which indigrad accepts:
    every quantity is ``(0, …)`` and ``clip_`` adds nothing.

    Args:
        dataset: a map-style dataset with ``len``.
        sample_rate: ``q``.
        steps, seed, secure: as in :class:`PoissonSampler`.
        collate_fn: collates a non-empty list of examples (default: torch's
            ``default_collate``); an empty batch is derived from it.
        kwargs: other ``DataLoader`` arguments (``num_workers``, ``pin_memory``, …); not
            ``batch_size``, ``shuffle``, ``sampler`` or ``drop_last``.

    Returns:
        The loader; ``loader.batch_sampler`` is the :class:`PoissonSampler`.

    Example:
        >>> import torch
        >>> from indigrad.dp import poisson_loader
        >>> data = torch.utils.data.TensorDataset(torch.randn(20, 3, 2), torch.arange(20))
        >>> loader = poisson_loader(data, sample_rate=0.02, seed=0)   # q·N = 0.4: often empty
        >>> x, y = min(loader, key=lambda batch: len(batch[1]))
        >>> x.shape, y.shape, y.dtype
        (torch.Size([0, 3, 2]), torch.Size([0]), torch.int64)
    """
    n = len(dataset)  # type: ignore[arg-type]
    sampler = PoissonSampler(n, sample_rate, steps=steps, seed=seed, secure=secure)
    collate = _EmptySafeCollate(dataset, collate_fn or default_collate)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **kwargs)
