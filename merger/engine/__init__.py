"""Running a recipe: graph, plan (from specs alone), the sources of a run, the executor and its
read-compute-write pipeline, output placement and the rules on where outputs land, provenance,
the family check, progress.

May import: merger.core, merger.io, merger.cache, merger.ops, merger.archs, merger.recipe.
"""
