"""The storage-cost suite behind ``benchmarks/suite.py``, by concern: ``config`` (command line,
run sizes), ``workloads`` (what is checkpointed), ``methods`` (how), ``measure`` (peak RSS,
fingerprints), ``runner`` (the measuring loop), ``targets`` (the targets and the size baseline),
``report`` (summary and suite.md), ``plots``; ``common`` is shared with the other benchmarks."""
