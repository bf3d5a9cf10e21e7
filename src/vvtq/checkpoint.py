"""Checkpoints: one safetensors file holding the model, the optimizer state and extra tensors, plus JSON metadata.

Everything that crosses a trust boundary is safe to load: tensors come from safetensors, the rest from JSON in
the file's metadata, so no pickle is ever read. Writes are atomic: the file is written next to its destination
and renamed over it (``os.replace``), so a kill at any moment leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes
from torch import Tensor

from .errors import VVTQError

FORMAT = "vvtq-checkpoint"
VERSION = 1


class CheckpointError(VVTQError, ValueError):
    """A checkpoint is missing, corrupt, of another format, or does not fit the model."""


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
    """``safetensors.torch.save_file``, with the metadata's keys in sorted order: the same tensors and metadata
    give the same bytes in every process (safetensors writes its metadata map in a per-process random order)."""
    blob = _safetensors_bytes(tensors, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors' bytes start 8-aligned, as safetensors writes them
    with open(filename, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.write(memoryview(blob)[8 + n:])


def atomic_save_file(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """``save_file`` (sorted metadata) to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
            raw = (f.metadata() or {}).get("vvtq")
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc})") from None
    if raw is None:
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
