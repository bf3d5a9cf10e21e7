"""Training: the loop (FP and QAT, single process or torchrun), recipes and safe atomic checkpoints."""
from .checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from .config import ConfigError, TrainConfig
from .loop import TrainingError, build_model, evaluate, load_model, resolve_device, train

__all__ = [
    "CheckpointError", "ConfigError", "TrainConfig", "TrainingError", "build_model", "evaluate", "load_checkpoint",
    "load_model", "read_meta", "resolve_device", "save_checkpoint", "train",
]
