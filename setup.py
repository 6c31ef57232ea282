"""Only the optional C extensions live here; everything else is in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension(
        "deltackpt.format._planes", ["deltackpt/format/_planes.c"],
        extra_compile_args=["-O3", "-std=c11"],
        optional=True,  # no compiler: install anyway; deltackpt.format.planes falls back to numpy
    ),
    Extension(
        "deltackpt.format._entropy", ["deltackpt/format/_entropy.c"],
        extra_compile_args=["-O3", "-std=c11"],
        optional=True,  # no compiler: deltackpt.format.entropy decodes with numpy, encodes nothing
    ),
])
