"""Export: bit packing, the packed file format, the integer reference runtime, ONNX (integer kernels or exact QDQ).

``vvtq.export`` is this package and also the function ``export_model``: ``vvtq.export(model, path)`` writes a
quantized model's packed file (a module can be called once its class defines ``__call__``).
"""
import sys
import types

from vvtq.export.api import export_model
from vvtq.export.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ExportFormatError,
    PackedFile,
    build_export,
    format_size_table,
    read_packed,
    size_table,
    write_packed,
)
from vvtq.export.packing import code_range, pack, packed_nbytes, unpack

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "ExportFormatError", "PackedFile", "build_export", "code_range", "export_model",
    "format_size_table", "pack", "packed_nbytes", "read_packed", "size_table", "unpack", "write_packed",
]


class _CallableModule(types.ModuleType):
    """``vvtq.export(...)`` is ``vvtq.export.export_model(...)``."""

    def __call__(self, *args, **kwargs):
        return export_model(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
