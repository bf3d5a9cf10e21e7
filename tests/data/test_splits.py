"""The held-out validation split: fixed, disjoint from training, refused when it cannot be made."""
from __future__ import annotations

import pytest
import torch

from vvtq.data import ArrayImageDataset, DatasetError
from vvtq.data.splits import HOLDOUT_SPLIT, eval_split, holdout_split, train_val_datasets


def _dataset(n: int = 100) -> ArrayImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return ArrayImageDataset(images, torch.arange(n) % 10, [str(i) for i in range(10)], name="toy")


def test_holdout_is_fixed_disjoint_and_complete():
    base = _dataset()
    rest, held = holdout_split(base, 20)
    assert (len(rest), len(held)) == (80, 20) and held.split == HOLDOUT_SPLIT
    assert set(rest.indices).isdisjoint(held.indices) and set(rest.indices) | set(held.indices) == set(range(100))
    again_rest, again_held = holdout_split(_dataset(), 20)
    assert again_held.indices == held.indices and again_rest.indices == rest.indices  # the same choice each time
    assert held.indices != list(range(80, 100))  # a permutation, not the tail
    assert rest.fingerprint() != base.fingerprint()  # soft-label files made for the whole set do not fit


def test_holdout_zero_keeps_everything_and_too_many_is_refused():
    base = _dataset()
    rest, held = holdout_split(base, 0)
    assert rest is base and len(held) == 0
    with pytest.raises(DatasetError, match="leaves none"):
        holdout_split(base, 100)


def test_train_val_datasets_on_fashion_mnist():
    train, val = train_val_datasets("fashion_mnist", None, "holdout", 5000)
    assert (len(train), len(val)) == (55_000, 5000)
    train2, test = train_val_datasets("fashion_mnist", None, "test", 5000)
    assert len(train2) == 55_000 and len(test) == 10_000 and train2.indices == train.indices
    assert eval_split("fashion_mnist", "holdout", None, 5000).indices == val.indices
    with pytest.raises(DatasetError, match="needs holdout > 0"):
        train_val_datasets("fashion_mnist", None, "holdout", 0)


def test_identity_records_how_to_rebuild_the_training_set():
    """A training set's identity (what a model spec records) names its source, root, holdout and validation
    split, through the held-out view and a further subset alike."""
    rest, held = holdout_split(_dataset(), 20)
    assert rest.identity()["data"] == "toy" and rest.identity()["holdout"] == 20 and held.identity()["holdout"] == 20
    assert rest.identity()["name"] == "toy[train-20]"  # the name soft-label files are checked against is unchanged
    train, _ = train_val_datasets("fashion_mnist", None, "holdout", 5000)
    from vvtq.data import SubsetImageDataset

    ident = SubsetImageDataset(train, range(10)).identity()
    assert (ident["data"], ident["holdout"], ident["val_split"]) == ("fashion_mnist", 5000, "holdout")
    assert ident["root"] == train.root and ident["num_images"] == 10
    plain, _ = train_val_datasets("fashion_mnist", None, "test", 0)
    assert (plain.identity()["holdout"], plain.identity()["val_split"]) == (0, "test")
