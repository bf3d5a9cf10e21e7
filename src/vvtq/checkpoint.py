"""Checkpoints: one safetensors file holding the model, the optimizer state and extra tensors, plus JSON metadata.

Everything that crosses a trust boundary is safe to load: tensors come from safetensors, the rest from JSON in
the file's metadata, so no pickle is ever read. Writes are atomic (``fileio.atomic_write``): the file is written
next to its destination and renamed over it, so a kill at any moment leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from .errors import VVTQError
from .fileio import atomic_write, safetensors_header, tensor_bytes

FORMAT = "vvtq-checkpoint"
VERSION = 1


class CheckpointError(VVTQError, ValueError):
    """A checkpoint is missing, corrupt, of another format, or does not fit the model."""


# the other safetensors files vvtq writes (their ``format`` metadata): what they are, and what reads them
_OTHER_FILES = {
    "vvtq-packed": ("a packed integer export (written by `vvtq export`)",
                    "run it with `vvtq eval --packed {path}`, or export the training checkpoint it came from"),
    "vvtq-softlabels": ("a soft-label file (written by `vvtq softlabels`)",
                        "a recipe reads it with teacher.source=file, teacher.softlabels={path}"),
}


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_file(tensors: dict[str, Tensor], filename: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file, its metadata's keys in sorted order: the same tensors and metadata
    give the same bytes in every process (``fileio.safetensors_header``)."""
    header, spans = safetensors_header([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], metadata)
    with open(filename, "wb") as f:
        f.write(header)
        for name in spans:  # in the header's layout order
            f.write(tensor_bytes(tensors[name]))


def atomic_save_file(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """``save_file`` to a temporary file in the same folder, fsynced, then renamed over ``path``
    (``fileio.atomic_write``)."""
    with atomic_write(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def save_checkpoint(path: str | Path, model_state: dict[str, Tensor], meta: dict[str, Any],
                    optimizer_state: dict[str, Any] | None = None,
                    extra: dict[str, Tensor] | None = None) -> None:
    """Write a checkpoint atomically. ``meta`` must be JSON-serialisable (configs, epoch, step, metrics);
    ``extra`` holds further named tensors (e.g. the oscillation tracker's state)."""
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    info = {"format": FORMAT, "version": VERSION, **meta}
    if optimizer_state is not None:
        opt_tensors, info["optimizer"] = _flatten_optimizer(optimizer_state)
        tensors.update(opt_tensors)
    for key, value in (extra or {}).items():
        tensors[f"extra.{key}"] = value
    atomic_save_file(tensors, path, {"vvtq": json.dumps(info)})


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, checked for format and version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc})") from None
    raw = md.get("vvtq")
    if raw is None:
        other = _OTHER_FILES.get(md.get("format", ""))
        if other is not None:
            raise CheckpointError(f"{path} is {other[0]}, not a checkpoint; {other[1].format(path=path)}")
        raise CheckpointError(f"{path} is a safetensors file but not a vvtq checkpoint (no 'vvtq' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} is not supported "
                              f"(this vvtq reads version {VERSION})")
    return meta


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint: ``{"meta", "model", "optimizer" (or None), "extra"}``, all tensors from safetensors."""
    meta = read_meta(path)
    model, optim, extra = {}, {}, {}
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                group, _, name = key.partition(".")
                target = {"model": model, "optim": optim, "extra": extra}.get(group)
                if target is None:
                    raise CheckpointError(f"{path}: unexpected tensor {key!r}")
                target[key if group == "optim" else name] = f.get_tensor(key)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({exc})") from None
    optimizer = _unflatten_optimizer(optim, meta["optimizer"]) if "optimizer" in meta else None
    return {"meta": meta, "model": model, "optimizer": optimizer, "extra": extra}
