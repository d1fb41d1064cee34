"""Training recipes that produce foldable models. Not part of the compiler: nothing in
``repfx`` imports them; import the one you need (``repfx.recipes.riformer``)."""
