"""Op views: recognise what a graph node computes, whatever its spelling.

Passes never look at ``node.op`` / ``node.target`` themselves; they ask this package for a
view of a node, one module per kind of view:

* ``linear`` — :class:`LinearOp`: conv / conv-transpose / linear, ``y = W ∗ x + b``
  (:func:`linear_op`);
* ``pool`` — an average pool's settings, and the pool as the depthwise conv it is
  (:func:`avg_pool_settings`, :func:`avg_pool_op`);
* ``norm`` — :class:`NormOp`: a norm of :mod:`repfx.ir.norms` (LayerNorm, GroupNorm, RMSNorm),
  with its per-channel affine (:func:`norm_op`);
* ``affine`` — :class:`AffineOp`: a per-channel affine of one tensor (eval BatchNorm, arithmetic
  with constants, a depthwise 1×1 conv; :func:`affine_op`);
* ``identity`` — the input of a no-op: eval dropout, ``Identity``, ``x * 1``
  (:func:`identity_input`);
* ``layout`` — where a channel axis goes through an op that only moves data
  (:func:`layout_source_axis`);
* ``channelwise`` — :class:`Channelwise`: an op that acts on each channel alone
  (:func:`channelwise_source`);
* ``operands`` — :class:`Slot`, and how the views read a call's arguments.

A view returns ``None`` for a node that is not one of its kind. Where a near-miss deserves a
reason — a training-mode dropout (:func:`identity_input`), a batch norm that is no affine
(:func:`batch_norm_reason`), two affines on different axes (:func:`merge_axes`) — it returns a
:class:`repfx.ir.match.Fail` instead (see ``repfx.ir.match`` for the convention).

Every view carries :class:`Slot` objects naming where each of its tensors lives (a module
attribute or a node argument), so a rewrite can replace them without knowing the spelling.

Channel axes are *negative* (counted from the right) so that they are meaningful whether or not
the batch dimension is present; ``None`` means "uniform over all channels" (a scalar).

Soundness: a view is returned only when the node provably computes it.

* Modules must be *plain* (``repfx.ir.graph.is_plain``): a subclass that overrides anything
  ``forward`` uses (``_conv_forward``, ``_check_input_dim``, a ``weight`` property) is not the
  base op.
* Every tensor operand of a view is a constant (``repfx.ir.graph.ConstantFolder``). An optional
  operand (a norm's or batch norm's weight / bias, a linear's bias) that is *given* but not a
  constant — computed from an activation (conditional BN), or a graph placeholder — makes the
  node no view at all; only an operand that is absent (not passed, or passed as ``None``) means
  γ = 1 / β = 0 / no bias.
* Each spelling is read with its own argument order and defaults (``F.batch_norm`` and
  ``torch.batch_norm`` differ; ``F.dropout`` defaults to training), and only literal settings
  are trusted.
"""

from .affine import AXES_CLASH, AffineOp, affine_op, batch_norm_reason, is_batch_norm, merge_axes
from .channelwise import Channelwise, channelwise_source
from .identity import identity_input
from .layout import layout_source_axis
from .linear import PAD_FUNCTIONS, ConvGeometry, LinearOp, linear_op
from .norm import NormOp, norm_op
from .operands import Slot
from .pool import avg_pool_op, avg_pool_settings

__all__ = [
    "AXES_CLASH",
    "PAD_FUNCTIONS",
    "AffineOp",
    "Channelwise",
    "ConvGeometry",
    "LinearOp",
    "NormOp",
    "Slot",
    "affine_op",
    "avg_pool_op",
    "avg_pool_settings",
    "batch_norm_reason",
    "channelwise_source",
    "identity_input",
    "is_batch_norm",
    "layout_source_axis",
    "linear_op",
    "merge_axes",
    "norm_op",
]
