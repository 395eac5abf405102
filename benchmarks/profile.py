"""Where a compiled step spends its time: a jax.profiler trace, aggregated by XLA op kind.

XLA names each executed kernel after its fusion kind (`ynn_fusion.12`: a matrix product
given to YNNPACK; `copy_bitcast_fusion.3`: a layout change; `multiply_add_fusion.7`: an
element-wise loop, ...). Summing the trace's complete events by that name, numbers
stripped, says which kind of op dominates a step, and diffing two steps says where the
extra time of one over the other goes.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from collections.abc import Callable

import jax

_NOT_OPS = re.compile(r"^\$|Thunk|np\.asarray|Slinky|PjitFunction|PjRt|^end: ")


def op_seconds(fn: Callable[[], object], repeats: int = 1) -> dict[str, float]:
    """Seconds per call of each XLA op kind while `fn` runs (summed over threads)."""
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        try:
            for _ in range(repeats):
                fn()
        finally:
            jax.profiler.stop_trace()
        path = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    out: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not _NOT_OPS.search(e.get("name", "")):
            out[re.sub(r"\.\d+$", "", e["name"])] += e.get("dur", 0) / 1e6 / repeats
    return dict(out)


def top(ops: dict[str, float], n: int = 5) -> list[tuple[str, float, float]]:
    """The n largest op kinds: (name, seconds, share of the total)."""
    total = sum(ops.values()) or 1.0
    return [(k, v, v / total) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:n]]


def extra(ops: dict[str, float], base: dict[str, float], n: int = 5) -> list[tuple[str, float]]:
    """The n op kinds that grew most from `base` to `ops`: (name, extra seconds)."""
    diff = {k: ops.get(k, 0.0) - base.get(k, 0.0) for k in set(ops) | set(base)}
    return sorted(diff.items(), key=lambda kv: -kv[1])[:n]
