"""Quantizers, quantized layers, the conversion pass and calibration."""
from .calibrate import (
    calibrate,
    iter_act_quantizers,
    iter_quantizers,
    iter_weight_quantizers,
    set_quantization_enabled,
    sync_quantizers,
)
from .config import PRESETS, QuantConfig
from .convert import quantize_model
from .fake_quant import fused_kernels, fused_kernels_mode, int_range, lsq_fake_quant, quant_codes, set_fused_kernels
from .modules import QuantAttention, QuantConv2d, QuantLinear, set_integer_eval
from .quantizers import Quantizer, QuantizerError, check_bits, mse_fit_scale

__all__ = [
    "PRESETS", "QuantAttention", "QuantConfig", "QuantConv2d", "QuantLinear", "Quantizer", "QuantizerError",
    "calibrate", "check_bits", "fused_kernels", "fused_kernels_mode", "int_range", "iter_act_quantizers",
    "iter_quantizers",
    "iter_weight_quantizers", "lsq_fake_quant", "mse_fit_scale", "quant_codes", "quantize_model",
    "set_fused_kernels", "set_integer_eval", "set_quantization_enabled", "sync_quantizers",
]
