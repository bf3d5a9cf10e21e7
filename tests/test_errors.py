"""One error type: every exception class vvtq defines derives from ``VVTQError`` and keeps its built-in base."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import vvtq
from vvtq.errors import ConfigError, VVTQError


def _vvtq_exception_classes() -> dict[str, type]:
    """Every exception class defined in a vvtq module (all modules imported, ``__main__`` excepted)."""
    found = {}
    for info in pkgutil.walk_packages(vvtq.__path__, prefix="vvtq."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_vvtq_exception_is_a_vvtq_error():
    classes = _vvtq_exception_classes()
    names = {path.rsplit(".", 1)[1] for path in classes}
    assert {"ConfigError", "QuantizerError", "CheckpointError", "TrainingError", "DatasetError", "SoftLabelError",
            "ExportFormatError"} <= names, names
    assert [path for path, cls in classes.items() if not issubclass(cls, VVTQError)] == []


@pytest.mark.parametrize("path, base", [
    ("vvtq.train.config.ConfigError", ValueError),
    ("vvtq.train.ConfigError", ValueError),
    ("vvtq.quant.QuantizerError", ValueError),
    ("vvtq.checkpoint.CheckpointError", ValueError),
    ("vvtq.train.checkpoint.CheckpointError", ValueError),
    ("vvtq.train.loop.TrainingError", RuntimeError),
    ("vvtq.data.base.DatasetError", ValueError),
    ("vvtq.distill.softlabels.SoftLabelError", ValueError),
    ("vvtq.export.format.ExportFormatError", ValueError),
])
def test_each_keeps_its_builtin_base(path, base):
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, VVTQError) and issubclass(cls, base)
    with pytest.raises(base):  # `except ValueError` call sites keep working
        raise cls("x")


def test_config_error_is_one_class_wherever_it_is_imported_from():
    from vvtq.train import ConfigError as from_train
    from vvtq.train.config import ConfigError as from_config

    assert from_train is from_config is ConfigError


def test_user_input_errors_below_the_cli_are_vvtq_errors():
    """Errors a bad argument or setting reaches, raised by the layers under the command line."""
    from vvtq.data.fashion_mnist import load_fashion_mnist_arrays
    from vvtq.models import mini_deit
    from vvtq.train import resolve_device

    for call in (lambda: resolve_device("cudaa"), lambda: load_fashion_mnist_arrays("/nonexistent", "tst"),
                 lambda: mini_deit(pretrained=True)):
        with pytest.raises(VVTQError):
            call()
