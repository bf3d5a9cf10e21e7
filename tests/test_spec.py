"""``ModelSpec``: what a checkpoint records about its model, read back from old and new metadata alike."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm

import vvtq
from vvtq.checkpoint import read_meta
from vvtq.errors import ConfigError
from vvtq.modelio import check_spec

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [REPO / "src/vvtq/assets/mini_deit_fmnist.safetensors",
           *sorted((REPO / "benchmarks/results/accuracy_v2_teachers").glob("*.safetensors"))]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_checkpoints_load_unchanged(path):
    meta = read_meta(path)
    spec = vvtq.ModelSpec.from_dict(meta)
    assert spec.name == meta["model"] and spec.model_kwargs == meta["model_kwargs"] and spec.quant is None
    assert spec.img_size == meta["img_size"] and spec.classes == meta["classes"]
    assert {k: v for k, v in spec.to_dict().items()} == {k: meta[k] for k in spec.to_dict()}
    model, _ = vvtq.load_model(path)
    assert vvtq.ModelSpec.of(model) == spec


def test_round_trip_and_quant():
    spec = vvtq.ModelSpec("mini_deit", {"depth": 2}, img_size=28, mean=[0.5], std=[0.25], classes=["a", "b"])
    assert vvtq.ModelSpec.from_dict({**spec.to_dict(), "step": 3, "train_config": {}}) == spec
    q = spec.with_quant(vvtq.QuantConfig.preset("lsq", wbits=3, abits=3))
    assert q.quantized and q.quant_config().wbits == 3 and not spec.quantized
    model = vvtq.build_model(q)
    assert model.vvtq_config.wbits == 3 and vvtq.ModelSpec.of(model) == q


def test_spec_of_a_plain_timm_model():
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, depth=1)
    with pytest.raises(ConfigError, match="does not match its spec"):  # depth=1 is not in timm's config
        check_spec(model, vvtq.ModelSpec.of(model))
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32)
    spec = vvtq.ModelSpec.of(model)
    assert spec.model_kwargs == {"num_classes": 10, "img_size": 32} and spec.img_size == 32
    assert spec.mean == pytest.approx([0.485, 0.456, 0.406])
    check_spec(model, spec)


def test_bad_specs_are_config_errors():
    with pytest.raises(ConfigError, match="names no model"):
        vvtq.ModelSpec.from_dict({"model_kwargs": {}})
    with pytest.raises(ConfigError, match="mapping"):
        vvtq.ModelSpec("mini_deit", model_kwargs=[1])
    with pytest.raises(ConfigError, match="cannot tell which model"):
        vvtq.ModelSpec.of(timm.models.vision_transformer.VisionTransformer(img_size=28, patch_size=7, depth=1,
                                                                           embed_dim=48, num_heads=1))


def test_data_source_comes_from_the_spec():
    """The spec's dataset answers which images a model was trained and validated on; the training settings are
    not read when the spec has the answer."""
    from vvtq.spec import DataSource, data_source

    ident = {"name": "fashion_mnist[train-500]", "root": "/data/fm", "split": "train", "data": "fashion_mnist",
             "holdout": 500, "val_split": "holdout"}
    meta = {**vvtq.ModelSpec("mini_deit", dataset=ident).to_dict(),
            "train_config": {"data": "other", "data_root": "/elsewhere", "val_split": "test", "holdout": 0}}
    assert data_source(meta) == DataSource("fashion_mnist", "/data/fm", "holdout", 500)
    src = data_source(meta)
    assert src.given() == src and src.given(val_split="test").val_split == "test"
    assert src.given(root="/mnt/fm") == DataSource("fashion_mnist", "/mnt/fm", "holdout", 500)
    assert src.given("image_folder").root is None  # another dataset does not inherit the recorded root
    assert src.given(holdout=0).holdout == 0


def test_data_source_of_checkpoints_written_before_the_spec_recorded_it():
    """An old checkpoint's spec lacks data, holdout and val_split: those come from its training settings."""
    from vvtq.spec import DataSource, data_source

    meta = read_meta(SHIPPED[0])
    assert "data" not in meta["dataset"] and meta["train_config"].get("holdout") is None
    assert data_source(meta) == DataSource("fashion_mnist", meta["dataset"]["root"], "test", 0)
    old = {"model": "mini_deit", "train_config": {"data": "image_folder", "data_root": "/imgs", "val_split": "val",
                                                  "holdout": 3}}
    assert data_source(old) == DataSource("image_folder", "/imgs", "val", 3)
    assert data_source({"model": "mini_deit"}) == DataSource(None)


def test_data_source_of_a_model_saved_from_a_loop_of_one_s_own():
    """``save_model`` writes no training config; the dataset identity's name still says what the data was."""
    from vvtq.spec import data_source

    fm = data_source({"dataset": {"name": "fashion_mnist[subset]", "root": "/usr/share/datasets/fashion-mnist"}})
    assert (fm.data, fm.root) == ("fashion_mnist", "/usr/share/datasets/fashion-mnist")
    assert data_source({"dataset": {"name": "image_folder[train-5000]", "root": "/data/c10"}}).data == "/data/c10"
    assert data_source({"dataset": {"name": "array"}}).data is None
