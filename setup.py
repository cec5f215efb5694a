"""The one compiled part: merger.core._floatconv, float16/bfloat16 <-> float32 loops.

Everything else is in pyproject.toml. The extension is optional: without a C
compiler the install still succeeds and merger converts with numpy (slower for
float16; see merger.core.arrays).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "merger.core._floatconv",
            ["merger/core/_floatconv.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
