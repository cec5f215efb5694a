"""The recipe: what a recipe file may hold (the trust rules), the checked and resolved config data,
the typed Recipe model built from it, per-layer schedules resolved key by key.

May import: merger.core, merger.ops.
"""
