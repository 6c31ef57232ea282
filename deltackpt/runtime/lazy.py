"""``torch`` imported on first use: importing it takes seconds, and commands that only read
manifests (``deltackpt log``, ``du``, ``show``, ``--help``) never need it."""
from __future__ import annotations

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
    """Stands in for a module until an attribute is read; then imports it and caches that
    attribute here, so later reads are plain dictionary lookups."""

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)
        return value

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self.__name__))


torch = LazyModule("torch")
