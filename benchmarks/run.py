"""The benchmark harness: `python -m benchmarks.run [--quick] --out results.json`.

Measures, on random T5 v1.0-shaped models (CPU unless JAX sees an accelerator), the cost of
the MTA block against the same model without it, this JAX/Flax code against Hugging Face's
PyTorch T5, stage two against stage one, decoding against `generate`, and how a step scales
with adapters and source length. Every time figure is a median of per-round ratios of interleaved
repetitions taken in one run (see timing.py): the machine may be shared.

    --quick   T5-small, batch 4, source 128, target 32, 3-5 rounds, fewer scaling points;
              finishes in under 10 minutes on 2 cores (scaling points are skipped, and
              said so, when the time budget would be exceeded).
    (default) T5-small and T5-base, batch 4, source 512, target 64 (the released recipe).
    --micro   a tiny model without dropout, for the unit test of this harness.

Prints a Markdown table and writes results.json (rows, raw timings, shapes, machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Plan:
    sizes: tuple[str, ...]
    batch: int
    source: int
    target: int
    rounds: int  # timed rounds at most (at least `min_rounds`; more while the budget allows)
    min_rounds: int
    adapters: tuple[int, ...]  # scaling points (5, the anchor, is always measured)
    sources: tuple[int, ...]  # scaling points (`source`, the anchor, is always measured)
    budget_s: float | None  # skip optional points that would not fit
    dropout_rate: float = 0.1


PLANS = {
    "full": Plan(("small", "base"), 4, 512, 64, 7, 7, (1, 2, 5, 10), (128, 256, 512), None),
    "quick": Plan(("small",), 4, 128, 32, 5, 3, (1, 5, 10), (64, 128), 550.0),
    "micro": Plan(("micro",), 2, 16, 8, 3, 3, (5,), (16,), None, dropout_rate=0.0),
}


# --------------------------------------------------------------------------- targets

@dataclasses.dataclass(frozen=True)
class Target:
    op: str  # "<=" | ">=" | "<" | "~" (within tol) | "" (reported, no target)
    value: float = 0.0
    tol: float = 0.0

    def __str__(self) -> str:
        if not self.op:
            return "-"
        if self.op == "~":
            return f"{self.value:.2f} +- {self.tol:.2f}"
        return f"{self.op} {self.value:g}"

    def check(self, x: float) -> bool | None:
        if not self.op:
            return None
        return {"<=": x <= self.value, ">=": x >= self.value, "<": x < self.value,
                "~": abs(x - self.value) <= self.tol}[self.op]


INFO = Target("")


class Report:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, size: str, metric: str, value: float, target: Target, shape: str,
            unit: str = "", **extra) -> dict:
        ok = target.check(value)
        row = {"size": size, "metric": metric, "value": float(value), "unit": unit,
               "target": str(target), "pass": ok, "shape": shape, **extra}
        self.rows.append(row)
        verdict = "info" if ok is None else "pass" if ok else "MISS"
        print(f"  {metric} = {value:.4g}{unit} ({verdict})", flush=True)
        return row

    def markdown(self) -> str:
        lines = ["| metric | value | target | pass/miss | shape |",
                 "| --- | --- | --- | --- | --- |"]
        for r in self.rows:
            verdict = "info" if r["pass"] is None else "pass" if r["pass"] else "**miss**"
            v = r["value"]
            value = f"{v:.3g}{r['unit']}" if abs(v) < 1e-2 and v != 0 else f"{v:.3f}{r['unit']}"
            lines.append(f"| {r['metric']} | {value} | {r['target']} | {verdict} | "
                         f"{r['size']} {r['shape']} |")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the suite

class Clock:
    def __init__(self, budget_s: float | None):
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, seconds: float) -> bool:
        return self.budget_s is None or self.elapsed() + seconds <= self.budget_s

    def rounds_while(self, reserve: float):
        """`interleaved(more=...)`: another round if it and `reserve` seconds still fit."""
        return lambda last_round: self.fits(last_round + reserve)


def run_size(size: str, plan: Plan, report: Report, clock: Clock, raw: dict,
             profiles: dict) -> None:
    import numpy as np
    import transformers

    from benchmarks import flops as F
    from benchmarks import profile as P
    from benchmarks import timing, torch_t5
    from benchmarks import workloads as W
    from mta_jax.models import mta as mta_lib
    from mta_jax.models.t5 import T5

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    shape = W.Shape(plan.batch, plan.source, plan.target)
    cfg = lambda plug=None: W.t5_config(size, plug, dropout_rate=plan.dropout_rate)
    dense_cfg, mta_cfg = cfg(), cfg(W.stage_one_plug())
    variants = {
        "bottleneck": cfg(W.stage_one_plug(adapter_kind="bottleneck")),
        "all_layers": cfg(W.stage_one_plug(encoder_layers="all", decoder_layers="all")),
    }
    s = str(shape)
    raw[size] = {}
    profiles[size] = {}
    compile_s = []

    def compiled(name, config, shp=shape, **kw):
        step = W.train_step(name, config, shp, **kw)
        compile_s.append(step.compile_seconds)
        print(f"  compiled {name} ({shp}) in {step.compile_seconds:.1f}s "
              f"[{clock.elapsed():.0f}s elapsed]", flush=True)
        return step

    # --- PyTorch twins, built before the JAX steps donate (consume) their parameters.
    print(f"[{size}] PyTorch models and parity", flush=True)
    dense_model, mta_model = T5(dense_cfg), T5(mta_cfg)
    mta_params = W.random_params(mta_model)
    batch = W.make_batch(dense_cfg, shape)
    with tempfile.TemporaryDirectory() as folder:
        torch_t5.hf.save_hf_t5(folder, dense_model, W.random_params(dense_model))
        load = lambda: transformers.T5ForConditionalGeneration.from_pretrained(folder)
        hf_dense, hf_decode = load(), load()
        hf_mta = torch_t5.patch_mta(load(), mta_cfg, mta_params, "vectorised")
        hf_loop = torch_t5.patch_mta(load(), mta_cfg, mta_params, "loop")
    diff = float(np.max(np.abs(torch_t5.logits(hf_mta, batch)
                               - W.forward_logits(mta_model, mta_params, batch))))
    del mta_params

    # --- Pool A: MTA overhead over dense, and JAX over PyTorch.
    print(f"[{size}] pool A: MTA overhead, JAX vs PyTorch", flush=True)
    dense = compiled("dense", dense_cfg)
    mta = compiled("mta", mta_cfg)
    var_steps = {k: compiled(k, c) for k, c in variants.items()}
    torch_fns = {"torch_dense": torch_t5.train_step(hf_dense, batch),
                 "torch_mta": torch_t5.train_step(hf_mta, batch),
                 "torch_mta_loop": torch_t5.train_step(hf_loop, batch)}
    for fn in torch_fns.values():  # PyTorch's first step allocates AdamW's state
        fn()
    pool = {"dense": dense, "mta": mta, **var_steps, **torch_fns}
    # Rounds past min_rounds only while the later phases still fit: stage two (two
    # compilations, its rounds), decoding, and the scaling points (one compilation each).
    n_scaling = len(set(plan.adapters) - {5}) + len(set(plan.sources) - {plan.source})
    later = lambda compiles, seconds: clock.rounds_while(
        (compiles + n_scaling) * max(compile_s) + seconds)
    times = timing.interleaved(pool, plan.rounds, warmup=0, min_rounds=plan.min_rounds,
                               more=later(2, 150))
    raw[size]["pool_a"] = times
    flops = {k: F.train_flops(c, *dataclasses.astuple(shape)) for k, c in
             {"dense": dense_cfg, "mta": mta_cfg, **variants}.items()}
    for key, suffix in (("mta", ""), ("bottleneck", "_bottleneck"), ("all_layers", "_all_layers")):
        t_ratio = timing.ratio(times, key, "dense")
        f_ratio = flops[key] / flops["dense"]
        report.add(size, f"mta_over_dense_step_time{suffix}", t_ratio, INFO, s)
        report.add(size, f"mta_over_dense_train_flops{suffix}", f_ratio, INFO, s,
                   flops=flops[key], dense_flops=flops["dense"])
        row = report.add(size, f"mta_overhead_over_flops{suffix}", t_ratio / f_ratio,
                         Target("<=", 1.05), s)
        if not row["pass"] and key == "mta":
            base, ops = P.op_seconds(dense), P.op_seconds(mta)
            row["profile"] = {"extra_seconds_by_op_kind": P.extra(ops, base, 6),
                              "dense_top": P.top(base, 6), "mta_top": P.top(ops, 6)}
            profiles[size]["mta_over_dense"] = row["profile"]
    mem_d, mem_m = dense.memory(), mta.memory()
    report.add(size, "mta_over_dense_peak_memory", mem_m["peak"] / mem_d["peak"], INFO, s,
               dense=mem_d, mta=mem_m)
    report.add(size, "mta_over_dense_temp_memory", mem_m["temp"] / mem_d["temp"], INFO, s)
    for name, jax_key, torch_key, target in (
            ("jax_speedup_vs_torch_dense_step", "dense", "torch_dense", Target(">=", 1.3)),
            ("jax_speedup_vs_torch_mta_step", "mta", "torch_mta", Target(">=", 1.3)),
            ("jax_speedup_vs_torch_mta_loop_step", "mta", "torch_mta_loop", INFO)):
        row = report.add(size, name, timing.ratio(times, torch_key, jax_key), target, s)
        if row["pass"] is False:
            key = f"{jax_key}_vs_{torch_key}"
            if key not in profiles[size]:
                profiles[size][key] = {"jax_top": P.top(P.op_seconds(pool[jax_key]), 6),
                                       "torch_top": torch_t5.top_ops(pool[torch_key], 6)}
            row["profile"] = profiles[size][key]
    report.add(size, "torch_mta_parity_max_abs_logit_diff", diff, Target("<=", 1e-3), s)
    del var_steps, torch_fns, pool, hf_dense, hf_mta, hf_loop
    gc.collect()

    # --- Pool B: stage two (frozen backbone; top-k dense and gathered) against stage one.
    print(f"[{size}] pool B: stage two", flush=True)
    s2_plug = mta_lib.stage_two_config(W.stage_one_plug(), top_k=2, num_shared_adapters=1)
    s2_cfg = cfg(s2_plug)
    s2g_cfg = cfg(dataclasses.replace(s2_plug, topk_compute="gather"))
    s2 = compiled("stage2", s2_cfg, trainable="mta")
    s2g = compiled("stage2_gather", s2g_cfg, trainable="mta")
    times = timing.interleaved({"stage1": mta, "stage2": s2, "stage2_gather": s2g}, plan.rounds,
                               warmup=0, min_rounds=plan.min_rounds, more=later(0, 90))
    raw[size]["pool_b"] = times
    report.add(size, "stage2_over_stage1_step_time", timing.ratio(times, "stage2", "stage1"),
               Target("<", 1.0), s)
    report.add(size, "stage2_opt_state_bytes_over_2x_trainable_param_bytes",
               s2.opt_state_bytes / (2 * s2.trainable_bytes), Target("~", 1.0, 0.01), s,
               opt_state_bytes=s2.opt_state_bytes, trainable_bytes=s2.trainable_bytes,
               param_bytes=s2.param_bytes)
    gather_ratio = timing.ratio(times, "stage2_gather", "stage2")
    report.add(size, "stage2_topk_gather_over_dense_step_time", gather_ratio, INFO, s,
               faster="gather" if gather_ratio < 1.0 else "dense")
    report.add(size, "stage2_topk_gather_over_dense_forward_flops",
               F.forward_flops(s2g_cfg, *dataclasses.astuple(shape))
               / F.forward_flops(s2_cfg, *dataclasses.astuple(shape)), INFO, s)
    report.add(size, "stage2_gather_over_stage1_step_time",
               timing.ratio(times, "stage2_gather", "stage1"), INFO, s)
    del s2, s2g
    gc.collect()

    # --- Decoding: the library's jitted greedy decoder against HF generate, same weights.
    print(f"[{size}] decoding", flush=True)
    dense_params = W.random_params(dense_model)
    ours = W.greedy_decoder(dense_model, dense_params, batch, plan.target)
    theirs = torch_t5.greedy_generate(hf_decode, batch, plan.target)
    agree = float(np.mean(ours() == theirs()))  # also compiles and warms both
    times = timing.interleaved({"jax_greedy": ours, "hf_generate": theirs}, plan.rounds + 2,
                               warmup=0, min_rounds=plan.min_rounds, more=later(0, 50))
    raw[size]["decode"] = times
    row = report.add(size, "decode_speedup_vs_hf_generate",
                     timing.ratio(times, "hf_generate", "jax_greedy"), Target(">=", 2.0),
                     f"{s}, {plan.target} new tokens",
                     jax_tokens_per_s=plan.batch * plan.target / timing.median(times["jax_greedy"]),
                     hf_tokens_per_s=plan.batch * plan.target / timing.median(times["hf_generate"]))
    if row["pass"] is False:
        row["profile"] = profiles[size]["decode"] = {
            "jax_top": P.top(P.op_seconds(ours), 6), "torch_top": torch_t5.top_ops(theirs, 6)}
    report.add(size, "decode_token_agreement", agree, INFO, s)
    del ours, theirs, hf_decode, dense_params
    gc.collect()

    # --- Scaling: adapters and source length (optional points skip when out of time).
    print(f"[{size}] scaling", flush=True)
    per_compile = max(compile_s)
    step_s = timing.median(raw[size]["pool_a"]["mta"])
    fns: dict[str, Callable] = {"anchor": mta}  # adapters 5 at the plan's source length
    skipped = []
    points = [("adapters", e) for e in plan.adapters if e != 5] + \
             [("source", n) for n in plan.sources if n != plan.source]
    for kind, n in points:
        # Compiling it, then running it every round, judged from what was seen so far.
        grow = n / 5 if kind == "adapters" else n / plan.source
        if not clock.fits(per_compile + plan.min_rounds * step_s * (1 + grow) + 30):
            skipped.append(f"{kind}_{n}")
            continue
        if kind == "adapters":
            fns[f"{kind}_{n}"] = compiled(f"adapters_{n}", cfg(W.stage_one_plug(num_adapters=n)))
        else:
            fns[f"{kind}_{n}"] = compiled(f"source_{n}", mta_cfg,
                                          W.Shape(plan.batch, n, plan.target))
    if len(fns) > 1:
        times = timing.interleaved(fns, plan.rounds, warmup=0, min_rounds=plan.min_rounds,
                                   more=clock.rounds_while(20))
    else:  # nothing new to interleave: the anchor's pool-A times
        times = {"anchor": raw[size]["pool_a"]["mta"]}
    times["adapters_5"] = times[f"source_{plan.source}"] = times.pop("anchor")
    raw[size]["scaling"] = times
    for e in sorted(set(plan.adapters) | {5}):
        if f"adapters_{e}" in times:
            report.add(size, f"step_time_adapters_{e}", timing.median(times[f"adapters_{e}"]),
                       INFO, s, unit=" s",
                       over_adapters_5=timing.ratio(times, f"adapters_{e}", "adapters_5"))
    for n in sorted(set(plan.sources) | {plan.source}):
        if f"source_{n}" in times:
            report.add(size, f"step_time_source_{n}", timing.median(times[f"source_{n}"]), INFO,
                       str(W.Shape(plan.batch, n, plan.target)), unit=" s",
                       over_source_anchor=timing.ratio(times, f"source_{n}",
                                                       f"source_{plan.source}"))
    if skipped:
        print(f"  skipped for time: {skipped}", flush=True)
    raw[size]["skipped"] = skipped
    raw[size]["compile_seconds"] = compile_s
    del fns, dense, mta
    gc.collect()


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T5-small, small shapes, < 10 min")
    p.add_argument("--micro", action="store_true", help="tiny model (the harness's unit test)")
    p.add_argument("--out", default="results.json", help="where to write the results")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="intra-op threads for both XLA and PyTorch")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds (0: the plan's)")
    p.add_argument("--budget-s", type=float, default=-1.0,
                   help="skip optional scaling points past this many seconds (-1: the plan's)")
    p.add_argument("--compile-cache", default="", help="JAX persistent compilation cache folder")
    args = p.parse_args(argv)
    mode = "micro" if args.micro else "quick" if args.quick else "full"
    plan = PLANS[mode]
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds,
                                   min_rounds=min(plan.min_rounds, args.rounds))
    if args.budget_s >= 0:
        plan = dataclasses.replace(plan, budget_s=args.budget_s or None)

    from benchmarks import timing
    if mode == "micro":  # halves compile time; the micro run checks plumbing, not speed
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_backend_optimization_level=0")
    threads = timing.set_threads(args.threads)  # before JAX starts its CPU client
    import flax
    import jax
    import torch
    import transformers
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    clock = Clock(plan.budget_s)
    report, raw, profiles = Report(), {}, {}
    print(f"mode {mode}: {plan}; threads {threads}; JAX on {jax.devices()[0].platform}", flush=True)
    for size in plan.sizes:
        run_size(size, plan, report, clock, raw, profiles)
    runtime = clock.elapsed()

    metrics: dict[str, dict] = {}
    for row in report.rows:
        metrics.setdefault(row["size"], {})[row["metric"]] = row
    results = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "mode": mode, "plan": dataclasses.asdict(plan), "machine": machine(),
            "threads": {"xla": threads, "torch": torch.get_num_threads()},
            "env": {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "OMP_WAIT_POLICY")},
            "jax_platform": jax.devices()[0].platform,
            "versions": {"jax": jax.__version__, "flax": flax.__version__,
                         "torch": torch.__version__, "transformers": transformers.__version__},
            "runtime_s": runtime,
            "shapes": {size: {"batch": plan.batch, "source": plan.source, "target": plan.target,
                              "adapters": list(plan.adapters), "sources": list(plan.sources)}
                       for size in plan.sizes},
        },
        "rows": report.rows, "metrics": metrics, "timings_s": raw, "profiles": profiles,
    }
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=float)
    print()
    print(f"{results['meta']['date']}, {results['meta']['machine']['cpu']}, {threads} threads "
          f"(XLA and PyTorch), {mode} mode, {runtime:.0f} s")
    print(report.markdown())
    full = PLANS["full"]
    if mode != "full":
        print(f"\n{mode} mode: scaling points adapters {plan.adapters}, source lengths "
              f"{plan.sources} (full mode: {full.adapters} and {full.sources}, at b{full.batch} "
              f"s{full.source} t{full.target}, T5-small and T5-base).")
    skipped = {size: raw[size]["skipped"] for size in raw if raw[size].get("skipped")}
    if skipped:
        print(f"\nScaling points skipped to stay within the time budget: {skipped}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
