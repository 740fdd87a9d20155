"""The buffer pool behind materialised per-example gradients: reuse without aliasing."""

import gc

import pytest
import torch

import indigrad
from indigrad import _alloc

MiB = 1 << 20


@pytest.fixture
def pool(monkeypatch):
    fresh = _alloc._Pool()
    monkeypatch.setattr(_alloc, "_POOL", fresh)
    return fresh


def _like(dtype=torch.float32):
    return torch.empty(0, dtype=dtype)


def test_a_buffer_the_caller_holds_is_never_handed_out_again(pool):
    a = _alloc.empty((1024, 1024), like=_like())  # 4 MiB
    a.fill_(1.0)
    view = a[3:]  # the caller keeps only a view
    del a
    gc.collect()
    b = _alloc.empty((1024, 1024), like=_like())
    b.fill_(2.0)
    assert torch.all(view == 1.0)
    storage = b.untyped_storage()  # ... or only the storage
    del b
    c = _alloc.empty((1024, 1024), like=_like())
    assert c.data_ptr() != storage.data_ptr()
    array = c.numpy()  # ... or a NumPy array sharing it
    del c
    d = _alloc.empty((1024, 1024), like=_like())
    assert d.data_ptr() != array.ctypes.data


def test_dropped_buffers_are_reused(pool):
    a = _alloc.empty((2048, 1024), like=_like())  # 8 MiB
    ptr = a.data_ptr()
    del a
    b = _alloc.empty((2000, 1024), like=_like())  # a little smaller: the same buffer
    assert b.data_ptr() == ptr
    del b
    c = _alloc.empty((4096, 1024), like=_like())  # 2× bigger: a new one
    assert c.data_ptr() != ptr
    d = _alloc.empty((512, 1024), like=_like())  # 4× smaller: not worth the old one
    assert d.data_ptr() != ptr
    assert len(pool._buffers) == 3


def test_buffers_are_aligned_typed_and_shaped(pool):
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.int64):
        t = _alloc.empty((3, 512, 512), like=_like(dtype))
        assert t.dtype == dtype and t.shape == (3, 512, 512) and t.is_contiguous()
        assert t.data_ptr() % _alloc._HUGE == 0  # starts on a huge page
        t.zero_()


def test_the_pool_never_holds_more_than_twice_its_peak_in_use(pool):
    held = [_alloc.empty((MiB,), like=_like()) for _ in range(3)]  # 3 × 4 MiB in use
    del held
    for k in range(1, 8):  # growing sizes, one at a time: each needs a new buffer
        t = _alloc.empty((k * 3 * MiB,), like=_like())
        del t
        assert sum(b.nbytes for b in pool._buffers) <= 2 * pool._peak
    assert pool._peak == 7 * 12 * MiB
    assert len(pool._buffers) < 7  # the smallest were unmapped


def test_small_and_non_cpu_requests_are_ordinary_tensors(pool):
    t = _alloc.empty((10, 10), like=_like())
    assert t.shape == (10, 10) and not pool._buffers
    meta = _alloc.empty((1024, 1024), like=torch.empty(0, device="meta"))
    assert meta.device.type == "meta" and not pool._buffers


def test_per_example_gradients_survive_the_next_step(pool):
    model = torch.nn.Linear(256, 512)
    x = torch.randn(8, 256)
    with indigrad.capture(model) as cap:
        first = cap.grads(model(x).square().sum(1))["weight"]  # 4 MiB: from the pool
    kept = first.clone()
    with indigrad.capture(model) as cap:
        second = cap.grads(model(2 * x).square().sum(1))["weight"]
    assert second.data_ptr() != first.data_ptr()
    torch.testing.assert_close(first, kept)
    assert not torch.allclose(second, kept)
