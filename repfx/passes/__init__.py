"""The fold passes, one per file, and the order repfx runs them in."""

from __future__ import annotations

from .absorb_padding import AbsorbPadding
from .base import Pass, PassError, PassResult, PipelineState, RewriteRejected
from .cleanup import Cleanup
from .fold_affine_mixer import FoldAffineMixer
from .fold_affine_through_flatten import FoldAffineThroughFlatten
from .fold_bn import FoldBatchNorm
from .fold_channel_affine import FoldChannelAffine
from .fold_norm_affine import FoldNormAffine
from .merge_branches import MergeBranches
from .merge_sequential import MergeSequential
from .pipeline import FixpointResult, RewriteRejectedWarning, run_to_fixpoint
from .precompute_constants import PrecomputeConstants


def default_pipeline(fold_norm_affine: bool = False) -> list[Pass]:
    """The passes repfx runs, in this order, to a fixpoint (then, on request, fold_norm_affine
    once, and the others to a fixpoint again). A new rule is registered by one line here."""
    optional: list[Pass] = [FoldNormAffine()] if fold_norm_affine else []
    return [
        PrecomputeConstants(),
        Cleanup(),
        FoldBatchNorm(),
        FoldAffineMixer(),
        FoldChannelAffine(),
        FoldAffineThroughFlatten(),
        MergeBranches(),
        AbsorbPadding(),
        MergeSequential(),
        *optional,
    ]


__all__ = [
    "AbsorbPadding",
    "Cleanup",
    "FixpointResult",
    "FoldAffineMixer",
    "FoldAffineThroughFlatten",
    "FoldBatchNorm",
    "FoldChannelAffine",
    "FoldNormAffine",
    "MergeBranches",
    "MergeSequential",
    "Pass",
    "PassError",
    "PassResult",
    "PipelineState",
    "PrecomputeConstants",
    "RewriteRejected",
    "RewriteRejectedWarning",
    "default_pipeline",
    "run_to_fixpoint",
]
