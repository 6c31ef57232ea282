"""Only the optional C extensions live here; everything else is in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension(
        "deltackpt._planes", ["deltackpt/_planes.c"],
        extra_compile_args=["-O3", "-std=c11"],
        optional=True,  # no compiler: install anyway; deltackpt.planes falls back to numpy
    ),
    Extension(
        "deltackpt._entropy", ["deltackpt/_entropy.c"],
        extra_compile_args=["-O3", "-std=c11"],
        optional=True,  # no compiler: deltackpt.entropy decodes with numpy, encodes nothing
    ),
])
