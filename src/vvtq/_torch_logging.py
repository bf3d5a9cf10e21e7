"""Silence one misleading torch log line, and nothing else.

``torch.utils.cpp_extension`` logs ``No CUDA runtime is found, using CUDA_HOME=...`` when it is imported on a
machine that has a CUDA toolkit (``nvcc``, ``/usr/local/cuda``) but no usable GPU. vvtq never builds a CUDA
extension; the module is imported only because ``torch.compile``'s CPU code generator (the fused fake-quant
kernels, ``vvtq.quant.fake_quant``) uses it. The filter drops that one record of that one logger; every other
message of it, and every other warning, still shows.
"""
from __future__ import annotations

import logging

LOGGER = "torch.utils.cpp_extension"
MESSAGE = "No CUDA runtime is found"


class _DropNoCudaRuntime(logging.Filter):
    """Drops the ``No CUDA runtime is found`` record; passes everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(MESSAGE)


def quiet_no_cuda_runtime_warning() -> None:
    """Install the filter on torch's ``cpp_extension`` logger (once; before or after torch imports it)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, _DropNoCudaRuntime) for f in logger.filters):
        logger.addFilter(_DropNoCudaRuntime())
