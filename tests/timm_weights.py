"""Random O(1) weights for timm models: identity BN statistics or a 1e-5 LayerScale would make
a wrong fold invisible. Shared by the timm tests and benchmarks/bench_timm_reparam.py."""

from __future__ import annotations

from repfx.proof.redraw import redraw_foldable_parameters_

__all__ = ["redraw_foldable_parameters_"]
