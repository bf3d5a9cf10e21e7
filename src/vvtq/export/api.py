"""``vvtq.export(model, path)``: a quantized, calibrated model to its packed file (and optionally QDQ ONNX).

The file records the model's ``ModelSpec``: the one ``vvtq.build_model`` / ``vvtq.load_model`` put on the model,
with the quantization config ``vvtq.quantize_model`` recorded (``model.vvtq_config``), or the spec timm's config
implies for a model made with ``timm.create_model``. The spec is checked against the model before anything is
written (a probe built on the meta device must have exactly the model's tensors).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..device import unwrap
from ..modelio import check_spec
from ..spec import ModelSpec
from .format import ExportFormatError, write_packed


def export_model(model: nn.Module, path: str | Path, onnx: str | Path | None = None, spec: ModelSpec | None = None,
                 fp16: bool = False, **fields: Any) -> dict[str, Any]:
    """Write the packed export of ``model`` to ``path`` (and QDQ ONNX to ``onnx``); return what was written.

    ``spec`` replaces the model's recorded spec (its quantization config still comes from the model); ``fields``
    set single spec fields (``img_size``, ``mean``, ``std``, ``classes``). ``fp16`` stores the FP remainder as
    float16 (smaller, no longer bit-matching the model). Returns ``{"path", "bytes", "spec", "header"}`` and,
    with ``onnx``, ``"onnx"``: the ONNX exporter's info.
    """
    model = unwrap(model)  # a DistributedDataParallel wrapper
    config = getattr(model, "vvtq_config", None)
    if config is None:
        raise ExportFormatError("only quantized models can be exported: call vvtq.quantize_model and "
                                "vvtq.calibrate first")
    spec = (spec or ModelSpec.of(model)).with_quant(config)
    spec = replace(spec, **fields) if fields else spec
    check_spec(model, spec)
    if spec.img_size is None:
        raise ExportFormatError("the model's input size is unknown: pass img_size=...")
    header = write_packed(model, spec.to_dict(), path, fp_dtype=torch.float16 if fp16 else torch.float32)
    info: dict[str, Any] = {"path": Path(path), "bytes": os.path.getsize(path), "spec": spec, "header": header}
    if onnx is not None:
        from .onnx import export_onnx

        info["onnx"] = export_onnx(model, Path(onnx), spec.img_size)
    return info
