"""Small helpers for tests that run one pass on a traced graph."""

from __future__ import annotations

import torch
from torch import fx, nn

from repfx.capture import capture, copy_model, propagate_shapes
from repfx.graph import annotate_ranks


def traced(model: nn.Module, *example_inputs: torch.Tensor) -> fx.GraphModule:
    """What ``repfx.fold`` hands its passes: a traced copy with ranks (and shapes if given)."""
    gm, opaque = capture(copy_model(model))
    assert not opaque
    if example_inputs:
        propagate_shapes(gm, example_inputs)
    annotate_ranks(gm)
    return gm


def call_targets(gm: fx.GraphModule) -> list:
    """The targets of every call node, in order (module paths for call_module)."""
    return [n.target for n in gm.graph.nodes if n.op.startswith("call_")]


def apply(pass_, gm: fx.GraphModule):
    """Run one pass and regenerate the module's code, as the pipeline does."""
    result = pass_(gm)
    gm.graph.lint()
    gm.recompile()
    return result
