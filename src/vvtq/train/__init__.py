"""Training: the loop (FP and QAT, single process or torchrun) and its recipes.

Model building and loading (``vvtq.modelio``), evaluation (``vvtq.evaluation``), the device and process group
(``vvtq.device``) and checkpoints (``vvtq.checkpoint``) sit below training; their names stay importable from here.
"""
from ..checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from ..device import resolve_device
from ..evaluation import eval_loader, evaluate
from ..modelio import build_model, load_model
from .config import ConfigError, TrainConfig
from .loop import TrainingError, train

__all__ = [
    "CheckpointError", "ConfigError", "TrainConfig", "TrainingError", "build_model", "eval_loader", "evaluate",
    "load_checkpoint", "load_model", "read_meta", "resolve_device", "save_checkpoint", "train",
]
