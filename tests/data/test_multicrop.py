import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from vvtq.data import (
    ArrayImageDataset,
    CropBox,
    EvalDataset,
    MultiCropDataset,
    apply_crop,
    box_to_pixels,
    boxes_to_tensor,
    item_seed,
    multicrop_collate,
    normalize,
    resize_full,
    sample_crop,
)


def make_base(n=6, c=3, h=20, w=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return ArrayImageDataset(imgs, torch.arange(n) % 4, classes=["a", "b", "c", "d"])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), aspect=st.floats(0.3, 3.0))
def test_sample_crop_bounds(seed, aspect):
    g = torch.Generator().manual_seed(seed)
    scale, ratio = (0.35, 1.0), (3 / 4, 4 / 3)
    b = sample_crop(g, scale, ratio, image_aspect=aspect)
    assert b.y0 >= 0 and b.x0 >= 0 and 0 < b.h <= 1 and 0 < b.w <= 1
    assert b.y0 + b.h <= 1 + 1e-6 and b.x0 + b.w <= 1 + 1e-6
    # area fraction within scale; pixel aspect (w*W)/(h*H) within ratio, unless the fallback was taken
    pix_ratio = b.w * aspect / b.h
    if not (b.h == 1.0 or b.w == 1.0):
        assert scale[0] - 1e-5 <= b.h * b.w <= scale[1] + 1e-5
        assert ratio[0] - 1e-5 <= pix_ratio <= ratio[1] + 1e-5


def test_sample_crop_deterministic_and_varied():
    a = [sample_crop(torch.Generator().manual_seed(5)) for _ in range(2)]
    assert a[0] == a[1]
    g = torch.Generator().manual_seed(5)
    many = [sample_crop(g) for _ in range(200)]
    assert len({(b.y0, b.x0, b.h, b.w) for b in many}) == 200
    flips = sum(b.flip for b in many)
    assert 60 < flips < 140


def test_sample_crop_fallback_centre():
    g = torch.Generator().manual_seed(0)
    b = sample_crop(g, attempts=0, image_aspect=2.0)  # wide image -> clamp to max ratio 4/3
    assert b.h == 1.0 and math.isclose(b.w, (4 / 3) / 2, rel_tol=1e-6)
    assert math.isclose(b.x0, (1 - b.w) / 2, rel_tol=1e-6) and b.y0 == 0.0
    b = sample_crop(g, attempts=0, image_aspect=1.0)
    assert (b.y0, b.x0, b.h, b.w) == (0.0, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        sample_crop(g, scale=(0.0, 1.0))


def test_cropbox_float32_roundtrip():
    b = CropBox(0.1, 1 / 3, 0.7, 0.55, True)
    assert CropBox.from_tensor(b.to_tensor()) == b
    assert boxes_to_tensor([b, CropBox.full()]).shape == (2, 5)
    with pytest.raises(ValueError):
        CropBox(0, 0, 0, 0.5)


def test_apply_crop_exact_cases():
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(apply_crop(img, CropBox.full(), 16), img)
    assert torch.equal(apply_crop(img, CropBox(0, 0, 1, 1, True), 16), img.flip(-1))
    # a box covering rows 4..11, cols 2..9 at its own size is a plain slice
    box = CropBox(4 / 16, 2 / 16, 8 / 16, 8 / 16, False)
    assert box_to_pixels(box, 16, 16) == (4, 2, 8, 8)
    assert torch.equal(apply_crop(img, box, 8), img[:, 4:12, 2:10])
    # upscaling matches plain bilinear interpolation of that slice
    up = F.interpolate(img[None, :, 4:12, 2:10], size=(20, 20), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(apply_crop(img, box, 20), up)
    assert resize_full(img, 8).shape == (3, 8, 8)


def test_apply_crop_deterministic():
    img = torch.rand(1, 40, 25, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        b = sample_crop(g, image_aspect=25 / 40)
        a1, a2 = apply_crop(img, b, 12), apply_crop(img.clone(), CropBox.from_tensor(b.to_tensor()), 12)
        assert a1.shape == (1, 12, 12) and torch.equal(a1, a2)


def test_normalize():
    x = torch.ones(2, 3, 4, 4)
    y = normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    assert torch.allclose(y[:, 0], torch.ones(2, 4, 4)) and torch.allclose(y[:, 1], 3 * torch.ones(2, 4, 4))
    assert torch.allclose(y[:, 2], 0.5 * torch.ones(2, 4, 4))
    with pytest.raises(ValueError):
        normalize(x, (0.5,), (0.5,))


def test_item_seed_no_linear_collisions():
    assert item_seed(0, 1, 0) != item_seed(0, 0, 1_000_003)
    seeds = {item_seed(7, e, i) for e in range(20) for i in range(500)}
    assert len(seeds) == 20 * 500
    assert item_seed(1, 0, 0) != item_seed(0, 0, 0)
    assert item_seed(0, 0, 0, stream=1) != item_seed(0, 0, 0)


def test_multicrop_item_determinism_and_consistency():
    base = make_base()
    ds = MultiCropDataset(base, num_crops=4, out_size=10, seed=3)
    crops, label, boxes, idx = ds[2]
    assert crops.shape == (4, 3, 10, 10) and boxes.shape == (4, 5) and idx == 2 and label == 2
    # order of access and fresh instances do not matter
    _ = [ds[i] for i in (5, 0, 1)]
    again = MultiCropDataset(base, num_crops=4, out_size=10, seed=3)[2]
    assert torch.equal(again[0], crops) and torch.equal(again[2], boxes)
    # crops are the boxes applied to the image, then normalised
    img = base.get_image(2)
    for k in range(4):
        want = normalize(apply_crop(img, CropBox.from_tensor(boxes[k]), 10), base.mean, base.std)
        assert torch.equal(crops[k], want)
    # different epoch, index or seed -> different crops
    ds.set_epoch(1)
    assert not torch.equal(ds[2][2], boxes)
    ds.set_epoch(0)
    assert torch.equal(ds[2][2], boxes)
    assert not torch.equal(ds[3][2], boxes)
    assert not torch.equal(MultiCropDataset(base, 4, 10, seed=4)[2][2], boxes)


def test_loader_order_and_workers_independent():
    base = make_base(n=8)
    ds = MultiCropDataset(base, num_crops=2, out_size=8, seed=0)
    ds.set_epoch(5)
    ref = {i: ds[i][2] for i in range(8)}
    shuffled = DataLoader(
        ds,
        batch_size=3,
        shuffle=True,
        collate_fn=multicrop_collate,
        generator=torch.Generator().manual_seed(1),
    )
    workers = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=multicrop_collate)
    for loader in (shuffled, workers):
        seen = set()
        for x, y, boxes, idx in loader:
            assert x.shape[0] == y.shape[0] == boxes.shape[0] == idx.shape[0]
            assert x.shape[0] % 2 == 0
            for j in range(0, idx.shape[0], 2):
                i = int(idx[j])
                assert int(idx[j + 1]) == i and torch.equal(boxes[j : j + 2], ref[i])
                seen.add(i)
        assert seen == set(range(8))


def test_collate_shapes_and_grayscale():
    g = torch.Generator().manual_seed(0)
    base = ArrayImageDataset(
        torch.randint(0, 256, (5, 28, 28), generator=g, dtype=torch.uint8), [0, 1, 2, 3, 4]
    )
    assert base.in_chans == 1 and base.num_classes == 5
    ds = MultiCropDataset(base, num_crops=3, out_size=16)
    x, y, boxes, idx = multicrop_collate([ds[i] for i in range(4)])
    assert x.shape == (12, 1, 16, 16) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert idx.tolist() == y.tolist() and boxes.shape == (12, 5)
    assert set(boxes[:, 4].tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError):
        MultiCropDataset(base, num_crops=0)


def test_eval_dataset():
    base = make_base(n=3, h=12, w=18)
    ev = EvalDataset(base, out_size=12)
    x, y = ev[1]
    assert x.shape == (3, 12, 12) and y == 1
    want = normalize(resize_full(base.get_image(1), 12), base.mean, base.std)
    assert torch.equal(x, want)
    assert len(ev) == 3


def test_translated_crops_are_shifted_pixels_with_reflected_borders():
    """``translate``: the pad-and-crop augmentation of the CIFAR-10 ResNets, unresized pixels; the boxes without it
    are the old ones draw for draw."""
    from vvtq.data.transforms import item_generator

    img = torch.arange(3 * 8 * 8, dtype=torch.float32).view(3, 8, 8)
    box = CropBox(-2 / 8, 1 / 8, 1.0, 1.0, flip=False)  # 2 px up, 1 px right, beyond the image
    want = F.pad(img[None], (0, 1, 2, 0), mode="reflect")[0][:, :8, 1:9]
    assert torch.equal(apply_crop(img, box, 8), want)
    far = CropBox(-12 / 8, 0.0, 1.0, 1.0)  # further than the image is tall: the edge repeated
    assert apply_crop(img, far, 8).shape == (3, 8, 8)
    assert torch.equal(apply_crop(img, CropBox(0.0, 0.0, 1.0, 1.0, True), 8), img.flip(-1))
    shifts = set()
    for i in range(200):
        plain = sample_crop(item_generator(0, 0, i), (0.35, 1.0))
        moved = sample_crop(item_generator(0, 0, i), (0.35, 1.0), translate=0.125)
        assert (plain.h, plain.w, plain.flip) == (moved.h, moved.w, moved.flip)
        assert abs(moved.y0 - plain.y0) <= 0.125 and abs(moved.x0 - plain.x0) <= 0.125
        pure = sample_crop(item_generator(0, 0, i), (1.0, 1.0), translate=0.125)
        assert (pure.h, pure.w) == (1.0, 1.0)
        shifts.add(round(pure.y0 * 32))
        assert apply_crop(torch.rand(3, 32, 32), pure, 32).shape == (3, 32, 32)
    assert shifts == set(range(-4, 5))  # every shift of up to 4 px at 32 px
    with pytest.raises(ValueError, match="translate"):
        sample_crop(item_generator(0, 0, 0), translate=1.0)
