"""Moved to ``vvtq.checkpoint`` (checkpoint I/O sits below training); these names stay importable from here."""
from ..checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    atomic_save_file,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)

__all__ = ["FORMAT", "VERSION", "CheckpointError", "atomic_save_file", "load_checkpoint", "read_meta",
           "save_checkpoint"]
