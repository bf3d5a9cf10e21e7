"""vvtq: variation-aware low-bit quantization-aware training of Vision Transformers.

    model, meta = vvtq.load_model("timm:deit_tiny_patch16_224")      # or a vvtq checkpoint
    vvtq.quantize_model(model, vvtq.QuantConfig.preset("vvtq", wbits=2, abits=2))
    vvtq.calibrate(model, batches)
    ...                                                               # train: README "Your own training loop"
    vvtq.export(model, "model.vvtq.safetensors")                      # packed integers (onnx=... for ONNX too)

The pieces of a custom loop: ``distill_loss`` (soft cross-entropy against a teacher), ``BinRegularizer``
(the oscillation-aware bin regularizer), ``OscillationTracker``, ``evaluate`` / ``eval_loader`` and
``set_integer_eval`` (a quantized model in eval mode computes in the integer domain, as its packed file does;
``False`` evaluates on the fake-quant path instead).
"""
from ._torch_logging import quiet_no_cuda_runtime_warning

quiet_no_cuda_runtime_warning()  # torch's "No CUDA runtime is found" line on a CPU machine (see _torch_logging)

from . import export, models  # noqa: E402, F401  (models registers the minis with timm; export is callable)
from .analysis.oscillation import OscillationTracker  # noqa: E402
from .distill import distill_loss, soft_cross_entropy  # noqa: E402
from .errors import VVTQError  # noqa: E402
from .evaluation import eval_loader, evaluate  # noqa: E402
from .modelio import build_model, load_model, save_model  # noqa: E402
from .qat import BinRegularizer, ConfidenceAnnealer  # noqa: E402
from .quant import (  # noqa: E402
    QuantConfig,
    QuantizerError,
    calibrate,
    iter_act_quantizers,
    iter_weight_quantizers,
    quantize_model,
    set_integer_eval,
    set_quantization_enabled,
)
from .spec import ModelSpec  # noqa: E402

ModelBinRegularizer = BinRegularizer  # its name until 2026-12-07 (vvtq.regularize is now vvtq.qat.regularizer)

__version__ = "0.1.0"
__all__ = [
    "BinRegularizer", "ConfidenceAnnealer", "ModelSpec", "OscillationTracker", "QuantConfig", "QuantizerError",
    "VVTQError",
    "__version__", "build_model", "calibrate", "distill_loss", "eval_loader", "evaluate", "export",
    "iter_act_quantizers", "iter_weight_quantizers", "load_model", "quantize_model", "save_model",
    "set_integer_eval", "set_quantization_enabled", "soft_cross_entropy",
]
