"""Run and evaluate ONNX files with onnxruntime (``vvtq eval --onnx``), and the metadata vvtq writes into them.

An exported file carries string properties ``vvtq.*`` (``onnx_metadata``): the image size and normalisation the
model was trained with and its dataset (name, root, validation split, held-out images), so that
``vvtq eval --onnx FILE`` scores it as ``vvtq eval --checkpoint`` scores the checkpoint. A file without them (an FP
model's own ``torch.onnx.export``) needs ``--data`` and a fixed input size. What cannot give a meaningful score is
refused with one line: a file onnxruntime cannot load, an input that is not ``[N, C, S, S]`` images, an image size
other than the one recorded, or a channel count other than the dataset's.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..spec import data_source
from .format import ExportFormatError

#: the packages of vvtq's ``onnx`` extra (pyproject.toml), and how to install them
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
ONNX_EXTRA_HINT = "pip install 'vvtq[onnx]'"


class OnnxFileError(ExportFormatError):
    """An ONNX file that cannot be run, or cannot be run on the requested images."""


def missing_onnx_packages() -> list[str]:
    """The packages of the ``onnx`` extra that cannot be imported here (none: ONNX export and onnxruntime work)."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def require_onnx(what: str) -> None:
    """Raise ``ConfigError`` (one line naming the extra) unless the ``onnx`` extra is installed; ``what`` needs it."""
    missing = missing_onnx_packages()
    if missing:
        raise ConfigError(f"{what} needs {', '.join(missing)}, not installed here: {ONNX_EXTRA_HINT}")


def onnx_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """The ``vvtq.*`` properties of an export, from a checkpoint's metadata."""
    src = data_source(meta)
    info = {"img_size": meta.get("img_size"), "mean": meta.get("mean"), "std": meta.get("std"),
            "data": src.data, "data_root": src.root, "split": src.val_split, "holdout": src.holdout}
    return {f"vvtq.{k}": json.dumps(v) for k, v in info.items() if v is not None}


def onnx_session(path: str | Path, threads: int = 2, spinning: bool = True, profile: bool = False,
                 optimized: str | Path | None = None):
    """An onnxruntime CPU session (``threads`` intra-op threads, one inter-op, sequential), or ``OnnxFileError``.
    ``spinning=False`` stops idle worker threads from spinning (sessions timed side by side would steal each other's
    cores); ``optimized``: also write the graph onnxruntime runs after its optimisations to this file."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = profile
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for every failure to load
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise OnnxFileError(f"{path}: not an ONNX model onnxruntime can load ({first})") from None


def latency_ms(paths: dict[str, str | Path], x: Tensor, reps: int = 20, warmup: int = 3,
               threads: int = 2) -> dict[str, float]:
    """Median latency (ms) of each ONNX file on the batch ``x``, measured side by side: one process, runs of the
    files interleaved after ``warmup`` rounds, ``threads`` intra-op threads each, no spinning."""
    import time

    import numpy as np

    sessions = {k: onnx_session(p, threads, spinning=False) for k, p in paths.items()}
    feeds = {k: {s.get_inputs()[0].name: x.float().numpy()} for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(warmup + reps):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds[k])
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v) * 1e3) for k, v in times.items()}


def run_session(sess, x: Tensor) -> Tensor:
    """Logits of a session for a batch of normalised images, copied out of onnxruntime's memory (its arrays view
    the session's arena, which a kept view would keep alive)."""
    out = sess.run(None, {sess.get_inputs()[0].name: x.float().numpy()})[0]
    return torch.tensor(out)


def _recorded(sess) -> dict[str, Any]:
    props = sess.get_modelmeta().custom_metadata_map
    out = {}
    for key, value in props.items():
        if key.startswith("vvtq."):
            try:
                out[key[5:]] = json.loads(value)
            except ValueError:
                out[key[5:]] = value
    return out


def _input_geometry(sess, path: Path, recorded: dict[str, Any]) -> tuple[int | None, int]:
    """(channels or None if dynamic, image size) of the model's image input."""
    shape = sess.get_inputs()[0].shape
    if len(shape) != 4:
        raise OnnxFileError(f"{path}: the model's input has shape {shape}; vvtq evaluates image models "
                            "[N, C, S, S]")
    chans, h, w = (d if isinstance(d, int) else None for d in shape[1:])
    size = recorded.get("img_size")
    if h is not None and w is not None:
        if h != w:
            raise OnnxFileError(f"{path}: the model takes {h}x{w} images; vvtq evaluates square images")
        if size is not None and int(size) != h:
            raise OnnxFileError(f"{path}: the model takes {h}x{w} images but records {size} px as its input size")
        size = h
    if size is None:
        raise OnnxFileError(f"{path}: the model's input size is dynamic and the file records none")
    return chans, int(size)


def evaluate_onnx(path: str | Path, data: str | None = None, data_root: str | None = None,
                  split: str | None = None, limit: int | None = None, batch_size: int = 500,
                  threads: int = 2) -> dict[str, Any]:
    """Top-1 accuracy (%) of an ONNX file run by onnxruntime on a dataset (``vvtq eval --onnx``): the file's
    recorded dataset, split and normalisation unless given."""
    from torch.utils.data import DataLoader

    from ..data import EvalDataset, SubsetImageDataset
    from ..data.splits import eval_split

    path = Path(path)
    sess = onnx_session(path, threads)
    rec = _recorded(sess)
    chans, size = _input_geometry(sess, path, rec)
    given = {"data": data, "split": split, "data_root": data_root}
    pick = {k: v if v is not None else rec.get(k) for k, v in given.items()}  # the flags win over the file
    if not pick["data"]:
        raise OnnxFileError(f"{path}: the file records no dataset; pass --data")
    data = pick["data"]
    base = eval_split(data, pick["split"] or "test", pick["data_root"], int(rec.get("holdout") or 0))
    ds = EvalDataset(SubsetImageDataset(base, range(min(limit, len(base)))) if limit else base, size,
                     rec.get("mean"), rec.get("std"))
    have = ds[0][0].shape[0]
    if chans is not None and chans != have:
        raise OnnxFileError(f"{path}: the model takes {chans}-channel {size}x{size} images; {data} gives "
                            f"{have}-channel images")
    correct = total = 0
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False):
        try:
            logits = run_session(sess, x)
        except Exception as exc:  # a shape the graph rejects deep inside: one line, not onnxruntime's dump
            first = str(exc).strip().splitlines()[0][:200]
            raise OnnxFileError(f"{path}: onnxruntime cannot run the model on {size}x{size} {data} images "
                                f"({first})") from None
        correct += int((logits.argmax(1) == y).sum())
        total += y.numel()
    return {"acc": 100.0 * correct / max(total, 1), "images": total, "img_size": size, "data": data,
            "mode": rec.get("onnx_mode")}
