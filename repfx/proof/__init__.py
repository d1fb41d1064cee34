"""How repfx knows a fold is right.

* ``validate`` — the commit point's local proof: a region and its replacement evaluated in
  float64 on random probes before a rewrite is kept;
* ``verify`` — the whole folded model against the original, per output, with the float64
  re-check; ``redraw`` — parameters re-drawn at O(1) for the second verification;
* ``tolerances`` — the only place a tolerance is defined; ``inputs`` — private copies of a model
  and seeded, grad-free runs of it.
"""
