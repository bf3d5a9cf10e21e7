"""The QAT lever protocol: a new lever is one settings class and one lever class, registered under its recipe
name; the loop builds it, calls its hooks in order, logs its metrics and checkpoints its state."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vvtq.errors import ConfigError
from vvtq.qat import LEVERS, Lever, LeverSettings, RunContext, StepOutputs, register_lever
from vvtq.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "src" / "vvtq" / "assets" / "mini_deit_fmnist.safetensors"
TINY = ["train_subset=128", "val_subset=64", "batch_size=32", "epochs=1", "log_every=1", "progress=false",
        "calib_batches=1", f"init_from={TEACHER}", "quant={preset: lsq, wbits: 4, abits: 4}"]


@dataclass
class ToySettings(LeverSettings):
    """A lever of the test's own: adds ``weight * sum(w^2)`` of the head and counts its hook calls."""

    weight: float = 0.0
    order = 40

    def validate(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0; got {self.weight}")

    def build(self, ctx: RunContext) -> ToyLever:
        return ToyLever(ctx.model, self.weight)


class ToyLever(Lever):
    name = "toy"
    calls: list[str] = []

    def __init__(self, model: torch.nn.Module, weight: float):
        self.head, self.weight, self.count = model.head.weight, weight, 0
        ToyLever.calls = []

    def loss(self, step: int, out: StepOutputs) -> torch.Tensor:
        ToyLever.calls.append(f"loss{step}")
        return self.weight * self.head.pow(2).sum()

    def after_backward(self, step: int) -> None:
        ToyLever.calls.append(f"backward{step}")
        assert self.head.grad is not None

    def after_step(self, step: int) -> None:
        ToyLever.calls.append(f"step{step}")
        self.count += 1

    def metrics(self) -> dict[str, float]:
        return {"toy/count": float(self.count)}

    def state_dict(self) -> dict:
        return {"meta": {"count": self.count}, "tensors": {"toy.head_norm": self.head.detach().norm().reshape(1)}}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["meta"]["count"]
        assert "toy.head_norm" in state["tensors"]


@pytest.fixture
def toy():
    register_lever("toy", ToySettings)
    yield
    LEVERS.pop("toy")


def test_a_lever_added_in_a_test_alone_runs_in_the_loop_and_resumes(toy, tmp_path):
    cfg = TrainConfig.from_yaml("mini_deit_fp_cls", TINY + ["toy={weight: 0.001}", "max_steps=2", f"out={tmp_path}"])
    assert cfg.toy.weight == 0.001 and cfg.to_dict()["toy"] == {"weight": 0.001}
    train(cfg)
    assert ToyLever.calls == ["loss0", "backward0", "step0", "loss1", "backward1", "step1"]
    steps = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"]
    assert [r["toy/count"] for r in steps] == [1.0, 2.0]
    train(cfg.apply(["max_steps=3"]), resume=True)  # the count comes back from the checkpoint
    steps = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"]
    assert steps[-1]["toy/count"] == 3.0


def test_a_lever_s_settings_are_typed_and_checked_before_any_data(toy):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in toy: wieght \(did you mean 'weight'\?\)"):
        TrainConfig.from_yaml("mini_deit_fp_cls", TINY + ["toy={wieght: 1}", "data=/nonexistent"])
    with pytest.raises(ConfigError, match="toy: weight must be >= 0"):
        TrainConfig.from_yaml("mini_deit_fp_cls", TINY + ["toy={weight: -1}", "data=/nonexistent"])
    with pytest.raises(ConfigError, match="toy.weight.*number"):
        TrainConfig.from_yaml("mini_deit_fp_cls", TINY + ["toy={weight: heavy}"])
    with pytest.raises(ConfigError, match="toy acts on quantized weights"):
        TrainConfig.from_yaml("mini_deit_fp_cls", ["toy={weight: 1}"])  # an FP recipe


def test_levers_run_in_their_settings_order():
    cfg = TrainConfig.from_yaml("mini_deit_fp_cls", TINY + ["oscillation={every: 1}", "anneal={start_frac: 0.5}",
                                                         "regularizer={lambda_max: 0.01}"])
    assert [type(s).__name__ for _, s in cfg.lever_settings()] == [
        "RegularizerSettings", "AnnealSettings", "OscillationSettings"]


def test_recorded_configs_keep_the_form_they_were_written_in():
    """A recipe's sub-settings come back with the keys it wrote (and only those), so that the configs recorded
    in checkpoints and study results before the settings were typed still compare equal."""
    cfg = TrainConfig.from_recipe("mini_deit_w2a2_paper")
    data = cfg.to_dict()
    assert data["quant"] == {"preset": "vvtq", "wbits": 2, "abits": 2}
    assert data["regularizer"] == {"lambda_max": 0.01, "start_frac": 0.25}
    assert data["teacher"] == {"source": "live", "checkpoint": "runs/mini_deit_fp/last.safetensors"}
    assert data["oscillation"] is None and data["anneal"] is None
    assert TrainConfig.from_dict(data).to_dict() == data
    assert TrainConfig().to_dict()["teacher"] == {"source": "none"}


def test_quant_settings_cover_every_quant_config_field():
    from dataclasses import fields

    from vvtq.quant import QuantConfig
    from vvtq.train.config import QuantSettings

    assert set(QuantSettings.keys()) == {"preset", "overrides_file", *(f.name for f in fields(QuantConfig))}
    q = QuantSettings.from_mapping("quant", {"preset": "lsq", "wbits": "3", "act_init": "lsq"})
    assert q.quant_config() == QuantConfig.preset("lsq", 3, act_init="lsq")


def test_setting_a_lever_by_attribute_goes_through_its_settings():
    cfg = TrainConfig.from_yaml("mini_deit_fp_cls", TINY)
    cfg.regularizer = {"lambda_max": 0.5}
    assert cfg.regularizer.lambda_max == 0.5 and cfg.to_dict()["regularizer"] == {"lambda_max": 0.5}
    cfg.regularizer = None
    assert cfg.regularizer is None and "regularizer" not in cfg.levers
    with pytest.raises(ConfigError, match="regularizer"):
        cfg.regularizer = {"lamda_max": 1}


def test_a_lever_cannot_take_a_reserved_or_setting_name():
    for name in ("step", "history", "teacher", "not an identifier"):
        with pytest.raises(ValueError, match="identifier"):
            register_lever(name, ToySettings)


def test_amp_values_and_error_messages_name_the_setting_once():
    assert TrainConfig.from_yaml("mini_deit_fp_cls", ["amp=fp32"]).amp == "fp32"
    with pytest.raises(ConfigError, match="amp must be auto, bf16 or fp32"):
        TrainConfig.from_yaml("mini_deit_fp_cls", ["amp=half"])
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml("mini_deit_fp_cls", ["quant={preset: fancy}"])
    assert str(err.value).count("quant:") == 1
    with pytest.raises(ConfigError, match="^teacher.source must be none, live or file"):
        TrainConfig.from_yaml("mini_deit_fp_cls", ["teacher={source: oracle}"])


def test_settings_objects_given_directly_are_checked_too():
    from vvtq.qat import TeacherSettings

    with pytest.raises(ConfigError, match="teacher.source must be none, live or file"):
        TrainConfig(teacher=TeacherSettings(source="oracle"))
    with pytest.raises(ConfigError, match="^regularizer bins must be one of"):
        TrainConfig(levers={"regularizer": {"bins": "layer"}})
