from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vvtq.data import (
    IMAGENET_MEAN,
    DatasetError,
    EvalDataset,
    ImageFolderDataset,
    MultiCropDataset,
    build_dataset,
    find_classes,
    multicrop_collate,
)


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture()
def tree(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    spec = {
        "train": {"zebra": ["b.png", "a.png"], "ant": ["x.png"], "mole": ["sub/deep.png", "m.PNG"]},
        "val": {"zebra": ["v.png"], "ant": ["w.png"]},
    }
    for split, classes in spec.items():
        for cname, files in classes.items():
            for i, fname in enumerate(files):
                h, w = 10 + i, 14 + 2 * i
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                save_png(tmp_path / split / cname / fname, arr)
                arrays[(split, cname, fname)] = arr
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    gray = rng.integers(0, 256, (9, 9), dtype=np.uint8)
    save_png(tmp_path / "train" / "ant" / "y_gray.png", gray)
    arrays[("train", "ant", "y_gray.png")] = np.repeat(gray[..., None], 3, axis=2)
    return tmp_path, arrays


def test_classes_files_labels(tree):
    root, arrays = tree
    ds = ImageFolderDataset(root, "train")
    assert ds.classes == ["ant", "mole", "zebra"] and ds.num_classes == 3 and ds.in_chans == 3
    assert ds.files == [
        "ant/x.png",
        "ant/y_gray.png",
        "mole/m.PNG",
        "mole/sub/deep.png",
        "zebra/a.png",
        "zebra/b.png",
    ]
    assert ds.labels() == [0, 0, 1, 1, 2, 2]
    assert ds.mean == IMAGENET_MEAN
    for i, f in enumerate(ds.files):
        cname, fname = f.split("/", 1)
        x = ds.get_image(i)
        want = torch.from_numpy(arrays[("train", cname, fname)]).permute(2, 0, 1).float() / 255
        assert x.dtype == torch.float32 and torch.equal(x, want)


def test_val_uses_train_classes(tree):
    root, _ = tree
    val = ImageFolderDataset(root, "val")
    assert val.classes == ["ant", "mole", "zebra"]
    assert val.labels() == [0, 2]
    assert find_classes(root / "val") == ["ant", "zebra"]
    ds = build_dataset(str(root), "val")
    assert isinstance(ds, ImageFolderDataset) and ds.labels() == [0, 2]
    assert build_dataset("image_folder", "val", root=str(root)).files == ds.files


def test_fingerprint_tracks_files(tree):
    root, _ = tree
    fp = ImageFolderDataset(root, "train").fingerprint()
    assert ImageFolderDataset(root, "train").fingerprint() == fp
    (root / "train" / "zebra" / "a.png").rename(root / "train" / "zebra" / "c.png")
    assert ImageFolderDataset(root, "train").fingerprint() != fp


def test_errors(tmp_path, tree):
    root, _ = tree
    with pytest.raises(DatasetError, match=str(tmp_path / "missing")):
        ImageFolderDataset(tmp_path / "missing", "train")
    with pytest.raises(DatasetError, match="test"):
        ImageFolderDataset(root, "test")
    empty = tmp_path / "empty"
    (empty / "train" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        ImageFolderDataset(empty, "train")
    (empty / "val").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        ImageFolderDataset(empty, "val")
    with pytest.raises(DatasetError, match="unknown dataset"):
        build_dataset(str(tmp_path / "nowhere"), "train")
    with pytest.raises(DatasetError, match="needs root"):
        build_dataset("image_folder", "train")


def test_unknown_class_dir_in_val(tree):
    root, _ = tree
    save_png(root / "val" / "yak" / "q.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DatasetError, match="yak"):
        ImageFolderDataset(root, "val")


def test_corrupt_image(tree):
    root, _ = tree
    bad = root / "train" / "ant" / "x.png"
    bad.write_bytes(b"\x89PNG garbage")
    ds = ImageFolderDataset(root, "train")
    with pytest.raises(DatasetError, match=str(bad)):
        ds.get_image(0)


def test_views_on_folder(tree):
    root, _ = tree
    ds = ImageFolderDataset(root, "train")
    mc = MultiCropDataset(ds, num_crops=3, out_size=8, seed=1)
    x, y, boxes, idx = multicrop_collate([mc[0], mc[4]])
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 0, 0, 2, 2, 2] and boxes.shape == (6, 5)
    assert idx.tolist() == [0, 0, 0, 4, 4, 4]
    ev = EvalDataset(ds, out_size=12)
    xe, ye = ev[5]
    assert xe.shape == (3, 12, 12) and ye == 2


def test_decoded_images_are_cached_once_in_the_process_but_not_in_loader_workers(tmp_path):
    from torch.utils.data import DataLoader

    from fakes import write_image_folder
    from vvtq.data import ImageFolderDataset

    write_image_folder(tmp_path, {"train": 6}, 8)
    ds = ImageFolderDataset(tmp_path, "train")
    first = ds.get_image(0)
    assert len(ds._cache) == 1 and torch.equal(ds.get_image(0), first)
    assert len(ImageFolderDataset(tmp_path, "train", cache_bytes=0).__dict__["_cache"]) == 0
    fresh = ImageFolderDataset(tmp_path, "train")

    def cached_in_worker(idx):  # runs in the worker process: how many images its copy of the dataset kept
        for i in idx:
            fresh.get_image(i)
        return len(fresh._cache)

    kept = list(DataLoader(list(range(len(fresh))), batch_size=3, num_workers=1, collate_fn=cached_in_worker))
    assert kept == [0, 0]  # the worker decoded without keeping a copy
