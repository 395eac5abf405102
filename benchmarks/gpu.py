"""Model FLOPs utilisation of a bf16 training step on an accelerator, dense and MTA.

    python -m benchmarks.gpu [--size base] [--batch 32] [--source 512] [--target 64]
                             [--steps 20] [--out gpu.json]

The step is the library's (`train.make_train_step`, Adam, parameters and optimizer state
donated) with bfloat16 computation and float32 parameters. Model FLOPs per step come from
the encoder-decoder formula of `flops.model_flops_per_step`:

    6 x encoder params x input tokens + 6 x decoder params x target tokens
    + 6 x cross-attention k/v params x input tokens + 6 x LM head x target tokens
    + 3 x attention (scores and values, both stacks, cross-attention included)

(MTA: the stage-one block computes all E adapters, so their parameters count in full).
MFU = model FLOPs per second / the device's dense bf16 peak (flops.peak_flops_per_second).
Target: >= 45% on an H100. On a CPU it runs (use --size micro) but reports no MFU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time


def mfu(model_flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (None without a peak)."""
    return None if not peak else model_flops / seconds / peak


_HOST = re.compile(r"PJRT|command_buffer|cuGraphLaunch|XLA GPU module|^jit_|Thunk|cuda", re.I)
_MATMUL = re.compile(r"gemm|nvjet|cutlass|cublas|(^|_)dot", re.I)


def by_kernel_kind(ops: dict[str, float]) -> dict[str, float]:
    """Kernel names with their numbering stripped (`fusion_8348` -> `fusion`); host-side
    events (launches, command buffers, the executable's span) summed as `(host)`."""
    out: dict[str, float] = {}
    for k, v in ops.items():
        kind = "(host)" if _HOST.search(k) else re.sub(r"[._]\d+$", "", k)
        out[kind] = out.get(kind, 0.0) + v
    return out


def kernel_classes(ops: dict[str, float]) -> dict[str, float]:
    """Device kernel seconds per step: matrix products vs everything else."""
    kinds = {k: v for k, v in by_kernel_kind(ops).items() if k != "(host)"}
    mm = sum(v for k, v in kinds.items() if _MATMUL.search(k))
    return {"matmul": mm, "other": sum(kinds.values()) - mm}


def measure(name: str, config, shape, steps: int, peak: float | None,
            profile: bool = False) -> dict:
    import jax

    from mta_jax import flops as F
    from benchmarks import profile as P
    from benchmarks import workloads as W

    step = W.train_step(name, config, shape)
    params, opt_state = step.params, step.opt_state
    for _ in range(2):  # warm-up: first executions allocate
        params, opt_state, metrics = step.compiled(params, opt_state, step.batch, step.rng)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):  # dispatch runs ahead; one wait at the end
        params, opt_state, metrics = step.compiled(params, opt_state, step.batch, step.rng)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    model_flops = F.model_flops_per_step(config, shape.batch, shape.source, shape.target)
    util = mfu(model_flops, seconds, peak)
    kernels = classes = None
    if profile:  # where the step's time goes, by XLA kernel kind (numbers stripped)
        state = {"p": params, "o": opt_state}

        def one_step():
            state["p"], state["o"], m = step.compiled(state["p"], state["o"], step.batch, step.rng)
            jax.block_until_ready(m)
        ops = P.op_seconds(one_step, repeats=3)
        kernels = P.top({k: v for k, v in by_kernel_kind(ops).items() if k != "(host)"}, n=15)
        for kind, sec, share in kernels:
            print(f"  {name} {kind}: {sec * 1e3:.2f} ms ({100 * share:.1f}%)", flush=True)
        classes = kernel_classes(ops)
        print(f"  {name} kernel time by class (ms/step): "
              + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in classes.items()), flush=True)
    return {"name": name, "step_s": seconds, "model_flops": model_flops,
            "model_tflops_per_s": model_flops / seconds / 1e12, "mfu": util,
            "target_mfu": 0.45, "pass": None if util is None else util >= 0.45,
            "tokens_per_s": shape.batch * (shape.source + shape.target) / seconds,
            "compile_s": step.compile_seconds, "loss": float(metrics["loss"]),
            "memory": step.memory(), "profile_top": kernels,
            "kernel_classes": classes}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="base", help="micro | small | base")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--source", type=int, default=512)
    p.add_argument("--target", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", help="computation dtype")
    p.add_argument("--out", default="gpu.json")
    p.add_argument("--profile", action="store_true",
                   help="also trace 3 steps and print the 15 largest kernel kinds")
    args = p.parse_args(argv)

    import jax

    from mta_jax import flops as F
    from benchmarks import workloads as W

    device = jax.devices()[0]
    peak = F.peak_flops_per_second(device.device_kind, args.dtype)
    shape = W.Shape(args.batch, args.source, args.target)
    rows = []
    for name, plug in (("dense", None), ("mta", W.stage_one_plug())):
        config = W.t5_config(args.size, plug, dtype=args.dtype)
        row = measure(name, config, shape, args.steps, peak, profile=args.profile)
        rows.append(row)
        util = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(f"{name}: {row['step_s'] * 1e3:.1f} ms/step, "
              f"{row['model_tflops_per_s']:.1f} model TFLOP/s, MFU {util}", flush=True)
    result = {"device": device.device_kind, "platform": device.platform, "peak_flops": peak,
              "size": args.size, "shape": dataclasses.asdict(shape), "dtype": args.dtype,
              "jax": jax.__version__, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print("| step | ms/step | model TFLOP/s | MFU | target | pass/miss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        util = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        verdict = "n/a" if r["pass"] is None else "pass" if r["pass"] else "miss"
        print(f"| {r['name']} | {r['step_s'] * 1e3:.1f} | {r['model_tflops_per_s']:.1f} | "
              f"{util} | >= 45% | {verdict} |")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
