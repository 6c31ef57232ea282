"""Storage-cost suite: every checkpoint method side by side on six workloads, in one run.

Methods (each checkpoint of a run is written by every method, in a rotating order):

* ``torch.save``           the baseline (one ``.pt`` file per step; no fsync, as users call it)
* ``safetensors``          ``safetensors.torch.save_file`` of the flattened tensors; non-tensor
                           values (step counters, scheduler fields, hyper-parameters) are NOT
                           stored by this method
* ``safetensors+zstd``     the same file's bytes compressed with zstd level 3 (all cores)
* ``zipnn``                ZipNN, lossless, per tensor with ``input_format="torch"`` (the usage
                           its README shows; dtype-aware byte grouping); tensors of dtypes ZipNN
                           does not take (int, bool) go through zstd level 3; tensors only
* ``deltackpt``            deltackpt, default (lossless) policy, ``save(...)`` blocking
* ``deltackpt async``      the same policy with ``save(..., blocking=False)``: the stall is the
                           time until the call returns, the save time is until ``wait()`` returns
* ``deltackpt balanced`` / ``deltackpt archive``   the lossy presets (not bit-exact at every step)

Workloads (generated locally from fixed seeds, no downloads):

a) dense pre-training of the char transformer of deltackpt.cli.demo with AdamW, fp32
b) the same with bf16 mixed precision: bf16 model weights rounded from fp32 master params that
   AdamW updates; the checkpoint holds the bf16 model and the fp32 master + optimizer (forward
   and backward run in fp32 on the bf16-rounded weights: bf16 matmuls are emulated, several times
   slower, on this CPU build; the bytes checkpointed are the same kind)
c) fine-tuning with a frozen backbone (``Trainer(freeze_backbone=True)``)
d) LoRA adapters (rank 8) on every linear projection of a frozen base; full state_dict saved
e) a recommendation model: a 200k x 32 item table and a 20k x 32 user table
   (``nn.Embedding(sparse=True)`` + ``SparseAdam``), a dense MLP with Adam; Zipf-popular items,
   so each step touches a few hundred rows
f) a large synthetic state (1 GiB at --scale 1): float32 tensors shaped like a transformer plus
   two Adam moments, advanced by a random-walk Adam update between saves; few saves (throughput)

Measured per workload x method: bytes on disk (total and per save), save time (median), the
async stall, load time of the last step (median, a fresh reader each time), the load time of
every step (median of up to 3 interleaved rounds; the worst ratio of those medians to
torch.load of the same step), bit-exactness of every restored
step (tensor bytes, dtypes, shapes and non-tensor values compared with fingerprints taken at save
time), and peak RSS during save and load.

Peak RSS: the process's high-water mark (VmHWM in /proc/self/status) is reset to the current RSS
by writing "5" to /proc/self/clear_refs right before each save/load, and read right after; the
figure reported is the peak minus the RSS just before the call, i.e. the memory the call needed on
top of what the process already held (the training state, and for deltackpt its reference). It is
taken on each method's last save and last load, after ``malloc_trim(0)`` so that heap memory
freed earlier is given back to the OS and a new allocation shows up as RSS rather than silently
reusing a free list (the other, timed samples run on the heap as it is, like a training loop's).
Where clear_refs is not writable, a psutil thread samples RSS every 2 ms instead. The memory a
deltackpt repository keeps between saves (its delta reference) is measured as the RSS freed by
closing it.

Targets (workloads a and f, each against the same run's torch.save / torch.load; listed
first in suite.md, MET / MISSED / N/A with the figures and their spread): lossless save <= 1.0x
torch.save followed by fsync (moonshot <= 0.8x) with no loss in size; ``save(blocking=False)``
stall <= 0.15x torch.save; load of a keyframe step (the first saved step: every step once per
round, then extra rounds of it) <= 1.0x torch.load; load of the latest step <= 1.2x; load of
every saved step <= 2.0x (the worst step); lossless bytes >= the previous default format's
(results/suite_baseline.json: exact bytes per run configuration, compared byte for byte when
this run's configuration and torch.save bytes match it, else as ratios to torch.save). A
missed target does not change the exit status: 1 means a lossless method restored a step
that is not bit-exact, or a deltackpt method failed (a crash).

    python benchmarks/suite.py            # full run (~15-20 min on 2 cores); writes results/
    python benchmarks/suite.py --quick    # CI-sized run (~2.5 min on 2 cores); a temp dir
    python benchmarks/suite.py --scale 2  # larger models / tables / big state
    python benchmarks/suite.py --rerender # rebuild suite.md + plots from results/suite.json
"""
from __future__ import annotations

import sys

from suitekit.common import RESULTS_DIR
from suitekit.config import make_parser
from suitekit.report import rerender
from suitekit.runner import run_suite
from suitekit.targets import write_baseline


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.write_baseline:
        return write_baseline(args.write_baseline)
    if args.rerender:
        return rerender(args.out or RESULTS_DIR)
    return run_suite(args, argv)


if __name__ == "__main__":
    sys.exit(main())
