"""Forward under torch.autocast(bfloat16): norms and clipped sums in float32, within bf16
accuracy of the float32 reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import Scale

import indigrad


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.GELU(),
        Scale(32),
        nn.LayerNorm(32),
        nn.Linear(32, 32),
        nn.GELU(),
        nn.Linear(32, 5),
    )


@pytest.mark.parametrize("tokens", [False, True], ids=["flat", "tokens"])
def test_bf16_autocast_norms_and_clip_within_3_percent(tokens):
    model = _model()
    shape = (12, 6, 16) if tokens else (12, 16)
    x = torch.randn(shape)
    y = torch.randint(0, 5, shape[:-1])

    def losses(x, y):
        out = model(x)
        return F.cross_entropy(out.movedim(-1, 1) if tokens else out, y, reduction="none")

    ref = indigrad.testing.loop_grads(model, losses, x, y)  # float32, no autocast
    ref_norms = indigrad.testing.norms_of(ref)
    max_norm = float(ref_norms.median())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # the forward really runs in bf16
    with indigrad.capture(model) as cap:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l = losses(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # quantities under autocast too
            per_example = cap.backward(l)
            norms = per_example.norms()
            per_example.clip_(max_norm)
            sq = per_example.sq_norms()
            grads = per_example.grads()
    assert norms.dtype == torch.float32
    # computed in float32 from the bf16 activations and output gradients
    assert all(v.dtype == torch.float32 for v in sq.values())
    assert all(v.dtype == torch.float32 for v in grads.values())
    for k in ref:
        rel = (grads[k] - ref[k]).norm() / ref[k].norm()
        assert rel < 0.03, (k, float(rel))
    torch.testing.assert_close(norms, ref_norms, rtol=0.03, atol=0)
    expected = indigrad.testing.clipped_sum(ref, max_norm)
    for k, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        rel = (p.grad - expected[k]).norm() / expected[k].norm()
        assert rel < 0.03, (k, float(rel))
