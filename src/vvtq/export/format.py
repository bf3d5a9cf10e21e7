"""The packed export format: one safetensors file with bit-packed integer weights and a JSON header.

File ``*.vvtq.safetensors`` (safetensors, so offsets and lengths are validated and nothing is unpickled). The
file stores a few blobs; the header says how they split into the logical tensors below, in sorted name order.

- logical tensors
    ``<layer>.weight.codes``   uint8, the weight codes ``clamp(round(W / s_w), Qn, Qp)`` bit-packed
                               (``vvtq.export.packing``: dense little-endian, 2..8 bits per code);
    ``<quantizer>.scale``      float32 ``(G,)``, the step sizes (clamped positive, as the training quantizer uses);
    ``<quantizer>.offset``     float32 ``(G,)``, the learned offset beta (GELU output) where there is one;
    ``<name>``                 every other tensor of the quantized model under its ``state_dict`` name, float32
                               (LayerNorm, position embedding, class token, biases, Swin's relative position
                               tables, weights whose quantizer is off); float16 with ``fp_dtype`` (lossy).
- blobs (the safetensors tensors)
    ``codes``  uint8: each codes tensor in turn, stored raw or as its own zlib (DEFLATE) stream, whichever is
               smaller; low-bit codes are far from uniform, so this saves about 9% losslessly at 2 bits;
    ``f32``    float32: every float32 logical tensor in turn, flattened;
    ``f16``    float16: the FP remainder in turn, with ``fp_dtype`` float16.
- metadata: ``format`` ("vvtq-packed"), ``version`` ("2"), ``vvtq_export_z`` (the JSON header, zlib-compressed,
    base64) and ``vvtq_export_sha256`` (sha256 of the JSON text). The JSON holds
    ``format``, ``version`` (2),
    ``arch``       {model, model_kwargs, img_size, mean, std, classes},
    ``data``       {name, root, split, holdout} of the evaluation set, ``source`` {step, epoch, best_acc},
    ``quant``      the ``QuantConfig`` dict,
    ``quantizers`` {name: {bits, signed, granularity, axis, num_groups, kind, offset}} (enabled ones only),
    ``layers``     {path: {type linear|conv2d, kind, weight_quant, input_quant (bools), bias, weight_shape,
                   conv stride/padding/dilation/groups}},
    ``packed``     {tensor: {bits, signed, shape, numel, layout, granularity, axis, num_groups, kind, codec
                   ("raw" or "zlib"), stored_bytes}},
    ``fp``         {name: shape} of the FP tensors, ``fp_dtype``,
    ``payload_sha256``: sha256 over every logical tensor's name and bytes, in sorted name order.

Reading (``read_packed``) checks, before anything is unpacked: the header hash, format and version; that the
file holds exactly the blobs the header implies, with the expected dtype and length; that every zlib stream
decodes to exactly ``ceil(numel * bits / 8)`` bytes, never more (a stream may not claim more than DEFLATE's
1032:1 ratio, so memory stays bounded by the file's size); the payload sha256; positive finite scales. Any
failure raises ``ExportFormatError`` (a ``ValueError``) with one clear line.

Version 1 (the first cut of issue #6: one safetensors entry per tensor, plain JSON) is refused with a request to
re-export; the 384 index entries and the plain JSON of DeiT-T cost 73 kB, 4% of its packed size.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..errors import VVTQError
from ..spec import data_source
from .packing import pack, packed_nbytes, unpack

FORMAT_NAME = "vvtq-packed"
FORMAT_VERSION = 2
META_KEY = "vvtq_export_z"
HASH_KEY = "vvtq_export_sha256"
_V1_META_KEY = "vvtq_export"
_MAX_CODE_NUMEL = 1 << 34  # sanity bound on a single declared tensor (validated against the bytes anyway)
_MAX_HEADER_BYTES = 64 << 20  # the decompressed JSON header
_MAX_DEFLATE_RATIO = 1032  # DEFLATE cannot expand a stream by more than this
_ZLIB_LEVEL = 9


class ExportFormatError(VVTQError, ValueError):
    """A packed export is missing, corrupt, truncated, tampered with, or of another format/version."""


def _bytes(t: Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def payload_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 over ``name, NUL, raw bytes`` of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + b"\0")
        h.update(_bytes(tensors[name]))
    return h.hexdigest()


# --------------------------------------------------------------------------- writing
def _quantizer_info(q: nn.Module) -> dict[str, Any]:
    return {"bits": int(q.bits), "signed": bool(q.signed), "granularity": q.granularity, "axis": int(q.axis),
            "num_groups": int(q.num_groups), "kind": q.kind, "offset": q.offset is not None}


def build_export(model: nn.Module, meta: dict[str, Any], fp_dtype: torch.dtype = torch.float32,
                 ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the header of the packed export of a quantized, calibrated ``model``.

    ``meta`` is the checkpoint metadata (``model``, ``model_kwargs``, ``img_size``, ``mean``, ``std``,
    ``classes``, ``quant``, ``dataset``; the data it records is ``spec.data_source(meta)``). ``fp_dtype`` float16
    halves the FP remainder (lossy: the runtime then no longer matches the float32 model exactly); scales and
    offsets stay float32 always.
    """
    from ..quant import QuantConv2d, Quantizer, QuantLinear

    if getattr(model, "vvtq_config", None) is None and meta.get("quant") is None:
        raise ExportFormatError("only quantized models can be exported (the checkpoint has no QuantConfig)")
    if fp_dtype not in (torch.float32, torch.float16):
        raise ExportFormatError(f"fp_dtype must be float32 or float16, not {fp_dtype}")
    tensors: dict[str, Tensor] = {}
    quantizers: dict[str, dict[str, Any]] = {}
    layers: dict[str, dict[str, Any]] = {}
    packed_info: dict[str, dict[str, Any]] = {}
    skip: set[str] = set()
    modules = dict(model.named_modules())
    for path, m in modules.items():
        if isinstance(m, Quantizer):
            skip.update(f"{path}.{k}" for k in ("scale", "offset", "qbits", "initialized"))
            if not m.enabled:
                continue
            if not bool(m.initialized):
                raise ExportFormatError(f"quantizer '{path}' is not calibrated; nothing meaningful to export")
            quantizers[path] = _quantizer_info(m)
            tensors[f"{path}.scale"] = m.scale.detach().float().clamp_min(1e-8)
            if m.offset is not None:
                tensors[f"{path}.offset"] = m.offset.detach().float()
    for path, m in modules.items():
        if not isinstance(m, (QuantLinear, QuantConv2d)):
            continue
        wq, iq = m.weight_quant, m.input_quant
        info: dict[str, Any] = {"type": "linear" if isinstance(m, QuantLinear) else "conv2d", "kind": wq.kind,
                                "weight_quant": wq.enabled, "input_quant": iq is not None and iq.enabled,
                                "bias": m.bias is not None, "weight_shape": list(m.weight.shape)}
        if isinstance(m, QuantConv2d):
            info.update(stride=list(m.stride), padding=list(m.padding), dilation=list(m.dilation),
                        groups=int(m.groups))
        layers[path] = info
        if not wq.enabled:
            continue
        packed, pmeta = pack(wq.codes(m.weight.detach()), wq.bits, wq.signed)
        skip.add(f"{path}.weight")
        tensors[f"{path}.weight.codes"] = packed
        packed_info[f"{path}.weight.codes"] = {
            "bits": wq.bits, "signed": bool(wq.signed), "shape": pmeta["shape"], "numel": pmeta["numel"],
            "layout": pmeta["layout"], "granularity": wq.granularity, "axis": int(wq.axis),
            "num_groups": int(wq.num_groups), "kind": wq.kind}
    fp: dict[str, list[int]] = {}
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        if not torch.is_floating_point(t):
            raise ExportFormatError(f"unexpected non-float tensor {name!r} in the model state")
        tensors[name] = t.detach().to(fp_dtype)
        fp[name] = list(t.shape)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "arch": {k: meta.get(k) for k in ("model", "model_kwargs", "img_size", "mean", "std", "classes")},
        "data": _data_info(meta), "source": {k: meta[k] for k in ("step", "epoch", "best_acc") if k in meta},
        "quant": meta.get("quant"), "quantizers": quantizers, "layers": layers, "packed": packed_info,
        "fp": fp, "fp_dtype": "float16" if fp_dtype == torch.float16 else "float32",
        "payload_sha256": payload_sha256(tensors),
    }
    return tensors, header


def _data_info(meta: dict[str, Any]) -> dict[str, Any]:
    src = data_source(meta)
    return {"name": src.data, "root": src.root, "split": src.val_split, "holdout": src.holdout}


def _blob_names(header: dict[str, Any]) -> dict[str, list[str]]:
    """The logical tensors each blob holds, in storage (sorted name) order."""
    fp16 = header.get("fp_dtype") == "float16"
    floats = [f"{q}.{leaf}" for q, e in header["quantizers"].items() for leaf in ("scale", "offset")
              if leaf == "scale" or e.get("offset")]
    f32 = sorted(floats + ([] if fp16 else list(header["fp"])))
    return {"codes": sorted(header["packed"]), "f32": f32, "f16": sorted(header["fp"]) if fp16 else []}


def encode_blobs(tensors: dict[str, Tensor], header: dict[str, Any]) -> dict[str, Tensor]:
    """The blobs of an export; records each codes tensor's ``codec`` and ``stored_bytes`` in ``header``."""
    names = _blob_names(header)
    chunks: list[bytes] = []
    for name in names["codes"]:
        raw = _bytes(tensors[name])
        packed = zlib.compress(raw, _ZLIB_LEVEL)
        codec, data = ("zlib", packed) if len(packed) < len(raw) else ("raw", raw)
        header["packed"][name].update(codec=codec, stored_bytes=len(data))
        chunks.append(data)
    blobs: dict[str, Tensor] = {}
    if chunks:
        blobs["codes"] = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    for blob, dtype in (("f32", torch.float32), ("f16", torch.float16)):
        if names[blob]:
            blobs[blob] = torch.cat([tensors[n].reshape(-1).to(dtype) for n in names[blob]])
    return blobs


def header_metadata(header: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata that carries ``header``: compressed JSON, its sha256, format and version."""
    text = json.dumps(header, sort_keys=True, separators=(",", ":"))
    return {"format": FORMAT_NAME, "version": str(FORMAT_VERSION),
            META_KEY: base64.b64encode(zlib.compress(text.encode(), _ZLIB_LEVEL)).decode("ascii"),
            HASH_KEY: hashlib.sha256(text.encode()).hexdigest()}


def write_packed(model: nn.Module, meta: dict[str, Any], path: str | Path,
                 fp_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Write the packed export of ``model`` to ``path`` atomically; return its header."""
    from ..checkpoint import atomic_save_file

    tensors, header = build_export(model, meta, fp_dtype)
    blobs = encode_blobs(tensors, header)
    atomic_save_file(blobs, path, header_metadata(header))
    return header


# --------------------------------------------------------------------------- reading
@dataclass
class PackedFile:
    """A validated packed export: the header and its tensors (codes still packed)."""

    header: dict[str, Any]
    tensors: dict[str, Tensor]
    path: str = ""

    def codes(self, layer: str) -> Tensor:
        """The unpacked int32 weight codes of ``layer``."""
        name = f"{layer}.weight.codes"
        e = self.header["packed"][name]
        return unpack(self.tensors[name], e["bits"], e["signed"], e["shape"])


def _fail(path: str, msg: str) -> ExportFormatError:
    return ExportFormatError(f"{path}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_shape(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v)


def _expected_tensors(path: str, header: dict[str, Any]) -> dict[str, tuple[str, list[int] | None]]:
    """Tensor name -> (safetensors dtype, shape or None when checked elsewhere), from the header alone."""
    want: dict[str, tuple[str, list[int] | None]] = {}
    fp_dt = {"float32": "F32", "float16": "F16"}.get(header.get("fp_dtype"))
    if fp_dt is None or not isinstance(header.get("fp"), dict):
        raise _fail(path, "header field 'fp' or 'fp_dtype' is missing or malformed")
    for qname, q in header["quantizers"].items():
        if not isinstance(q, dict) or not _is_int(q.get("bits")) or not 1 <= q["bits"] <= 8 \
                or not isinstance(q.get("signed"), bool) or not _is_int(q.get("num_groups")) \
                or q["num_groups"] < 1 or not _is_int(q.get("axis")):
            raise _fail(path, f"header entry of quantizer {qname!r} is malformed")
        want[f"{qname}.scale"] = ("F32", [q["num_groups"]])
        if q.get("offset"):
            want[f"{qname}.offset"] = ("F32", [q["num_groups"]])
    for lname, layer in header["layers"].items():
        if not isinstance(layer, dict) or not _is_shape(layer.get("weight_shape")):
            raise _fail(path, f"header entry of layer {lname!r} is malformed")
        for side in ("weight_quant", "input_quant"):
            if layer.get(side) and f"{lname}.{side}" not in header["quantizers"]:
                raise _fail(path, f"layer {lname!r}: its {side} is not among the header's quantizers")
    for name, e in header["packed"].items():
        if not isinstance(e, dict):
            raise _fail(path, f"header entry of packed tensor {name!r} is malformed")
        bits, signed, shape = e.get("bits"), e.get("signed"), e.get("shape")
        if not _is_int(bits) or not 1 <= bits <= 8 or not isinstance(signed, bool) or not _is_shape(shape):
            raise _fail(path, f"packed tensor {name!r}: invalid bit-width/signedness/shape")
        numel = math.prod(shape)
        if numel > _MAX_CODE_NUMEL or e.get("numel") != numel:
            raise _fail(path, f"packed tensor {name!r}: declared element count does not match its shape {shape}")
        layer = header["layers"].get(name[: -len(".weight.codes")]) if name.endswith(".weight.codes") else None
        q = header["quantizers"].get(name[: -len(".codes")] + "_quant")
        if layer is None or not layer.get("weight_quant") or layer["weight_shape"] != shape or q is None \
                or (q["bits"], q["signed"]) != (bits, signed):
            raise _fail(path, f"packed tensor {name!r} disagrees with its layer or quantizer entry")
        stored = e.get("stored_bytes")
        if e.get("codec") not in ("raw", "zlib") or not _is_int(stored) or stored < 0:
            raise _fail(path, f"packed tensor {name!r}: invalid codec or stored size")
        want[name] = ("U8", [packed_nbytes(numel, bits)])
    for name, shape in header["fp"].items():
        if name in want or not _is_shape(shape) or math.prod(shape) > _MAX_CODE_NUMEL:
            raise _fail(path, f"FP tensor entry {name!r} is malformed or duplicated")
        want[name] = (fp_dt, shape)
    return want


def _read_header(path: str, md: dict[str, str]) -> dict[str, Any]:
    """The JSON header from the safetensors metadata: decompressed (bounded), hash-checked, format-checked."""
    if META_KEY not in md:
        if _V1_META_KEY in md:
            raise _fail(path, f"format version 1 is not supported (this vvtq reads version {FORMAT_VERSION}); "
                        f"export the checkpoint again")
        raise _fail(path, "not a vvtq packed export (no 'vvtq_export_z' metadata)")
    try:
        z = base64.b64decode(md[META_KEY], validate=True)
        if base64.b64encode(z).decode("ascii") != md[META_KEY]:  # a changed pad or spare bit decodes the same
            raise ValueError("non-canonical base64")
        d = zlib.decompressobj()
        raw = d.decompress(z, _MAX_HEADER_BYTES)
        if d.unconsumed_tail or d.unused_data or not d.eof:
            raise ValueError("oversized, unterminated or trailing data in the stream")
        text = raw.decode()
    except (ValueError, zlib.error, UnicodeDecodeError) as exc:
        raise _fail(path, f"corrupt header ({exc})") from None
    if md.get(HASH_KEY) != hashlib.sha256(text.encode()).hexdigest():
        raise _fail(path, "header checksum mismatch (the file is corrupt or was modified)")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"corrupt header JSON ({exc})") from None
    fmt = header.get("format") if isinstance(header, dict) else None
    if fmt != FORMAT_NAME:
        raise _fail(path, f"format {fmt!r} is not {FORMAT_NAME!r}")
    if header.get("version") != FORMAT_VERSION:
        raise _fail(path, f"format version {header.get('version')!r} is not supported (this vvtq reads "
                    f"version {FORMAT_VERSION})")
    if md.get("format") != FORMAT_NAME or md.get("version") != str(FORMAT_VERSION):
        # the plain copies (for tools that read safetensors metadata) must say what the hashed header says
        raise _fail(path, "the file's format/version metadata was modified (it disagrees with the header)")
    for field in ("arch", "quantizers", "layers", "packed"):
        if not isinstance(header.get(field), dict):
            raise _fail(path, f"header field {field!r} is missing or malformed")
    return header


def _inflate(path: str, name: str, data: bytes, size: int) -> bytes:
    """Decode one zlib stream that must give exactly ``size`` bytes; never allocates more than ``size``."""
    if size > _MAX_DEFLATE_RATIO * len(data) + 64:
        raise _fail(path, f"packed tensor {name!r}: {len(data)} stored bytes cannot decode to the {size} bytes "
                    f"its shape needs")
    if size == 0:  # zlib reads a max_length of 0 as "no limit"
        raise _fail(path, f"packed tensor {name!r}: an empty tensor is stored raw, not compressed")
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, size)
    except zlib.error as exc:
        raise _fail(path, f"packed tensor {name!r}: corrupt compressed codes ({exc})") from None
    if len(out) != size or not d.eof or d.unconsumed_tail or d.unused_data:
        raise _fail(path, f"packed tensor {name!r}: its stored codes do not decode to the {size} bytes its shape "
                    f"needs")
    return out


def _split_blobs(path: str, header: dict[str, Any], want: dict[str, tuple[str, list[int]]],
                 blobs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The logical tensors, cut out of the blobs (whose lengths were checked against the header already)."""
    names = _blob_names(header)
    tensors: dict[str, Tensor] = {}
    if names["codes"]:
        raw, pos = blobs["codes"].numpy().tobytes(), 0
        for name in names["codes"]:
            e = header["packed"][name]
            data, pos = raw[pos:pos + e["stored_bytes"]], pos + e["stored_bytes"]
            size = want[name][1][0]
            if e["codec"] == "zlib":
                data = _inflate(path, name, data, size)
            elif len(data) != size:
                raise _fail(path, f"packed tensor {name!r} is stored in {len(data)} bytes, its shape needs {size}")
            tensors[name] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
                torch.zeros(0, dtype=torch.uint8)
    for blob in ("f32", "f16"):
        pos = 0
        for name in names[blob]:
            shape = want[name][1]
            n = math.prod(shape)
            tensors[name] = blobs[blob][pos:pos + n].reshape(shape).clone()
            pos += n
    return tensors


def read_packed(path: str | Path, verify: bool = True) -> PackedFile:
    """Open and validate a packed export; raise ``ExportFormatError`` on anything wrong with it."""
    path = str(path)
    if not Path(path).is_file():
        raise ExportFormatError(f"packed file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            header = _read_header(path, f.metadata() or {})
            want = _expected_tensors(path, header)
            names = _blob_names(header)
            sizes = {"codes": sum(header["packed"][n]["stored_bytes"] for n in names["codes"]),
                     "f32": sum(math.prod(want[n][1]) for n in names["f32"]),
                     "f16": sum(math.prod(want[n][1]) for n in names["f16"])}
            expect = {b: ({"codes": "U8", "f32": "F32", "f16": "F16"}[b], [n]) for b, n in sizes.items() if names[b]}
            keys = sorted(f.keys())
            if sorted(expect) != keys:
                raise _fail(path, f"blobs {keys} do not match the header (expected {sorted(expect)})")
            for name in keys:  # declared dtype and size, before any data is read
                sl = f.get_slice(name)
                dt, shape = expect[name]
                if sl.get_dtype() != dt or list(sl.get_shape()) != shape:
                    raise _fail(path, f"blob {name!r} is stored as {sl.get_dtype()} {sl.get_shape()}, the header "
                                f"implies {dt} {shape}")
            blobs = {name: f.get_tensor(name) for name in keys}
    except ExportFormatError:
        raise
    except Exception as exc:  # safetensors raises several types for corrupt or truncated files
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise _fail(path, f"not a readable safetensors file: corrupt or truncated ({type(exc).__name__}: "
                    f"{first})") from None
    tensors = _split_blobs(path, header, want, blobs)
    if verify and payload_sha256(tensors) != header.get("payload_sha256"):
        raise _fail(path, "payload checksum mismatch (the tensor data is corrupt or was modified)")
    for qname in header["quantizers"]:
        s = tensors[f"{qname}.scale"]
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise _fail(path, f"quantizer {qname!r}: non-positive or non-finite scale")
    return PackedFile(header, tensors, path)


# --------------------------------------------------------------------------- sizes
def _fp_group(name: str, layers: dict[str, Any]) -> str:
    owner, _, leaf = name.rpartition(".")
    if owner in layers:
        return "fp: biases" if leaf == "bias" else f"fp: {layers[owner]['kind']} weight (quantizer off)"
    if "relative_position" in name:
        return "fp: relative position tables"
    if "norm" in name:
        return "fp: LayerNorm"
    if any(k in name for k in ("pos_embed", "cls_token", "dist_token", "reg_token")):
        return "fp: pos/cls tokens"
    return "fp: other"


def size_table(header: dict[str, Any], tensors: dict[str, Tensor], file_bytes: int | None = None,
               ) -> list[dict[str, Any]]:
    """Rows ``{group, fp32_bytes, packed_bytes, ratio}`` per module kind, plus ``header`` and ``total`` rows.

    fp32_bytes: what the tensors occupy in a float32 model (weights 4 * numel; scales and offsets 0);
    packed_bytes: what they occupy in the export (codes with their weight scales; FP tensors as stored).
    The header row is ``file_bytes`` minus the tensor bytes when given, else an estimate.
    """
    rows: dict[str, list[int]] = {}
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if name in header["packed"]:
            nbytes = header["packed"][name].get("stored_bytes", nbytes)
            group, fp = header["packed"][name]["kind"], 4 * header["packed"][name]["numel"]
        elif name.rpartition(".")[0] in header["quantizers"]:
            owner = name.rpartition(".")[0]
            group = header["quantizers"][owner]["kind"] if owner.endswith(".weight_quant") else \
                "activation quantizers"
            fp = 0
        else:
            group, fp = _fp_group(name, header["layers"]), 4 * t.numel()
        r = rows.setdefault(group, [0, 0])
        r[0] += fp
        r[1] += nbytes
    data = sum(r[1] for r in rows.values())
    if file_bytes is None:
        file_bytes = data + sum(len(v) for v in header_metadata(header).values()) + 300
    rows["header (zlib JSON + index)"] = [0, file_bytes - data]
    out = [{"group": g, "fp32_bytes": a, "packed_bytes": b, "ratio": (a / b) if b else float("inf")}
           for g, (a, b) in sorted(rows.items(), key=lambda kv: (-kv[1][0], kv[0]))]
    tot_fp, tot_p = sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())
    out.append({"group": "total", "fp32_bytes": tot_fp, "packed_bytes": tot_p, "ratio": tot_fp / max(tot_p, 1)})
    return out


def format_size_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of ``size_table`` rows."""
    lines = [f"{'module kind':<36}{'FP32 bytes':>14}{'packed bytes':>14}{'ratio':>9}"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if math.isfinite(r["ratio"]) and r["fp32_bytes"] else "-"
        lines.append(f"{r['group']:<36}{r['fp32_bytes']:>14,}{r['packed_bytes']:>14,}{ratio:>9}")
    return "\n".join(lines)
