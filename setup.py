"""The compiled parts, both optional: merger.core._floatconv (float16/bfloat16 <-> float32 loops,
non-finite counts, TIES's histogram and election) and merger.core._fused (per-key linear maths in
one pass over raw 16- and 32-bit inputs).

Everything else is in pyproject.toml. Without a C compiler the install still succeeds and merger
computes with numpy (slower for float16; see merger.core.arrays and merger.core.fused).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "merger.core._floatconv",
            ["merger/core/_floatconv.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
        Extension(
            "merger.core._fused",
            ["merger/core/_fused.c"],
            extra_compile_args=["-O3", "-ffp-contract=off"],  # float32 rounding step by step, as numpy
            optional=True,
        ),
    ]
)
