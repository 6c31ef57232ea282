"""Conformance kits for third-party backends and codecs: pytest base classes a subclass runs
against its own implementation (nothing here is imported by ``import deltackpt``)."""
