import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vvtq.data import (
    ArrayImageDataset,
    CropBox,
    SubsetImageDataset,
    apply_crop,
    normalize,
)
from vvtq.distill import (
    ReplayCropDataset,
    SoftLabelError,
    SoftLabelFile,
    expand_probs,
    generate_softlabels,
    replay_collate,
)

N, M, K, S, C = 5, 6, 3, 12, 7


def make_base(n=N, c=3, h=18, w=26, seed=0, split="train"):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % C
    return ArrayImageDataset(imgs, labels, classes=[f"c{i}" for i in range(C)], name="toy", split=split)


class RecordingTeacher(nn.Module):
    """A tiny deterministic conv net that keeps a copy of every input batch."""

    def __init__(self, in_chans=3, num_classes=C):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(in_chans, 4, 3, stride=2)
        self.fc = nn.Linear(4, num_classes)
        self.inputs: list[torch.Tensor] = []
        self.modes: list[bool] = []

    def forward(self, x):
        self.inputs.append(x.clone())
        self.modes.append(self.training)
        return self.fc(self.conv(x).relu().mean((2, 3))) * 5


@pytest.fixture()
def generated(tmp_path):
    base = make_base()
    teacher = RecordingTeacher()
    path = generate_softlabels(
        teacher,
        base,
        tmp_path / "sl.safetensors",
        num_crops_per_image=M,
        top_k=K,
        out_size=S,
        seed=11,
        batch_size=4,
    )
    return base, teacher, path


def test_file_layout_and_metadata(generated, tmp_path):
    base, _, path = generated
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == ["sl.safetensors"]
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"boxes", "topk_idx", "topk_prob"}
        assert f.get_tensor("boxes").dtype == torch.float32 and f.get_tensor("boxes").shape == (N, M, 5)
        assert f.get_tensor("topk_idx").dtype == torch.int16 and f.get_tensor("topk_idx").shape == (N, M, K)
        assert f.get_tensor("topk_prob").dtype == torch.float16
        meta = json.loads(f.metadata()["vvtq_softlabels"])
    assert meta["format"] == "vvtq-softlabels" and meta["version"] == 1
    assert meta["dataset"]["fingerprint"] == base.fingerprint() and meta["dataset"]["split"] == "train"
    assert (meta["num_classes"], meta["num_crops"], meta["top_k"], meta["out_size"], meta["seed"]) == (
        C,
        M,
        K,
        S,
        11,
    )
    sl = SoftLabelFile(path)
    assert (sl.num_images, sl.num_crops, sl.top_k, sl.num_classes, sl.out_size) == (N, M, K, C, S)
    assert sl.mean == base.mean and sl.std == base.std and len(sl) == N
    sl.validate(base)


def test_replayed_crops_pixel_identical_and_topk_matches(generated):
    base, teacher, path = generated
    assert not any(teacher.modes)  # ran in eval mode
    assert teacher.training  # restored afterwards
    seen = torch.cat(teacher.inputs)
    assert seen.shape == (N * M, 3, S, S)
    seen = seen.view(N, M, 3, S, S)
    sl = SoftLabelFile(path)
    for i in range(N):
        boxes, idx, prob = sl.get(i)
        img = base.get_image(i)
        for j in range(M):
            replay = normalize(apply_crop(img, CropBox.from_tensor(boxes[j]), S), base.mean, base.std)
            assert torch.equal(replay, seen[i, j])
    # stored top-k = teacher's top-k on exactly the batches it saw
    teacher.eval()
    with torch.no_grad():
        probs = torch.cat([torch.softmax(teacher(x), -1) for x in list(teacher.inputs)])
    top_p, top_i = probs.view(N, M, C).topk(K, dim=-1)
    all_idx = torch.stack([sl.get(i)[1] for i in range(N)])
    all_prob = torch.stack([sl.get(i)[2] for i in range(N)])
    assert torch.equal(all_idx, top_i)
    assert torch.allclose(all_prob, top_p, atol=1e-3, rtol=1e-3)


def test_generation_deterministic_and_batch_independent(generated, tmp_path):
    base, _, path = generated
    other = generate_softlabels(
        RecordingTeacher(),
        base,
        tmp_path / "b" / "sl2.safetensors",
        num_crops_per_image=M,
        top_k=K,
        out_size=S,
        seed=11,
        batch_size=50,
        prob_dtype=torch.float32,
    )
    a, b = SoftLabelFile(path), SoftLabelFile(other)
    for i in range(N):
        assert torch.equal(a.get(i)[0], b.get(i)[0])
        assert torch.equal(a.get(i)[1], b.get(i)[1])
    third = generate_softlabels(
        RecordingTeacher(),
        base,
        tmp_path / "c.safetensors",
        num_crops_per_image=M,
        top_k=K,
        out_size=S,
        seed=12,
    )
    assert not torch.equal(SoftLabelFile(third).get(0)[0], a.get(0)[0])


def test_replay_dataset(generated):
    base, teacher, path = generated
    seen = torch.cat(teacher.inputs).view(N, M, 3, S, S)
    ds = ReplayCropDataset(base, path, num_crops=2, seed=3)
    sl = SoftLabelFile(path)
    crops, label, boxes, index, target = ds[4]
    assert crops.shape == (2, 3, S, S) and label == base.get_label(4) and index == 4
    assert target.shape == (2, C) and torch.allclose(target.sum(-1), torch.ones(2))
    sel = ds.pick(4)
    assert torch.equal(crops, seen[4, sel]) and torch.equal(boxes, sl.get(4)[0][sel])
    _, idx, prob = sl.get(4)
    assert torch.equal(target, expand_probs(idx[sel], prob[sel], C))
    assert torch.equal(ReplayCropDataset(base, sl, num_crops=2, seed=3)[4][2], boxes)
    epoch0 = [ds.pick(i) for i in range(N)]
    ds.set_epoch(1)
    assert torch.equal(ds.pick(4), ds.pick(4))
    assert any(not torch.equal(ds.pick(i), epoch0[i]) for i in range(N))
    assert all(len(set(ds.pick(i).tolist())) == 2 for i in range(N))  # no repeated crop within an image
    x, y, bx, ix, tp = replay_collate([ds[0], ds[1], ds[2]])
    assert x.shape == (6, 3, S, S) and y.shape == (6,) and bx.shape == (6, 5) and tp.shape == (6, C)
    assert ix.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        ReplayCropDataset(base, path, num_crops=M + 1)


def test_expand_probs_marginal_smoothing():
    idx = torch.tensor([[2, 0], [4, 1]])
    prob = torch.tensor([[0.5, 0.2], [0.9, 0.1]])
    full = expand_probs(idx, prob, 5)
    assert torch.allclose(full.sum(-1), torch.ones(2))
    assert torch.allclose(full[0], torch.tensor([0.2, 0.1, 0.5, 0.1, 0.1]))
    assert torch.allclose(full[1], torch.tensor([0.0, 0.1, 0.0, 0.0, 0.9]))
    # k == num_classes: nothing to spread
    assert torch.allclose(
        expand_probs(torch.tensor([[1, 0]]), torch.tensor([[0.6, 0.4]]), 2), torch.tensor([[0.4, 0.6]])
    )
    # float16 rounding pushing the sum above 1 is renormalised
    over = expand_probs(torch.tensor([[0, 1]]), torch.tensor([[0.7, 0.31]], dtype=torch.float16), 4)
    assert torch.allclose(over.sum(-1), torch.ones(1)) and (over >= 0).all()
    with pytest.raises(ValueError):
        expand_probs(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3), 2)


def test_validate_mismatches(generated):
    base, _, path = generated
    sl = SoftLabelFile(path)
    with pytest.raises(SoftLabelError, match="split"):
        sl.validate(make_base(split="val"))
    with pytest.raises(SoftLabelError, match="num_images"):
        sl.validate(make_base(n=N + 1))
    with pytest.raises(SoftLabelError, match="num_classes"):
        sl.validate(base, num_classes=C + 1)
    with pytest.raises(SoftLabelError, match="fingerprint"):
        relabelled = ArrayImageDataset(base.images, (base.label_tensor + 1) % C, base.classes, name="toy")
        sl.validate(relabelled)
    with pytest.raises(SoftLabelError, match="name"):
        sl.validate(SubsetImageDataset(base, range(N)))
    with pytest.raises(SoftLabelError, match=str(path)):
        ReplayCropDataset(make_base(split="val"), path)


def test_bad_files(tmp_path, generated):
    _, _, path = generated
    with pytest.raises(SoftLabelError, match="not found"):
        SoftLabelFile(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(SoftLabelError, match=str(junk)):
        SoftLabelFile(junk)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SoftLabelError, match=str(trunc)):
        SoftLabelFile(trunc)
    plain = tmp_path / "plain.safetensors"
    save_file({"boxes": torch.zeros(1, 1, 5)}, str(plain))
    with pytest.raises(SoftLabelError, match="not a vvtq soft-label file"):
        SoftLabelFile(plain)


def test_failed_generation_leaves_nothing(tmp_path):
    base = make_base()

    def bad_teacher(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        generate_softlabels(
            bad_teacher, base, tmp_path / "x.safetensors", num_crops_per_image=2, top_k=2, out_size=8
        )
    with pytest.raises(ValueError, match="teacher returned shape"):
        generate_softlabels(
            lambda x: torch.zeros(x.shape[0], C + 1),
            base,
            tmp_path / "x.safetensors",
            num_crops_per_image=2,
            top_k=2,
            out_size=8,
        )
    assert list(tmp_path.iterdir()) == []


def test_grayscale_with_workers(tmp_path):
    base = make_base(n=4, c=1, h=28, w=28)
    teacher = RecordingTeacher(in_chans=1)
    path = generate_softlabels(
        teacher,
        base,
        tmp_path / "g.safetensors",
        num_crops_per_image=5,
        top_k=2,
        out_size=10,
        seed=0,
        batch_size=3,
        num_workers=2,
    )
    ref = generate_softlabels(
        teacher,
        base,
        tmp_path / "h.safetensors",
        num_crops_per_image=5,
        top_k=2,
        out_size=10,
        seed=0,
        batch_size=7,
    )
    a, b = SoftLabelFile(path), SoftLabelFile(ref)
    a.validate(base)
    for i in range(4):
        assert torch.equal(a.get(i)[0], b.get(i)[0]) and torch.equal(a.get(i)[1], b.get(i)[1])


def test_a_soft_label_file_read_as_a_checkpoint_names_what_it_is(generated):
    from vvtq.checkpoint import CheckpointError, read_meta

    with pytest.raises(CheckpointError, match="is a soft-label file .* teacher.softlabels="):
        read_meta(generated[2])


def test_options_object_and_keywords_are_the_same(tmp_path):
    from vvtq.distill.softlabels import SoftLabelOptions

    base = make_base(n=3)
    opts = SoftLabelOptions(num_crops_per_image=3, top_k=2, out_size=8, seed=4, batch_size=2)
    a = generate_softlabels(RecordingTeacher(), base, tmp_path / "a.safetensors", options=opts)
    b = generate_softlabels(RecordingTeacher(), base, tmp_path / "b.safetensors", num_crops_per_image=3, top_k=2,
                            out_size=8, seed=4, batch_size=2)
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(TypeError, match="not both"):
        generate_softlabels(RecordingTeacher(), base, tmp_path / "c.safetensors", options=opts, top_k=2)


def test_flip_labels_each_crop_by_the_mean_over_it_and_its_mirror(tmp_path):
    base = make_base(n=3)
    teacher = RecordingTeacher()
    settings = dict(num_crops_per_image=4, top_k=C, out_size=8, seed=2, batch_size=4, prob_dtype=torch.float32)
    path = generate_softlabels(teacher, base, tmp_path / "f.safetensors", flip=True, **settings)
    assert len(teacher.inputs) == 6  # three batches of four crops, each seen as is and mirrored
    teacher.eval()
    with torch.no_grad():
        for k in range(0, 6, 2):
            x, mirrored = teacher.inputs[k], teacher.inputs[k + 1]
            assert torch.equal(mirrored, x.flip(-1))
            want = (teacher(x).softmax(-1) + teacher(mirrored).softmax(-1)) / 2
            rows = range(k // 2 * 4, k // 2 * 4 + 4)  # crops of images 0..2, four an image: batch k // 2
            got = torch.stack([expand_probs(*SoftLabelFile(path).get(r // 4)[1:], C)[r % 4] for r in rows])
            assert torch.allclose(got, want, atol=1e-6)
    meta = SoftLabelFile(path)
    assert meta.meta["flip_average"] is True and meta.meta["amp"] == "fp32"
    plain = generate_softlabels(RecordingTeacher(), base, tmp_path / "p.safetensors", **settings)
    assert SoftLabelFile(plain).meta["flip_average"] is False


def test_bf16_labels_agree_with_fp32_and_say_so(tmp_path):
    base = make_base(n=4)
    settings = dict(num_crops_per_image=3, top_k=C, out_size=8, seed=5, batch_size=6, prob_dtype=torch.float32)
    a = SoftLabelFile(generate_softlabels(RecordingTeacher(), base, tmp_path / "a.safetensors", **settings))
    b = SoftLabelFile(generate_softlabels(RecordingTeacher(), base, tmp_path / "b.safetensors", amp="bf16",
                                          **settings))
    assert b.meta["amp"] == "bf16"
    pa, pb = (torch.stack([expand_probs(*f.get(i)[1:], C) for i in range(4)]) for f in (a, b))
    assert torch.allclose(pa, pb, atol=0.03) and not torch.equal(pa, pb)  # bf16 really ran, and is close
    with pytest.raises(SoftLabelError, match="amp must be fp32 or bf16"):
        generate_softlabels(RecordingTeacher(), base, tmp_path / "c.safetensors", amp="fp16", **settings)
