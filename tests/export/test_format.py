"""Tests for vvtq.export.format: round trip, header contents, and refusal of corrupt / lying files."""
from __future__ import annotations

import base64
import json
import os
import random
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import timm
import torch

import vvtq.models  # noqa: F401  (registers mini_deit / mini_swin)
from vvtq.checkpoint import save_checkpoint
from vvtq.cli import main
from vvtq.export import ExportFormatError, read_packed, size_table, unpack, write_packed
from vvtq.export.format import META_KEY, header_metadata
from vvtq.export.runtime import build_runtime
from vvtq.quant import QuantConfig, QuantLinear, calibrate, quantize_model
from vvtq.spec import ModelSpec

torch.set_num_threads(1)


def _model(bits: int = 2, **kw) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    m = timm.create_model("mini_deit", depth=2, **kw)
    quantize_model(m, QuantConfig.preset("vvtq", bits))
    calibrate(m, [torch.randn(8, 1, 28, 28)])
    spec = ModelSpec("mini_deit", {"depth": 2, **kw}, img_size=28, mean=[0.286], std=[0.353],
                     classes=[str(i) for i in range(10)]).with_quant(m.vvtq_config)
    meta = {**spec.to_dict(), "train_config": {"data": "fashion_mnist", "val_split": "test"}}
    return m.eval(), meta


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    m, meta = _model()
    path = tmp_path_factory.mktemp("fmt") / "m.vvtq.safetensors"
    write_packed(m, meta, path)
    return m, meta, path


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _header(raw: bytes) -> dict:
    return json.loads(zlib.decompress(base64.b64decode(_split(raw)[0]["__metadata__"][META_KEY])))


def _rewrite(raw: bytes, edit) -> bytes:
    """Re-encode a packed file after ``edit(export_header_dict, safetensors_index)``, with valid checksums."""
    index, data = _split(raw)
    header = _header(raw)
    edit(header, index)
    index["__metadata__"] = header_metadata(header)
    blob = json.dumps(index).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def test_round_trip_header_and_codes(packed):
    m, meta, path = packed
    pf = read_packed(path)
    h = pf.header
    assert (h["format"], h["version"]) == ("vvtq-packed", 2)
    assert h["arch"]["model"] == "mini_deit" and h["arch"]["model_kwargs"] == {"depth": 2}
    assert h["quant"] == meta["quant"] and h["fp_dtype"] == "float32"
    layer = m.blocks[0].attn.q
    assert isinstance(layer, QuantLinear)
    e = h["packed"]["blocks.0.attn.q.weight.codes"]
    assert (e["bits"], e["signed"], e["shape"], e["granularity"], e["axis"]) == (2, True, [96, 96], "channel", 0)
    assert pf.tensors["blocks.0.attn.q.weight.codes"].numel() == 96 * 96 * 2 // 8
    codes = unpack(pf.tensors["blocks.0.attn.q.weight.codes"], 2, True, e["shape"])
    assert torch.equal(codes, layer.weight_quant.codes(layer.weight))
    assert torch.equal(pf.tensors["blocks.0.attn.q.weight_quant.scale"], layer.weight_quant.scale.detach())
    q = h["quantizers"]["blocks.0.mlp.fc2.input_quant"]
    assert (q["signed"], q["offset"], q["kind"]) == (False, True, "mlp_hidden")
    assert "blocks.0.mlp.fc2.input_quant.offset" in pf.tensors
    assert h["quantizers"]["blocks.0.attn.q_quant"]["granularity"] == "head"
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.q.bias", "norm.bias"):
        assert name in h["fp"] and pf.tensors[name].dtype == torch.float32
        assert torch.equal(pf.tensors[name], m.state_dict()[name])
    assert h["fp"]["pos_embed"] == [1, 50, 96]
    assert "blocks.0.attn.q.weight" not in pf.tensors  # only the codes
    rows = size_table(h, pf.tensors)
    assert rows[-1]["group"] == "total" and rows[-1]["ratio"] > 5


def test_blobs_and_compressed_codes(packed):
    m, _, path = packed
    raw = path.read_bytes()
    index, _ = _split(raw)
    assert sorted(k for k in index if k != "__metadata__") == ["codes", "f32"]
    assert index["__metadata__"]["format"] == "vvtq-packed" and index["__metadata__"]["version"] == "2"
    h = read_packed(path).header
    codecs = {e["codec"] for e in h["packed"].values()}
    assert codecs <= {"raw", "zlib"} and "zlib" in codecs  # 2-bit codes of a calibrated model compress
    stored = sum(e["stored_bytes"] for e in h["packed"].values())
    assert index["codes"]["data_offsets"][1] - index["codes"]["data_offsets"][0] == stored
    assert stored < sum((e["numel"] * e["bits"] + 7) // 8 for e in h["packed"].values())


def test_fp16_remainder_round_trip(tmp_path):
    m, meta = _model()
    path = tmp_path / "h.vvtq.safetensors"
    write_packed(m, meta, path, fp_dtype=torch.float16)
    pf = read_packed(path)
    assert pf.header["fp_dtype"] == "float16" and pf.tensors["pos_embed"].dtype == torch.float16
    assert torch.equal(pf.tensors["pos_embed"], m.pos_embed.detach().half())
    assert pf.tensors["blocks.0.attn.q.weight_quant.scale"].dtype == torch.float32
    assert sorted(k for k in _split(path.read_bytes())[0] if k != "__metadata__") == ["codes", "f16", "f32"]


_WRITE_CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[2])
torch.set_num_threads(1)
from export.test_format import _model
from vvtq.export.format import write_packed
write_packed(*_model(), sys.argv[1])
"""


def test_export_is_deterministic(packed, tmp_path):
    """The same model gives the same bytes, in this process and in another (safetensors alone would write its
    metadata in a per-process random order)."""
    m, meta, path = packed
    path2, path3 = tmp_path / "again.vvtq.safetensors", tmp_path / "child.vvtq.safetensors"
    write_packed(m, meta, path2)
    assert read_packed(path2).header == read_packed(path).header  # same payload checksum too
    subprocess.run([sys.executable, "-c", _WRITE_CHILD, str(path3), str(Path(__file__).parents[1])], check=True,
                   timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert path3.read_bytes() == path2.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("keep", [0, 7, 8, 100, "header", "half", -1])
def test_truncated_files_are_refused(packed, tmp_path, keep):
    raw = packed[2].read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    cut = {"header": 8 + n, "half": len(raw) // 2}.get(keep, keep)
    bad = tmp_path / "cut.vvtq.safetensors"
    bad.write_bytes(raw[:cut] if cut >= 0 else raw[:len(raw) + cut])
    with pytest.raises(ExportFormatError):
        read_packed(bad)


def test_bit_flips_anywhere_are_refused(packed, tmp_path):
    raw = bytearray(packed[2].read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    rng = random.Random(0)
    positions = list(range(8)) + rng.sample(range(8, 8 + n), 60) + rng.sample(range(8 + n, len(raw)), 60)
    bad = tmp_path / "flip.vvtq.safetensors"
    for pos in positions:
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ExportFormatError):
            read_packed(bad)


def _with_stream(raw: bytes, text: str) -> bytes:
    """The packed file with its header stream (base64 text) replaced by ``text``, nothing else changed."""
    index, data = _split(raw)
    index["__metadata__"] = {**index["__metadata__"], META_KEY: text}
    blob = json.dumps(index).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def test_trailing_bytes_and_non_canonical_base64_in_the_header_are_refused(packed, tmp_path):
    """Bytes after the header's zlib stream, or a base64 text that is not the canonical one (another pad or
    spare bit), decode to the same header: each is still a changed file, and refused."""
    raw = packed[2].read_bytes()
    text = _split(raw)[0]["__metadata__"][META_KEY]
    z = base64.b64decode(text)
    bad = tmp_path / "z.vvtq.safetensors"
    trailing = base64.b64encode(z + b"\x00").decode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    stripped = text.rstrip("=")  # before a pad, the last character carries spare bits: flip the lowest
    spare = stripped[:-1] + alphabet[alphabet.index(stripped[-1]) ^ 1] + text[len(stripped):]
    for changed in (trailing, spare) if stripped != text else (trailing,):
        bad.write_bytes(_with_stream(raw, changed))
        with pytest.raises(ExportFormatError, match="corrupt header"):
            read_packed(bad)
    bad.write_bytes(_with_stream(raw, text))  # the helper alone keeps a good file good
    read_packed(bad)


def test_wrong_version_and_format_are_refused(packed, tmp_path):
    raw = packed[2].read_bytes()
    bad = tmp_path / "v.vvtq.safetensors"
    bad.write_bytes(_rewrite(raw, lambda h, i: h.update(version=3)))
    with pytest.raises(ExportFormatError, match="version 3 is not supported"):
        read_packed(bad)
    index, data = _split(raw)  # a version-1 file: plain JSON under the old key
    index["__metadata__"] = {"vvtq_export": json.dumps({**_header(raw), "version": 1})}
    blob = json.dumps(index).encode()
    blob += b" " * (-len(blob) % 8)
    bad.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    with pytest.raises(ExportFormatError, match="version 1 is not supported.*export the checkpoint again"):
        read_packed(bad)
    bad.write_bytes(_rewrite(raw, lambda h, i: h.update(format="something-else")))
    with pytest.raises(ExportFormatError, match="format"):
        read_packed(bad)


def test_a_checkpoint_is_not_a_packed_file(tmp_path):
    m, meta = _model()
    ckpt = tmp_path / "ckpt.safetensors"
    save_checkpoint(ckpt, m.state_dict(), meta)
    with pytest.raises(ExportFormatError, match="not a vvtq packed export"):
        read_packed(ckpt)
    with pytest.raises(ExportFormatError, match="not found"):
        read_packed(tmp_path / "missing.vvtq.safetensors")


def test_header_lying_about_sizes_is_refused_without_allocating(packed, tmp_path):
    raw = packed[2].read_bytes()
    bad = tmp_path / "lie.vvtq.safetensors"
    name = "blocks.0.attn.q.weight.codes"

    def huge_codes(h, i):
        h["packed"][name].update(shape=[1 << 30, 1 << 20], numel=1 << 50)
        h["layers"]["blocks.0.attn.q"]["weight_shape"] = [1 << 30, 1 << 20]

    def more_codes(h, i):  # consistent header, but the stored codes are fewer than the declared shape needs
        h["packed"][name].update(shape=[96, 192], numel=96 * 192)
        h["layers"]["blocks.0.attn.q"]["weight_shape"] = [96, 192]

    def bomb(h, i):  # a stream claiming far more output than DEFLATE can make of its bytes
        h["packed"][name].update(shape=[1 << 20, 1 << 10], numel=1 << 30)
        h["layers"]["blocks.0.attn.q"]["weight_shape"] = [1 << 20, 1 << 10]

    def stored_lies(h, i):  # the header's stored sizes no longer add up to the codes blob
        h["packed"][name]["stored_bytes"] += 1 << 40

    def index_lies(h, i):  # the safetensors index claims a larger blob than the bytes behind it
        i["codes"]["shape"] = [10 ** 9]

    for edit, match in ((huge_codes, "declared element count"), (more_codes, "do not decode to the 4608 bytes"),
                        (bomb, "cannot decode"), (stored_lies, "blob 'codes' is stored as"),
                        (index_lies, "corrupt or truncated")):
        bad.write_bytes(_rewrite(raw, edit))
        with pytest.raises(ExportFormatError, match=match):
            read_packed(bad)
    # a header whose architecture needs far more parameters than the file holds: refused on the meta device
    bad.write_bytes(_rewrite(raw, lambda h, i: h["arch"]["model_kwargs"].update(embed_dim=96 * 64,
                                                                               mlp_ratio=64.0)))
    with pytest.raises(ExportFormatError, match="needs"):
        build_runtime(bad)


def test_cli_refuses_bad_file_with_one_line(packed, tmp_path, capsys):
    raw = bytearray(packed[2].read_bytes())
    raw[-5] ^= 0x10
    bad = tmp_path / "bad.vvtq.safetensors"
    bad.write_bytes(bytes(raw))
    assert main(["eval", "--packed", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vvtq: error:") and "checksum" in err and len(err.splitlines()) == 1
    bad.write_bytes(bytes(raw[:1000]))
    assert main(["eval", "--packed", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vvtq: error:") and len(err.splitlines()) == 1


def test_cli_export_and_eval(tmp_path, capsys):
    m, meta = _model()
    ckpt = tmp_path / "ckpt.safetensors"
    save_checkpoint(ckpt, m.state_dict(), meta)
    out = tmp_path / "m.vvtq.safetensors"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fc1" in text and "total" in text and "ratio" in text
    assert main(["eval", "--packed", str(out), "--limit", "200"]) == 0
    packed = re.search(r"top-1 ([0-9.]+)%", capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(ckpt), "--limit", "200"]) == 0
    model = re.search(r"top-1 ([0-9.]+)%", capsys.readouterr().out)
    assert packed and model and packed.group(1) == model.group(1)  # deployed = evaluated
    out16 = tmp_path / "m16.vvtq.safetensors"
    assert main(["export", str(ckpt), "--out", str(out16), "--fp16"]) == 0
    assert read_packed(out16).header["fp_dtype"] == "float16"
    assert out16.stat().st_size < out.stat().st_size
