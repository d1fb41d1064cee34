"""repfx: a reparameterization compiler for PyTorch.

``repfx.fold(model)`` traces a model with torch.fx and folds what is affine in its input —
eval-mode BatchNorm, per-channel affines and LayerScale, RIFormer-style affine token mixers —
into the convs, linears and norms next to it, returning an equivalent ``GraphModule``.
"""

from __future__ import annotations

import sys as _sys

from .dynamo import compile_backend
from .errors import CaptureError, Error, ExampleInputError, GuardError, TrainingModeError
from .export import ExportError, export_onnx
from .fold import REPORT_KEY, TrainingModeWarning, VerificationError, fold
from .ir import match, op_kinds
from .passes import RewriteRejectedWarning
from .proof import redraw, tolerances, verify
from .report import FoldReport
from .report.draw import DrawError

# Where earlier releases documented these modules: ``from repfx.tolerances import max_errors``
# and its kin keep working (the modules themselves moved into their layers' packages).
for _moved in (match, op_kinds, redraw, tolerances, verify):
    _sys.modules[f"{__name__}.{_moved.__name__.rpartition('.')[2]}"] = _moved
del _moved

__version__ = "0.1.0"

__all__ = [
    "REPORT_KEY",
    "CaptureError",
    "DrawError",
    "Error",
    "ExampleInputError",
    "ExportError",
    "FoldReport",
    "GuardError",
    "RewriteRejectedWarning",
    "TrainingModeError",
    "TrainingModeWarning",
    "VerificationError",
    "__version__",
    "compile_backend",
    "export_onnx",
    "fold",
]
