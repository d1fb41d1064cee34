"""Graph queries shared by the op views, the passes, capture and the proofs: nothing here
changes a graph.

* :mod:`.modules` — what a node names (``module_of``, ``fetch_attr``), module hooks, whether a
  module is *plain* (behaves as its ``torch.nn`` class), words for reports (``op_name``,
  ``where``);
* :mod:`.constants` — ``ConstantFolder`` (nodes that depend only on module attributes, through
  calls that write nothing and draw no random numbers) and the in-place analysis behind it;
* :mod:`.uses` — call sites per parameter / buffer and per module (``tensor_use_counts``,
  ``module_call_counts``), a node's users by what they read (``value_users``, ``shape_users``);
* :mod:`.ranks` — ranks, dtypes and static shapes: recorded, or inferred without example inputs
  (``annotate_ranks``);
* :mod:`.memory` — which tensors share memory (``storage_key``);
* :mod:`.aten` — what an ATen op does: draws random numbers, writes which arguments.
"""

from __future__ import annotations

from .aten import argument_value, draws_random, written_positions, written_values
from .constants import (
    HANDED_KEY,
    MUTATED_KEY,
    ConstantFolder,
    call_signature,
    inplace_flag,
    is_inplace_name,
    is_torch_callable,
    may_be_written,
    writes_in_place,
)
from .guards import is_guard, require_none, require_rank
from .memory import keys_of, storage_key
from .modules import (
    fetch_attr,
    global_forward_hooks,
    has_hooks,
    is_plain,
    module_of,
    op_name,
    owner_and_name,
    where,
)
from .ranks import (
    FLOAT_KEY,
    RANK_KEY,
    VALUE_KEYS,
    annotate_ranks,
    arg_of,
    assumed_input_rank,
    dtype_argument,
    dtype_on_meta_tensors,
    forget_annotations,
    is_floating,
    known_dtype,
    rank_of,
    static_shape,
)
from .uses import (
    TensorUses,
    attr_tensors_read_by,
    module_call_counts,
    reads_only_shape,
    shape_users,
    tensor_use_counts,
    value_users,
)

__all__ = [
    "FLOAT_KEY",
    "HANDED_KEY",
    "MUTATED_KEY",
    "RANK_KEY",
    "VALUE_KEYS",
    "ConstantFolder",
    "TensorUses",
    "annotate_ranks",
    "arg_of",
    "argument_value",
    "assumed_input_rank",
    "attr_tensors_read_by",
    "call_signature",
    "draws_random",
    "dtype_argument",
    "dtype_on_meta_tensors",
    "fetch_attr",
    "forget_annotations",
    "global_forward_hooks",
    "has_hooks",
    "inplace_flag",
    "is_floating",
    "is_guard",
    "is_inplace_name",
    "is_plain",
    "is_torch_callable",
    "keys_of",
    "known_dtype",
    "may_be_written",
    "module_call_counts",
    "module_of",
    "op_name",
    "owner_and_name",
    "rank_of",
    "reads_only_shape",
    "require_none",
    "require_rank",
    "shape_users",
    "static_shape",
    "storage_key",
    "tensor_use_counts",
    "value_users",
    "where",
    "writes_in_place",
    "written_positions",
    "written_values",
]
