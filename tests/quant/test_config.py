"""QuantConfig: presets, validation messages, overrides by name pattern, serialisation."""
from __future__ import annotations

import json

import pytest

from vvtq.quant import QuantConfig, QuantizerError


@pytest.mark.parametrize("field", ["wbits", "abits", "edge_bits"])
@pytest.mark.parametrize("bits", [1, 9, 0, 16])
def test_bits_out_of_range(field, bits):
    with pytest.raises(QuantizerError, match=rf"{field} must be an integer in 2\.\.8, or 32.*got {bits}"):
        QuantConfig(**{field: bits}).validate()
    with pytest.raises(QuantizerError, match=field):
        QuantConfig.preset("vvtq", **{field: bits})


def test_override_bits_out_of_range():
    cfg = QuantConfig(overrides={"blocks.0.*": {"wbits": 12}})
    with pytest.raises(QuantizerError, match=r"wbits of override 'blocks\.0\.\*' must be an integer in 2\.\.8"):
        cfg.validate()
    with pytest.raises(QuantizerError, match="must set 'wbits' and/or 'abits'"):
        QuantConfig(overrides={"blocks.0.*": {"bits": 4}}).validate()


def test_thirty_two_bits_is_accepted():
    QuantConfig(wbits=32, abits=32, edge_bits=32, overrides={"head": {"wbits": 32}}).validate()


def test_presets_differ_as_documented():
    lsq, vvtq = QuantConfig.preset("lsq", wbits=2), QuantConfig.preset("vvtq", wbits=3, abits=4)
    assert (lsq.wbits, lsq.abits, lsq.split_qkv, lsq.gelu_offset, lsq.gelu_signed) == (2, 2, False, False, False)
    assert set(lsq.weight_granularity.values()) == {"tensor"} and set(lsq.act_granularity.values()) == {"tensor"}
    assert (vvtq.wbits, vvtq.abits, vvtq.split_qkv, vvtq.gelu_offset) == (3, 4, True, True)
    assert vvtq.act_granularity["attn_prob"] == "head" and vvtq.weight_granularity["q"] == "channel"
    with pytest.raises(QuantizerError, match="unknown preset"):
        QuantConfig.preset("fancy")
    with pytest.raises(QuantizerError, match="no field 'wbit'"):
        QuantConfig.preset("vvtq", wbit=4)


def test_preset_with_a_partial_granularity_table_keeps_the_other_kinds():
    """A recipe that asks for per-channel LayerNorm outputs must not lose the vvtq preset's per-head q/k/v."""
    cfg = QuantConfig.preset("vvtq", wbits=2, act_granularity={"attn_in": "channel", "mlp_in": "channel"})
    assert cfg.act_granularity["attn_in"] == cfg.act_granularity["mlp_in"] == "channel"
    assert cfg.act_granularity["q_act"] == cfg.act_granularity["attn_prob"] == "head"
    assert cfg.act_granularity.keys() == QuantConfig.preset("vvtq").act_granularity.keys()
    lsq = QuantConfig.preset("lsq", weight_granularity={"fc1": "channel"})
    assert lsq.weight_granularity["fc1"] == "channel" and lsq.weight_granularity["qkv"] == "tensor"


def test_gelu_output_sign_and_old_configs():
    """The LSQ baseline quantizes the GELU output unsigned (LSQ's rule for a non-negative activation); configs
    recorded before ``gelu_signed`` existed had it signed without an offset and are rebuilt that way."""
    from timm.layers import Mlp

    from vvtq.quant import quantize_model
    from vvtq.train import build_model

    def fc2_signed(cfg):
        model = quantize_model(build_model("mini_deit", {"num_classes": 10, "in_chans": 1}), cfg)
        mlp = next(m for m in model.modules() if isinstance(m, Mlp))
        return mlp.fc2.input_quant.signed, mlp.fc2.input_quant.offset is not None

    assert fc2_signed(QuantConfig.preset("lsq", wbits=2)) == (False, False)
    assert fc2_signed(QuantConfig.preset("vvtq", wbits=2)) == (False, True)
    assert fc2_signed(QuantConfig.preset("lsq", wbits=2, gelu_signed=True)) == (True, False)
    old = QuantConfig.preset("lsq", wbits=2).to_dict()
    del old["gelu_signed"]
    assert QuantConfig.from_dict(old).gelu_signed is True
    old_vvtq = QuantConfig.preset("vvtq", wbits=2).to_dict()
    del old_vvtq["gelu_signed"]
    assert QuantConfig.from_dict(old_vvtq).gelu_signed is False
    with pytest.raises(QuantizerError, match="exclude each other"):
        QuantConfig.preset("vvtq", gelu_signed=True)


def test_bits_for_overrides_and_edges():
    cfg = QuantConfig.preset("vvtq", wbits=4, overrides={"blocks.0.*": {"wbits": 8}, "blocks.1.mlp.fc2": {"abits": 2}})
    assert cfg.bits_for("blocks.0.attn.q.weight_quant", "q", True) == 8
    assert cfg.bits_for("blocks.0.attn.q_quant", "q_act", False) == 4
    assert cfg.bits_for("blocks.10.attn.q.weight_quant", "q", True) == 4
    assert cfg.bits_for("blocks.1.mlp.fc2.input_quant", "mlp_hidden", False) == 2
    assert cfg.bits_for("head.weight_quant", "head", True) == 8
    assert cfg.bits_for("patch_embed.proj.input_quant", "patch_embed_in", False) == 8


def test_granularity_validation():
    with pytest.raises(QuantizerError, match="no attention heads"):
        QuantConfig(weight_granularity={"fc1": "head"}).validate()
    with pytest.raises(QuantizerError, match="cannot be quantized per 'head'"):
        QuantConfig(act_granularity={"mlp_in": "head"}).validate()
    with pytest.raises(QuantizerError, match="unknown module kind"):
        QuantConfig(weight_granularity={"fc3": "tensor"}).validate()


def test_dict_round_trip_and_overrides_file(tmp_path):
    cfg = QuantConfig.preset("vvtq", wbits=2, overrides={"blocks.0.*": {"wbits": 8}})
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(QuantizerError, match="unknown QuantConfig field"):
        QuantConfig.from_dict({"wbitz": 3})
    path = tmp_path / "mix.json"
    path.write_text(json.dumps({"overrides": {"head": {"wbits": 4}}}))
    mixed = cfg.with_overrides_file(path)
    assert mixed.overrides == {"blocks.0.*": {"wbits": 8}, "head": {"wbits": 4}} and cfg.overrides == {
        "blocks.0.*": {"wbits": 8}}
    with pytest.raises(QuantizerError, match="not found"):
        cfg.with_overrides_file(tmp_path / "nope.json")
