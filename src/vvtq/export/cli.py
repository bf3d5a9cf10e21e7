"""``vvtq export CKPT --out FILE [--onnx FILE [--onnx-mode fast|qdq]] [--fp16]``: pack a quantized checkpoint, print
the size table, and optionally write an ONNX model (``fast``: integer kernels; ``qdq``: exact QDQ)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .format import ExportFormatError, format_size_table, read_packed, size_table, write_packed


def run_export(args: argparse.Namespace) -> None:
    """Write the packed export (and optionally the ONNX model) of ``args.checkpoint``."""
    from ..modelio import load_model

    if getattr(args, "onnx", None):
        from .onnx_runtime import require_onnx

        require_onnx("--onnx")
    model, meta = load_model(args.checkpoint, "cpu")
    if meta.get("quant") is None:
        raise ExportFormatError(f"{args.checkpoint} is a floating-point checkpoint; export needs a quantized one")
    fp16 = bool(getattr(args, "fp16", False))
    write_packed(model, meta, args.out, fp_dtype=torch.float16 if fp16 else torch.float32)
    pf = read_packed(args.out)
    size = os.path.getsize(args.out)
    rows = size_table(pf.header, pf.tensors, size)
    print(format_size_table(rows))
    fp32 = rows[-1]["fp32_bytes"]
    note = " (FP tensors stored as float16: lossy)" if fp16 else ""
    print(f"wrote {args.out}: {size:,} bytes; FP32 weights {fp32:,} bytes; ratio {fp32 / size:.2f}x{note}")
    if getattr(args, "onnx", None):
        from .onnx import export_onnx
        from .onnx_runtime import onnx_metadata

        mode = getattr(args, "onnx_mode", None) or "fast"
        info = export_onnx(model, Path(args.onnx), int(meta["img_size"]), mode=mode, metadata=onnx_metadata(meta))
        kind = "integer-kernel (fast)" if mode == "fast" else "exact QDQ"
        print(f"wrote {info['path']}: {kind} ONNX, opset {info['opset']}, {info['bytes']:,} bytes")
