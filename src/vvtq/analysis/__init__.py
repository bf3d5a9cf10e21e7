"""Variation analysis: oscillation tracking, distribution statistics, module sensitivity, mixed precision and
the ``vvtq analyze`` report."""
from vvtq.analysis.mixed_precision import (
    average_bits,
    layer_params,
    layer_sensitivity,
    propose_bits,
    write_overrides,
)
from vvtq.analysis.oscillation import OscillationTracker
from vvtq.analysis.sensitivity import (
    SensitivityResult,
    block_groups,
    kind_groups,
    module_groups,
    requantize,
    run_sensitivity,
)
from vvtq.analysis.stats import (
    ModelStats,
    SiteStats,
    StreamingMoments,
    as_analysis_model,
    collect_statistics,
    outlier_heads,
)

__all__ = [
    "ModelStats", "OscillationTracker", "SensitivityResult", "SiteStats", "StreamingMoments",
    "as_analysis_model",
    "average_bits", "block_groups", "collect_statistics", "kind_groups", "layer_params", "layer_sensitivity",
    "module_groups", "outlier_heads", "propose_bits", "requantize", "run_sensitivity", "write_overrides",
]
