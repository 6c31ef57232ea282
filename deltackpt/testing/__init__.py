"""Conformance kits for third-party storage backends and codecs (pytest base classes)."""
