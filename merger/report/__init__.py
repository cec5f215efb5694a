"""What a run and a sweep say afterwards: the run report and its summary, the sweep report, previews
of super-resolution outputs and contact sheets, the sanity check of merged image models, the recipe
file's git state.

May import: merger.core, merger.io, merger.cache, merger.archs, merger.recipe, merger.engine.
"""
