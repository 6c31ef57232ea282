"""The ``deltackpt`` command line and its demo."""
