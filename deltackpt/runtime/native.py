"""The on/off switch of an optional C extension: on where it was built and
``DELTACKPT_NATIVE`` is not ``0``; tests turn it off to compare the numpy path."""
from __future__ import annotations

import os
import types


class NativeSwitch:
    """Whether calls run the compiled ``module`` (None: not built) or the numpy fallback."""

    def __init__(self, module: types.ModuleType | None) -> None:
        self.module = module
        self.on = self.available()

    def available(self) -> bool:
        """Whether the extension was built and is enabled (``DELTACKPT_NATIVE`` not ``0``)."""
        return self.module is not None and os.environ.get("DELTACKPT_NATIVE", "1") != "0"

    def set(self, enabled: bool) -> bool:
        """Turn the compiled path on or off (on only where built); returns the old state."""
        old = self.on
        self.on = bool(enabled) and self.module is not None
        return old
