"""Export helpers (integer code packing)."""
from vvtq.export.packing import code_range, pack, packed_nbytes, unpack

__all__ = ["code_range", "pack", "packed_nbytes", "unpack"]
