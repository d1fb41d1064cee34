"""The graph as repfx reads it: what a node computes, whatever its spelling.

* ``graph`` — lookups on a ``torch.fx`` graph: module checks, constants, use counts, ranks;
* ``ops`` — the op views (``LinearOp``, ``NormOp``, ``AffineOp``, identity, layout,
  channel-wise) that passes ask instead of reading ``node.op`` / ``node.target``;
* ``norms`` — every norm repfx knows, declared once; ``op_kinds`` — op counts for reports;
* ``regions`` — single-entry single-exit fork-join regions; ``match`` — ``Fail(reason)``, the
  one type for "no".

Nothing here changes a graph.
"""
