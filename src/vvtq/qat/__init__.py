"""Everything that acts during QAT, behind one protocol (``Lever``; see ``vvtq.qat.base``).

- ``targets``: what the student learns from (hard labels, a live teacher, a soft-label file); always present;
- ``regularizer``: the oscillation-aware bin regularizer (VVTQ);
- ``anneal``: confidence-guided annealing of the low-bit weights (OFQ);
- ``oscillation``: oscillation tracking and iterative freezing (Nagel et al.).

Each optional lever registers its recipe setting on import; the loop calls them in their settings' ``order``
(annealing writes its held weights back before oscillation is measured).
"""
from .anneal import AnnealSettings, ConfidenceAnnealer
from .base import LEVERS, Lever, LeverSettings, RunContext, StepOutputs, register_lever
from .oscillation import OscillationLever, OscillationSettings
from .regularizer import BinRegularizer, RegularizerSettings
from .targets import Targets, TeacherSettings


def _import_every_lever() -> None:
    """Import every module of this package, so that a lever in a new file registers its setting without an
    import line here."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_every_lever()

__all__ = [
    "LEVERS", "AnnealSettings", "BinRegularizer", "ConfidenceAnnealer", "Lever", "LeverSettings",
    "OscillationLever", "OscillationSettings", "RegularizerSettings", "RunContext", "StepOutputs", "Targets",
    "TeacherSettings", "register_lever",
]
