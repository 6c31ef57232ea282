"""Only the optional C extension lives here; everything else is in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "deltackpt._planes", ["deltackpt/_planes.c"],
    extra_compile_args=["-O3", "-std=c11"],
    optional=True,  # no compiler: install anyway; deltackpt.planes falls back to numpy
)])
