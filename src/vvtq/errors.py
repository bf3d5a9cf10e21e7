"""vvtq's one error type.

Every error vvtq raises on purpose (a bad recipe, a corrupt file, a non-finite loss, ...) derives from
``VVTQError``, and also from the built-in class it was before (``ValueError``, ``RuntimeError``), so that
``except ValueError`` keeps working. The command line turns a ``VVTQError`` (or an ``OSError``) into one line on
stderr and exit status 2; anything else is a bug and keeps its traceback.

The specific classes live next to the code that raises them: ``ConfigError`` (here: recipes, settings and
command-line arguments, used by several layers), ``QuantizerError`` (``vvtq.quant.quantizers``),
``CheckpointError`` (``vvtq.checkpoint``), ``TrainingError`` (``vvtq.train``), ``DatasetError``
(``vvtq.data.base``), ``SoftLabelError`` (``vvtq.distill.softlabels``), ``ExportFormatError``
(``vvtq.export.format``).
"""
from __future__ import annotations


class VVTQError(Exception):
    """Base class of every error vvtq raises on purpose: a problem with its input, not a bug."""


class ConfigError(VVTQError, ValueError):
    """A recipe file, a setting or a command-line argument is invalid."""
