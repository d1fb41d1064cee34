"""Capture: a model becomes a ``torch.fx.GraphModule`` of a private copy.

* :mod:`.fx` — ``torch.fx`` symbolic tracing (untraceable submodules stay opaque leaves,
  deterministic parametrizations baked), on the deep copy the passes work on;
* :mod:`.hooks` — forward hooks a folded model cannot honour, and what a hook's code may do;
* :mod:`.writes` — what a graph node may write to in place, and what its result may alias;
* :mod:`.inplace` — functionalization: in-place writes out of place where that is exact,
  marked where it is not;
* :mod:`.live_state` — the module tensors a graph writes when it runs (a training-mode norm's
  running statistics, a buffer updated in place), and what a trace computed from them: read
  again as graph values, never kept as the values they had while tracing;
* :mod:`.shapes` — shape propagation on the example inputs, and the dtype guards it shows
  to be no-ops;
* :mod:`.torch_export` — ``torch.export`` (non-strict) as a second front end, its ATen calls
  rewritten to their torch-level twins;
* :mod:`.frontend` — which front end captures a model (``capture="auto" | "fx" | "export"``),
  and the example inputs its opaque children see;
* :mod:`.opaque` — whether a child left opaque can be folded on its own in place;
* :mod:`.reuse` — one capture for two copies of a model (the re-drawn copy's fold binds the
  first copy's graph to its own tensors);
* :mod:`.bytecode` — what a bytecode instruction does, for the readers of code (``opaque``,
  ``hooks``), whatever the Python release.
"""

from __future__ import annotations

from ..errors import CaptureError, ExampleInputError
from ..proof.inputs import copy_model
from .frontend import (
    AS_IS,
    CAPTURE_MODES,
    capture_model,
    capture_with_shapes,
    record_child_inputs,
    record_inputs,
    release_what_runs_may_write,
)
from .fx import capture
from .inplace import functionalize
from .opaque import child_reason, descent_reason, has_own_forward
from .portable import keep_when_pickled
from .rank_guards import RankGuard, insert_rank_guards, rank_guards, rename_rank_guards
from .shapes import drop_no_op_dtype_guards, propagate_shapes
from .torch_export import export_program

__all__ = [
    "AS_IS",
    "CAPTURE_MODES",
    "CaptureError",
    "ExampleInputError",
    "RankGuard",
    "capture",
    "capture_model",
    "capture_with_shapes",
    "child_reason",
    "copy_model",
    "descent_reason",
    "drop_no_op_dtype_guards",
    "export_program",
    "functionalize",
    "has_own_forward",
    "insert_rank_guards",
    "keep_when_pickled",
    "propagate_shapes",
    "rank_guards",
    "record_child_inputs",
    "record_inputs",
    "release_what_runs_may_write",
    "rename_rank_guards",
]
