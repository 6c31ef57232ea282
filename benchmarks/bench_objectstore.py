"""Object storage: deltackpt on ``s3://`` against ``torch.save`` + upload, side by side.

A real S3 API on loopback (moto's ``ThreadedMotoServer``, started here in a child process,
so that its threads and the proxies' never compete for the measured process's GIL) stands in
for the bucket. Three links to it, each measured in the same run:

* ``loopback``: the client talks to the server directly (no bandwidth limit; the server's own
  speed, a Python process on this machine, is the limit);
* ``1 GB/s`` and ``100 MB/s``: through ``deltackpt.testing.httpproxy.FaultProxy`` with that
  bandwidth cap (one token bucket for both directions: a shared link).

Workload: ``deltackpt.cli.demo.Trainer`` (a char-level GPT, 4 layers, d=256 by default: model +
AdamW state + scheduler + RNG, about 40 MB per checkpoint), trained on CPU from fixed seeds, one
checkpoint every ``--every`` steps. At every checkpoint, for every link, in rotating order:

* ``deltackpt``: ``repo.save(step, state)`` (blocking) into a repository on that link, default
  policy (lossless deltas, a keyframe every 10 saves);
* ``torch.save + upload``: ``torch.save`` to a local file with fsync, then one ``obstore.put``
  of that file (multipart, the same part size and parallelism as deltackpt's uploads) with the
  same client;
* ``DCP fsspec``: ``torch.distributed.checkpoint.save`` with ``FsspecWriter`` on an s3 URL
  (s3fs), where s3fs is installed (``pip install s3fs``); otherwise that row says why not.

Then loads, interleaved the same way, ``--repeat`` times: the latest step and the first
(keyframe) step from a fresh reader (``deltackpt.open(url, mode="r")``), against one GET of the
file plus ``torch.load``, and DCP's ``FsspecReader``. Every load is checked bit-exact against
digests taken at save time.

Bytes uploaded are counted by the proxy (request bodies, every request: packs, indexes,
manifests, the lease); the ``loopback`` link has no proxy, so its bytes are those of the proxied
links (the same saves). Ratios are deltackpt's time over the baseline's, per step, reported as
median and min-max; the baseline's own spread is reported beside them.

    python benchmarks/bench_objectstore.py                  # full run (~6 min on 2 cores)
    python benchmarks/bench_objectstore.py --quick          # smoke (~1 min), writes nothing
    python benchmarks/bench_objectstore.py --quick --out /tmp/o   # ... and writes its results

Needs the test extra (moto[server], obstore). For the DCP row, s3fs: ``pip install s3fs``
(kept out of the extras: it pins botocore, which moto and boto3 also pin).
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from suitekit.common import (  # noqa: E402
    RESULTS_DIR,
    git_commit,
    log,
    pkg_version,
    write_results,
)
from suitekit.measure import compare, fingerprint, state_bytes  # noqa: E402

import deltackpt  # noqa: E402
from deltackpt.cli.demo import GPTConfig, Trainer  # noqa: E402
from deltackpt.store.objectstore import MAX_CONCURRENCY, PART_SIZE  # noqa: E402

BUCKET = "deltackpt-bench"
CREDENTIALS = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
REGION = "us-east-1"
MB = 1_000_000
LINKS = (("loopback", None), ("1 GB/s", 1000 * MB), ("100 MB/s", 100 * MB))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _span(xs: list[float]) -> list[float] | None:
    return [min(xs), max(xs)] if xs else None


class Servers:
    """The S3 server and the throttling proxies, in a child process (``--serve``): their
    Python threads then never hold the measured process's GIL, as a remote store's would not.
    A line protocol on the child's stdin/stdout reads the proxies' byte counters."""

    def __init__(self, bandwidths: dict[str, float]) -> None:
        import json
        import subprocess
        self._json = json
        spec = ",".join(f"{name}={bw}" for name, bw in bandwidths.items())
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", spec],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the server process did not start (see its stderr)")
        got = json.loads(line)
        self.upstream: str = got["upstream"]
        self.proxies: dict[str, str] = got["proxies"]

    def bytes_up(self, name: str) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"stats {name}\n")
        return int(self._json.loads(self.proc.stdout.readline())["bytes_up"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def serve(spec: str) -> int:
    """``--serve``: moto on loopback plus one FaultProxy per ``name=bytes_per_s`` of ``spec``;
    prints the endpoints as one JSON line, then answers ``stats NAME`` until stdin closes."""
    import json
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from deltackpt.testing.httpproxy import FaultProxy

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    upstream = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=upstream, region_name=REGION, **CREDENTIALS) \
        .create_bucket(Bucket=BUCKET)
    proxies = {}
    for item in filter(None, spec.split(",")):
        name, bw = item.rsplit("=", 1)
        proxies[name] = FaultProxy(upstream, bandwidth=float(bw)).start()
    print(json.dumps({"upstream": upstream,
                      "proxies": {n: p.endpoint for n, p in proxies.items()}}), flush=True)
    for line in sys.stdin:
        cmd, _, name = line.strip().partition(" ")
        if cmd == "stats":
            print(json.dumps({"bytes_up": proxies[name].stats.bytes_up}), flush=True)
    for p in proxies.values():
        p.stop()
    server.stop()
    return 0


class Link:
    """One way to reach the bucket: its endpoint, and whether a proxy counts its bytes."""

    def __init__(self, name: str, servers: Servers) -> None:
        self.name = name
        self.servers = servers
        self.proxied = name in servers.proxies
        self.endpoint = servers.proxies.get(name, servers.upstream)

    @property
    def options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "region": REGION, **CREDENTIALS}

    def bytes_up(self) -> int | None:
        return self.servers.bytes_up(self.name) if self.proxied else None


class DeltaSide:
    name = "deltackpt"

    def __init__(self, link: Link, prefix: str) -> None:
        self.url = f"s3://{BUCKET}/{prefix}/delta"
        self.link = link
        self.repo = deltackpt.open(self.url, storage_options=link.options)

    def save(self, step: int, state: Any, path: str) -> None:
        self.repo.save(step, state)

    def load(self, step: int, template: Any) -> Any:
        with deltackpt.open(self.url, mode="r", storage_options=self.link.options) as reader:
            return reader.load(step)

    def finish(self) -> None:
        """Wait until the save is durable (a blocking save already is)."""

    def close(self) -> None:
        self.repo.close()


class DeltaAsyncSide(DeltaSide):
    """``save(blocking=False)``: the training loop waits only for the stall (the snapshot into
    staging buffers); the upload runs behind it. Timed here until durable as well, before the
    next method runs, so that the methods never overlap."""

    name = "deltackpt, blocking=False"

    def save(self, step: int, state: Any, path: str) -> None:
        self.repo.save(step, state, blocking=False)

    def finish(self) -> None:
        self.repo.wait_until_finished()


class TorchUploadSide:
    name = "torch.save + upload"

    def __init__(self, link: Link, prefix: str) -> None:
        import obstore as obs
        self.obs = obs
        self.store = obs.store.from_url(f"s3://{BUCKET}/{prefix}/torch", **link.options,
                                        client_options={"allow_http": True})

    def save(self, step: int, state: Any, path: str) -> None:
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        self.obs.put(self.store, f"step-{step}.pt", Path(path), chunk_size=PART_SIZE,
                     max_concurrency=MAX_CONCURRENCY)

    def load(self, step: int, template: Any) -> Any:
        data = self.obs.get(self.store, f"step-{step}.pt").bytes()
        return torch.load(io.BytesIO(memoryview(data)), weights_only=False)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


class DCPSide:
    name = "DCP fsspec"

    def __init__(self, link: Link, prefix: str) -> None:
        import torch.distributed.checkpoint as dcp
        self.dcp = dcp
        self.base = f"s3://{BUCKET}/{prefix}/dcp"
        self.opts = {"key": CREDENTIALS["aws_access_key_id"],
                     "secret": CREDENTIALS["aws_secret_access_key"],
                     "client_kwargs": {"endpoint_url": link.endpoint, "region_name": REGION},
                     "skip_instance_cache": True}

    def save(self, step: int, state: Any, path: str) -> None:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
        self.dcp.save(state, storage_writer=FsspecWriter(f"{self.base}/{step}", **self.opts),
                      no_dist=True)

    def load(self, step: int, template: Any) -> Any:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
        self.dcp.load(template, storage_reader=FsspecReader(f"{self.base}/{step}", **self.opts),
                      no_dist=True)
        return template

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


def _dcp_state(state: dict[str, Any]) -> dict[str, Any]:
    """What DCP takes: the model and optimizer tensors (DCP pickles other values and flattens
    keys, so the comparison is on tensors; deltackpt and torch.save carry everything)."""
    return {"model": state["model"], "optimizer": state["optimizer"]}


def _dcp_template(state: dict[str, Any]) -> dict[str, Any]:
    """Fresh tensors of the same shapes for DCP to load into (it loads in place)."""
    return _empty_like(_dcp_state(state))


def _dcp_unavailable() -> str | None:
    try:
        import s3fs  # noqa: F401
    except ImportError:
        return "not run: s3fs is not installed (pip install s3fs)"
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    servers = Servers({name: bw for name, bw in LINKS if bw is not None and name in args.links})
    links = [Link(name, servers) for name, _bw in LINKS if name in args.links]
    dcp_why = _dcp_unavailable() if not args.no_dcp else "not run: --no-dcp"
    kinds: list[type] = [DeltaSide, DeltaAsyncSide, TorchUploadSide] + \
        ([DCPSide] if dcp_why is None else [])
    tmp = tempfile.mkdtemp(prefix="deltackpt-objbench-")
    cfg = GPTConfig(layers=args.layers, dim=args.dim, block=128)
    trainer = Trainer(cfg, total_steps=args.saves * args.every, batch=16)
    sides = {link.name: [k(link, f"{link.name.replace(' ', '').replace('/', '')}-"
                                 f"{uuid.uuid4().hex[:8]}") for k in kinds] for link in links}
    saves: dict[str, dict[str, list[float]]] = {ln.name: {k.name: [] for k in kinds} for ln in links}
    upload: dict[str, dict[str, list[int]]] = {ln.name: {k.name: [] for k in kinds} for ln in links}
    stalls: dict[str, list[float]] = {ln.name: [] for ln in links}
    fps: dict[int, Any] = {}
    templates: dict[int, Any] = {}
    state_size = 0
    rotation = 0
    try:
        while trainer.step < args.saves * args.every:
            trainer.train_step()
            if trainer.step % args.every:
                continue
            step, state = trainer.step, trainer.state()
            fps[step] = fingerprint(state)
            templates[step] = _dcp_template(state)
            state_size = state_bytes(state)
            for link in links:
                order = sides[link.name][rotation:] + sides[link.name][:rotation]
                for side in order:
                    target = _dcp_state(state) if isinstance(side, DCPSide) else state
                    before = link.bytes_up()
                    t0 = time.perf_counter()
                    side.save(step, target, os.path.join(tmp, "step.pt"))
                    if isinstance(side, DeltaAsyncSide):
                        stalls[link.name].append(time.perf_counter() - t0)
                    side.finish()
                    saves[link.name][side.name].append(time.perf_counter() - t0)
                    if before is not None:
                        upload[link.name][side.name].append(link.bytes_up() - before)
            rotation = (rotation + 1) % len(kinds)
            log(f"step {step}: " + "; ".join(
                f"{ln}: " + ", ".join(f"{n} {v[-1] * 1e3:.0f} ms" for n, v in per.items())
                for ln, per in saves.items()))
        steps = sorted(fps)
        load_steps = {"latest": steps[-1], "keyframe": steps[0]}
        loads: dict[str, dict[str, dict[str, list[float]]]] = {
            ln.name: {w: {k.name: [] for k in kinds if k is not DeltaAsyncSide}
                      for w in load_steps} for ln in links}
        exact: dict[str, bool] = {}
        for r in range(args.repeat):
            for link in links:
                for which, step in load_steps.items():
                    order = sides[link.name][r % len(kinds):] + sides[link.name][:r % len(kinds)]
                    for side in order:
                        if isinstance(side, DeltaAsyncSide):
                            continue  # the same bytes as the blocking saves'
                        t0 = time.perf_counter()
                        got = side.load(step, _empty_like(templates[step]))
                        loads[link.name][which][side.name].append(time.perf_counter() - t0)
                        ref = fps[step]
                        if isinstance(side, DCPSide):
                            ref = {k: v for k, v in ref.items() if k.split("/")[0] in got}
                        res = compare(ref, got, tensors_only=isinstance(side, DCPSide))
                        ok = res["tensor_mismatch"] == 0 and res["value_mismatch"] == 0
                        exact[side.name] = exact.get(side.name, True) and ok
            log(f"load round {r + 1}/{args.repeat} done")
    finally:
        for per in sides.values():
            for side in per:
                side.close()
        servers.close()
    return {"saves": saves, "stalls": stalls, "upload": upload, "loads": loads, "exact": exact,
            "state_bytes": state_size, "steps": steps, "load_steps": load_steps,
            "dcp": dcp_why, "methods": [k.name for k in kinds]}


def _empty_like(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        return torch.empty_like(t)
    if isinstance(t, dict):
        return {k: _empty_like(v) for k, v in t.items()}
    if isinstance(t, list):
        return [_empty_like(v) for v in t]
    return t


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Per link and method: medians, spreads and per-step ratios against torch.save + upload."""
    base = TorchUploadSide.name
    out: dict[str, Any] = {}
    for link, per in res["saves"].items():
        rows = {}
        for method, times in per.items():
            ratios = [a / b for a, b in zip(times, per[base])]
            up = res["upload"][link][method]
            rows[method] = {
                "save_ms": _median([t * 1e3 for t in times]),
                "save_ms_span": _span([t * 1e3 for t in times]),
                "save_ratio": _median(ratios), "save_ratio_span": _span(ratios),
                "throughput_MBps": res["state_bytes"] / MB / _median(times) if times else None,
                "bytes_up_per_step": _median([float(b) for b in up]) if up else None,
                "bytes_up_total": sum(up) if up else None,
                "bytes_up_first": up[0] if up else None,
            }
            if method == DeltaAsyncSide.name:
                st = res["stalls"][link]
                sr = [a / b for a, b in zip(st, per[base])]
                rows[method].update({"stall_ms": _median([t * 1e3 for t in st]),
                                     "stall_ratio": _median(sr), "stall_ratio_span": _span(sr)})
                continue
            for which in res["load_steps"]:
                lt = res["loads"][link][which][method]
                lb = res["loads"][link][which][base]
                lr = [a / b for a, b in zip(lt, lb)]
                rows[method][f"load_{which}_ms"] = _median([t * 1e3 for t in lt])
                rows[method][f"load_{which}_ratio"] = _median(lr)
                rows[method][f"load_{which}_ratio_span"] = _span(lr)
        out[link] = rows
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f} ms"


def _x(x: float | None, span: list[float] | None = None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" + (f" ({span[0]:.2f}-{span[1]:.2f})" if span else "")


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / MB:,.1f} MB"


def _ratio_of(rows: dict[str, Any], key: str) -> str:
    mine, base = rows[DeltaSide.name].get(key), rows[TorchUploadSide.name].get(key)
    return f", uploading {mine / base:.2f}x its bytes" if mine and base else ""


def to_markdown(meta: dict[str, Any], res: dict[str, Any], summary: dict[str, Any]) -> str:
    base = TorchUploadSide.name
    lines = [
        "# Object storage: deltackpt on s3:// vs torch.save + upload", "",
        f"Generated by `python benchmarks/bench_objectstore.py{meta['argv']}` at "
        f"{meta['when']} (deltackpt {meta['commit']}; torch {meta['torch']}, obstore "
        f"{meta['obstore']}, moto {meta['moto']}; {meta['machine']}).", "",
        f"Workload: demo GPT ({meta['layers']} layers, d={meta['dim']}), "
        f"{len(res['steps'])} checkpoints, one every {meta['every']} training steps; state "
        f"{res['state_bytes'] / MB:.1f} MB of tensors. Server: moto on loopback. Ratios are "
        f"deltackpt (or DCP) time / `{base}` time, per checkpoint, median (min-max); "
        "below 1.00x is faster.", "",
        "## Saves", "",
        "Until durable: the call returns (blocking) or `wait_until_finished()` returns. Training "
        "waits: what the training loop blocks for (for a blocking save, the whole save).", "",
        "| link | method | until durable (median) | ratio | training waits | ratio "
        "| baseline's own min-max | uploaded per step (median) | uploaded, all steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for link, rows in summary.items():
        span = rows[base]["save_ms_span"]
        own = f"{_ms(span[0])} - {_ms(span[1])}" if span else "-"
        for method, r in rows.items():
            ratio = "1.00x" if method == base else _x(r["save_ratio"], r["save_ratio_span"])
            if "stall_ms" in r:
                waits = f"{_ms(r['stall_ms'])} | {_x(r['stall_ratio'], r['stall_ratio_span'])}"
            else:
                waits = f"{_ms(r['save_ms'])} | {ratio}"
            lines.append(f"| {link} | {method} | {_ms(r['save_ms'])} | {ratio} | {waits} | {own} "
                         f"| {_mb(r['bytes_up_per_step'])} | {_mb(r['bytes_up_total'])} |")
    lines += ["", "Reading the table: " + "; ".join(
        f"on {link}, a blocking deltackpt save takes {_x(rows[DeltaSide.name]['save_ratio'])} "
        f"the time of torch.save + upload{_ratio_of(rows, 'bytes_up_total')}, and "
        f"`save(blocking=False)` holds training for "
        f"{_x(rows[DeltaAsyncSide.name].get('stall_ratio'))} of it"
        for link, rows in summary.items()) + "."]
    lines += ["", "## Loads (fresh reader; bit-exact checked on every load)", "",
              "| link | method | latest step | ratio | first step (keyframe) | ratio |",
              "|---|---|---|---|---|---|"]
    for link, rows in summary.items():
        for method, r in rows.items():
            cells = []
            if "stall_ms" in r:
                continue
            for which in ("latest", "keyframe"):
                ratio = "1.00x" if method == base else \
                    _x(r[f"load_{which}_ratio"], r[f"load_{which}_ratio_span"])
                cells.append(f"{_ms(r[f'load_{which}_ms'])} | {ratio}")
            lines.append(f"| {link} | {method} | {cells[0]} | {cells[1]} |")
    exact = ", ".join(f"{m}: {'yes' if ok else 'NO'}" for m, ok in res["exact"].items())
    lines += ["", f"Bit-exact on every load: {exact} (DCP: tensors only; it pickles the rest).",
              f"DCP fsspec: {res['dcp'] or 'run'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small model and 4 saves; writes "
                   "nothing unless --out is given")
    p.add_argument("--out", help="write objectstore.md/.json here (default for a full run: "
                   "benchmarks/results)")
    p.add_argument("--saves", type=int)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--dim", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--repeat", type=int)
    p.add_argument("--links", default=",".join(n for n, _ in LINKS),
                   help="comma-separated: " + ", ".join(n for n, _ in LINKS))
    p.add_argument("--no-dcp", action="store_true", help="skip DCP's fsspec writer")
    p.add_argument("--rerender", metavar="DIR", help="rewrite DIR/objectstore.md from "
                   "DIR/objectstore.json (after a change to the report's wording)")
    p.add_argument("--serve", help=argparse.SUPPRESS)  # the child process of Servers
    args = p.parse_args(argv)
    if args.serve is not None:
        return serve(args.serve)
    if args.rerender:
        import json
        for stem in sorted(f[:-5] for f in os.listdir(args.rerender)
                           if f.startswith("objectstore") and f.endswith(".json")):
            with open(os.path.join(args.rerender, f"{stem}.json"), encoding="utf-8") as f:
                got = json.load(f)
            with open(os.path.join(args.rerender, f"{stem}.md"), "w", encoding="utf-8") as f:
                f.write(to_markdown(got["meta"], got["raw"], got["summary"]))
        return 0
    args.saves = args.saves or (4 if args.quick else 12)
    args.dim = args.dim or (64 if args.quick else 256)
    args.layers = args.layers or (2 if args.quick else 4)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.links = [x.strip() for x in args.links.split(",")]
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    res = run(args)
    summary = summarize(res)
    meta = {"argv": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
            "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit(), "torch": torch.__version__,
            "obstore": pkg_version("obstore"), "moto": pkg_version("moto"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "layers": args.layers, "dim": args.dim, "every": args.every}
    text = to_markdown(meta, res, summary)
    print(text)
    out = args.out or (None if args.quick else RESULTS_DIR)
    if out:
        write_results(out, "objectstore", text, {"meta": meta, "summary": summary, "raw": res})
    return 0 if all(res["exact"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
