"""Process-level helpers that know nothing of the format: the lazy torch import, scratch
buffers, huge pages and RNG state capture."""
