"""Export: bit packing, the packed file format, the integer reference runtime and QDQ ONNX."""
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
    "FORMAT_NAME", "FORMAT_VERSION", "ExportFormatError", "PackedFile", "build_export", "code_range",
    "format_size_table", "pack", "packed_nbytes", "read_packed", "size_table", "unpack", "write_packed",
]
