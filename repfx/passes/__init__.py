"""The fold passes, one per file, and the order repfx runs them in."""

from __future__ import annotations

from .absorb_padding import AbsorbPadding
from .base import Pass, PassError, PassResult, RewriteRejected, run_to_fixpoint
from .cleanup import Cleanup
from .fold_affine_mixer import FoldAffineMixer
from .fold_bn import FoldBatchNorm
from .fold_channel_affine import FoldChannelAffine
from .merge_branches import MergeBranches
from .merge_sequential import MergeSequential
from .precompute_constants import PrecomputeConstants


def default_pipeline() -> list[Pass]:
    """precompute_constants → cleanup → fold_bn → fold_affine_mixer → fold_channel_affine →
    merge_branches → absorb_padding → merge_sequential, run to a fixpoint."""
    return [
        PrecomputeConstants(),
        Cleanup(),
        FoldBatchNorm(),
        FoldAffineMixer(),
        FoldChannelAffine(),
        MergeBranches(),
        AbsorbPadding(),
        MergeSequential(),
    ]


__all__ = [
    "AbsorbPadding",
    "Cleanup",
    "FoldAffineMixer",
    "FoldBatchNorm",
    "FoldChannelAffine",
    "MergeBranches",
    "MergeSequential",
    "Pass",
    "PassError",
    "PassResult",
    "PrecomputeConstants",
    "RewriteRejected",
    "default_pipeline",
    "run_to_fixpoint",
]
