"""The compiled parts, all optional: merger.core._floatconv (float16/bfloat16 <-> float32 loops,
non-finite counts, TIES's histogram and election), merger.core._fused (per-key linear maths in
one pass over raw 16- and 32-bit inputs), merger.io._plain_scan (the usual safetensors header's
entries in one pass, for models of many tensors) and merger.cache._content_rows (the rows of a
model's content hash, for models of many tensors).

Everything else is in pyproject.toml. Without a C compiler the install still succeeds and merger
computes with numpy (slower for float16; see merger.core.arrays and merger.core.fused).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "merger.core._floatconv",
            ["merger/core/_floatconv.c", "merger/core/_ties.c"],
            depends=["merger/core/_floatconv.h"],
            extra_compile_args=["-O3", "-ffp-contract=off"],  # float32 rounding step by step, as numpy
            optional=True,
        ),
        Extension(
            "merger.core._fused",
            ["merger/core/_fused.c"],
            extra_compile_args=["-O3", "-ffp-contract=off"],  # float32 rounding step by step, as numpy
            optional=True,
        ),
        Extension(
            "merger.io._plain_scan",
            ["merger/io/_plain_scan.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "merger.cache._content_rows",
            ["merger/cache/_content_rows.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
    ]
)
