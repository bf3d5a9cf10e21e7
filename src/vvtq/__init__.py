"""vvtq: variation-aware low-bit quantization-aware training of Vision Transformers.

    model = timm.create_model("deit_tiny_patch16_224")
    vvtq.quantize_model(model, vvtq.QuantConfig.preset("vvtq", wbits=2, abits=2))
    vvtq.calibrate(model, batches)
"""
from ._torch_logging import quiet_no_cuda_runtime_warning

quiet_no_cuda_runtime_warning()  # torch's "No CUDA runtime is found" line on a CPU machine (see _torch_logging)

from . import models  # noqa: E402, F401  (registers mini_deit / mini_swin with timm)
from .quant import (  # noqa: E402
    QuantConfig,
    QuantizerError,
    calibrate,
    iter_act_quantizers,
    iter_weight_quantizers,
    quantize_model,
    set_quantization_enabled,
)

__version__ = "0.1.0"
__all__ = [
    "QuantConfig", "QuantizerError", "__version__", "calibrate", "iter_act_quantizers", "iter_weight_quantizers",
    "quantize_model", "set_quantization_enabled",
]
