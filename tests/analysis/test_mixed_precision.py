"""Tests for vvtq.analysis.mixed_precision: greedy assignment under a bit budget and the override file."""
from __future__ import annotations

import pytest
import timm
import torch

import vvtq
from vvtq.analysis import average_bits, layer_params, layer_sensitivity, propose_bits, write_overrides
from vvtq.quant import QuantizerError, iter_weight_quantizers
from vvtq.train.config import TrainConfig


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_greedy_spends_the_budget_on_the_sensitive_layer():
    params = {"a": 100, "b": 100, "c": 200}
    sens = {"a": {2: 5.0, 3: 1.0, 4: 0.5, 8: 0.0}, "b": {2: 0.1, 3: 0.05, 4: 0.01, 8: 0.0},
            "c": {2: 0.2, 3: 0.1, 4: 0.05, 8: 0.0}}
    assign = propose_bits(sens, params, 2.25)
    assert assign == {"a": 3, "b": 2, "c": 2}
    assert average_bits(assign, params) == pytest.approx(2.25)
    for budget in (2.0, 2.6, 3.0, 4.0, 8.0):
        assign = propose_bits(sens, params, budget)
        assert average_bits(assign, params) <= budget + 1e-12
    assert propose_bits(sens, params, 8.0) == {"a": 8, "b": 8, "c": 8}
    with pytest.raises(QuantizerError):
        propose_bits(sens, params, 1.5)


def test_override_file_round_trip(tmp_path):
    torch.manual_seed(0)
    kw = {"depth": 2}
    model = timm.create_model("mini_deit", **kw).eval()
    g = torch.Generator().manual_seed(1)
    evalb = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g))]
    params = layer_params(model)
    assert len(params) == 12 and params["blocks.0.mlp.fc1"] == 96 * 384
    table = layer_sensitivity(model, evalb, (2, 3, 4, 8))
    assert all(set(d) == {2, 3, 4} for d in table.values())  # 8 bits taken as lossless, not measured
    assert all(d[2] > d[4] for d in table.values())
    assign = propose_bits(table, params, 3.0)
    assert 2.0 < average_bits(assign, params) <= 3.0
    path = write_overrides(assign, tmp_path / "mp.yaml", header="test\nbudget 3")
    assert path.read_text().startswith("# test\n# budget 3\n")
    cfg = vvtq.QuantConfig.preset("vvtq", wbits=2, abits=4).with_overrides_file(path)
    fresh = vvtq.quantize_model(timm.create_model("mini_deit", **kw), cfg)
    got = {q.name[: -len(".weight_quant")]: q.bits for _m, q in iter_weight_quantizers(fresh)}
    assert got.pop("patch_embed.proj") == 8 and got.pop("head") == 8
    assert got == assign
    assert average_bits(got, params) <= 3.0
    acts = [q for q in vvtq.iter_act_quantizers(fresh) if q.kind not in ("patch_embed_in", "head_in")]
    assert acts and all(q.bits == 4 for q in acts)
    recipe = TrainConfig(quant={"preset": "vvtq", "wbits": 2, "overrides_file": str(path)})
    assert recipe.quant_config().overrides == cfg.overrides
