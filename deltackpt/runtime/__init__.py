"""Process-level helpers that know nothing of the format: the lazy torch import, scratch buffers, huge pages, RNG state capture."""
