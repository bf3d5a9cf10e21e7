import math

import pytest
import torch
import torch.nn.functional as F

from vvtq.distill import distill_loss, soft_cross_entropy


def test_soft_ce_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    p = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    z = math.log(math.e + math.e**2 + 1)
    row0 = -(0.2 * (1 - z) + 0.5 * (2 - z) + 0.3 * (0 - z))
    row1 = math.log(3)
    assert math.isclose(soft_cross_entropy(logits, p).item(), (row0 + row1) / 2, rel_tol=1e-6)


def test_soft_ce_matches_torch_and_onehot():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 10, generator=g)
    p = torch.softmax(torch.randn(8, 10, generator=g), -1)
    assert torch.allclose(soft_cross_entropy(logits, p), F.cross_entropy(logits, p), atol=1e-6)
    y = torch.randint(0, 10, (8,), generator=g)
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(y, 10).float()), F.cross_entropy(logits, y))
    # minimised (= entropy of p) when the student matches the teacher
    ent = -(p * p.log()).sum(-1).mean()
    assert torch.allclose(soft_cross_entropy(p.log(), p), ent, atol=1e-6)
    assert soft_cross_entropy(logits, p) > ent


def test_distill_loss_mix_and_errors():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, generator=g)
    p = torch.softmax(torch.randn(4, 5, generator=g), -1)
    y = torch.tensor([0, 1, 2, 3])
    soft, hard = soft_cross_entropy(logits, p), F.cross_entropy(logits, y)
    assert torch.equal(distill_loss(logits, p), soft)
    assert torch.allclose(distill_loss(logits, p, y, 0.25), 0.75 * soft + 0.25 * hard)
    assert torch.allclose(distill_loss(logits, p, y, 1.0), hard)
    with pytest.raises(ValueError):
        distill_loss(logits, p, None, 0.5)
    with pytest.raises(ValueError):
        distill_loss(logits, p, y, 1.5)
    with pytest.raises(ValueError):
        soft_cross_entropy(logits, p[:, :4])


def test_bf16_autocast_stable():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 100, generator=g, requires_grad=True)
    x = torch.randn(6, 16, generator=g) * 50  # large logits
    p = torch.softmax(torch.randn(6, 100, generator=g), -1).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = x @ w
        assert logits.dtype == torch.bfloat16
        loss = distill_loss(logits, p, torch.zeros(6, dtype=torch.long), 0.1)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = 0.9 * soft_cross_entropy(logits.float(), p.float()) + 0.1 * F.cross_entropy(
        logits.float(), torch.zeros(6, dtype=torch.long)
    )
    assert torch.allclose(loss, ref)
    loss.backward()
    assert torch.isfinite(w.grad).all()
    huge = torch.tensor([[1e4, -1e4, 0.0]], dtype=torch.bfloat16)
    assert torch.isfinite(soft_cross_entropy(huge, torch.tensor([[0.0, 1.0, 0.0]])))
