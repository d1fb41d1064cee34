"""Fold arithmetic: pure tensor functions, no graph.

Every function here computes in float64 and casts its results back to the dtype of the
tensor it replaces, so that a chain of folds accumulates no more rounding than one.

* ``affine`` — per-channel affines ``s ⊙ x + t``: composing and summing them, batch norm as
  one, absorbing one into a conv / linear / transposed conv (either side) or a norm;
* ``kernels`` — convs as data and the kernel arithmetic of merged parallel and sequential
  branches.
"""

from .affine import (
    COMPUTE_DTYPE,
    ChannelAffine,
    batch_norm_affine,
    fold_affine_into_conv_input,
    fold_affine_into_conv_output,
    fold_affine_into_conv_transpose_output,
    fold_affine_into_norm,
)
from .kernels import (
    ConvKernel,
    affine_as_kernel,
    centre_pad,
    compose_pointwise_then_conv,
    concat_kernels,
    regroup,
    sum_kernels,
    undilate,
)

__all__ = [
    "COMPUTE_DTYPE",
    "ChannelAffine",
    "ConvKernel",
    "affine_as_kernel",
    "batch_norm_affine",
    "centre_pad",
    "compose_pointwise_then_conv",
    "concat_kernels",
    "fold_affine_into_conv_input",
    "fold_affine_into_conv_output",
    "fold_affine_into_conv_transpose_output",
    "fold_affine_into_norm",
    "regroup",
    "sum_kernels",
    "undilate",
]
