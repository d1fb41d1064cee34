"""How repfx knows a fold is right.

* ``validate`` — the commit point's local proof: a region (``region``: the ops between what a
  rewrite keeps and the inputs its pass names) and its replacement evaluated in float64 on
  random probes before a rewrite is kept; ``aliasing`` — the condition on values handed to
  code that may write them;
* ``verify`` — the whole folded model against the original, per output, with the float64
  re-check; ``redraw`` — parameters re-drawn at O(1) for the second verification;
* ``tolerances`` — the only place a tolerance is defined; ``inputs`` — private copies of a model
  and seeded, grad-free runs of it.
"""
