"""repfx: a reparameterization compiler for PyTorch.

``repfx.fold(model)`` traces a model with torch.fx and folds what is affine in its input —
eval-mode BatchNorm, per-channel affines and LayerScale, RIFormer-style affine token mixers —
into the convs, linears and norms next to it, returning an equivalent ``GraphModule``.
"""

from __future__ import annotations

from .capture import CaptureError, ExampleInputError
from .draw import DrawError
from .dynamo import compile_backend
from .errors import Error, TrainingModeError
from .export import ExportError, export_onnx
from .fold import REPORT_KEY, TrainingModeWarning, VerificationError, fold
from .report import FoldReport

__version__ = "0.1.0"

__all__ = [
    "REPORT_KEY",
    "CaptureError",
    "DrawError",
    "Error",
    "ExampleInputError",
    "ExportError",
    "FoldReport",
    "TrainingModeError",
    "TrainingModeWarning",
    "VerificationError",
    "__version__",
    "compile_backend",
    "export_onnx",
    "fold",
]
