"""Training-time analysis tools (oscillation tracking)."""
from vvtq.analysis.oscillation import OscillationTracker

__all__ = ["OscillationTracker"]
