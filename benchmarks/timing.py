"""Side-by-side timing: every figure the harness reports is a ratio of medians of
interleaved repetitions, so that load from other processes hits both sides alike.

Import this module, and call `set_threads`, before JAX (or PyTorch) is imported: XLA reads
its thread count from XLA_FLAGS once, when its CPU client starts.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping


def set_threads(n: int, omp_wait_policy: str = "PASSIVE") -> int:
    """Give XLA's CPU client and PyTorch the same `n` intra-op threads; returns n.

    PyTorch's OpenMP threads spin while they wait (OMP_WAIT_POLICY=ACTIVE, the default);
    on a machine shared with other jobs that made its steps 3-4x slower here, while XLA's
    thread pool blocks instead. PASSIVE is the fair setting on a busy machine.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", omp_wait_policy)
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        flags += f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={n}"
    os.environ["XLA_FLAGS"] = flags.strip()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        import torch
    except ImportError:  # the JAX-only parts (gpu.py) run without PyTorch
        return n
    torch.set_num_threads(n)
    return n


def interleaved(fns: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1,
                min_rounds: int | None = None,
                more: Callable[[float], bool] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each `fn` (which must block until its work is done).

    Each round calls every fn once; the order rotates from round to round so that no fn
    always follows the same neighbour. `warmup` untimed rounds come first. After
    `min_rounds` rounds, another starts only if `more(seconds the last round took)`.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    last = 0.0
    for r in range(rounds):
        if min_rounds is not None and more is not None and r >= min_rounds and not more(last):
            break
        begin = time.perf_counter()
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
        last = time.perf_counter() - begin
    return times


def median(values) -> float:
    return float(statistics.median(values))


def ratio(times: Mapping[str, list[float]], num: str, den: str) -> float:
    """The median over rounds of num / den, each pair timed in the same round: load that
    changes from round to round (other jobs) cancels within a pair."""
    return median([a / b for a, b in zip(times[num], times[den])])
