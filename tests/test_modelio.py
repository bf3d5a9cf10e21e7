import torch
from torch import nn

from vvtq.modelio import EnsembleTeacher


def test_ensemble_with_flip_averages_each_model_over_the_image_and_its_mirror():
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.randn(5, 1, 3, 4)
    with torch.no_grad():
        views = [m(v).softmax(-1) for m in (a, b) for v in (x, x.flip(-1))]
        got = EnsembleTeacher([a, b], [None, None], flip=True)(x)
        plain = EnsembleTeacher([a, b], [None, None])(x)
    assert torch.allclose(got, sum(views) / 4, atol=1e-6)
    assert torch.allclose(plain, (views[0] + views[2]) / 2, atol=1e-6) and not torch.allclose(got, plain)
