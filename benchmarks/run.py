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


class SizeRun:
    """Every measurement of one model size, in phases that share its shapes and clock.

    Phases run in order (`run_size`): PyTorch twins and parity, pool A (MTA over dense, JAX
    over PyTorch), pool B (stage two), decoding, scaling. Each phase frees what it built.
    """

    def __init__(self, size: str, plan: Plan, report: Report, clock: Clock, raw: dict,
                 profiles: dict):
        from benchmarks import workloads as W

        self.size, self.plan, self.report, self.clock = size, plan, report, clock
        self.raw, self.profiles = raw.setdefault(size, {}), profiles.setdefault(size, {})
        self.shape = W.Shape(plan.batch, plan.source, plan.target)
        self.label = str(self.shape)
        self.compile_s: list[float] = []
        self.dense_cfg, self.mta_cfg = self.cfg(), self.cfg(W.stage_one_plug())
        self.variants = {
            "bottleneck": self.cfg(W.stage_one_plug(adapter_kind="bottleneck")),
            "all_layers": self.cfg(W.stage_one_plug(encoder_layers="all", decoder_layers="all")),
        }
        self.batch = W.make_batch(self.dense_cfg, self.shape)

    def cfg(self, plug=None):
        from benchmarks import workloads as W
        return W.t5_config(self.size, plug, dropout_rate=self.plan.dropout_rate)

    def add(self, name: str, value: float, target: Target, **extra) -> dict:
        return self.report.add(self.size, name, value, target, extra.pop("label", self.label),
                               **extra)

    def compiled(self, name, config, shape=None, **kw):
        from benchmarks import workloads as W
        step = W.train_step(name, config, shape or self.shape, **kw)
        self.compile_s.append(step.compile_seconds)
        print(f"  compiled {name} ({shape or self.shape}) in {step.compile_seconds:.1f}s "
              f"[{self.clock.elapsed():.0f}s elapsed]", flush=True)
        return step

    def later(self, compiles: int, seconds: float) -> Callable:
        """Rounds past min_rounds only while the later phases still fit: `compiles` more
        compilations, the scaling points (one compilation each), and `seconds` of timing."""
        n_scaling = len(set(self.plan.adapters) - {5}) + len(set(self.plan.sources) - {self.plan.source})
        return self.clock.rounds_while((compiles + n_scaling) * max(self.compile_s) + seconds)

    def interleaved(self, fns: dict, rounds: int, more: Callable) -> dict:
        from benchmarks import timing
        return timing.interleaved(fns, rounds, warmup=0, min_rounds=self.plan.min_rounds, more=more)

    def torch_twins(self) -> dict:
        """Hugging Face's T5 with the same weights: dense, MTA (vectorised, loop), a decoder;
        built before the JAX steps donate (consume) their parameters. Records MTA parity."""
        import numpy as np
        import transformers

        from benchmarks import torch_t5
        from benchmarks import workloads as W
        from mta_jax.models.t5 import T5

        print(f"[{self.size}] PyTorch models and parity", flush=True)
        dense_model, mta_model = T5(self.dense_cfg), T5(self.mta_cfg)
        mta_params = W.random_params(mta_model)
        with tempfile.TemporaryDirectory() as folder:
            torch_t5.hf.save_hf_t5(folder, dense_model, W.random_params(dense_model))
            load = lambda: transformers.T5ForConditionalGeneration.from_pretrained(folder)
            twins = {"dense": load(), "decode": load(),
                     "mta": torch_t5.patch_mta(load(), self.mta_cfg, mta_params, "vectorised"),
                     "loop": torch_t5.patch_mta(load(), self.mta_cfg, mta_params, "loop")}
        diff = float(np.max(np.abs(torch_t5.logits(twins["mta"], self.batch)
                                   - W.forward_logits(mta_model, mta_params, self.batch))))
        self.add("torch_mta_parity_max_abs_logit_diff", diff, Target("<=", 1e-3))
        return twins

    def pool_a(self, twins: dict):
        """MTA (three placements) over dense, against their FLOP ratio; JAX over PyTorch.
        Returns the compiled dense and MTA steps, reused by the later phases."""
        from mta_jax import flops as F
        from benchmarks import torch_t5

        print(f"[{self.size}] pool A: MTA overhead, JAX vs PyTorch", flush=True)
        dense, mta = self.compiled("dense", self.dense_cfg), self.compiled("mta", self.mta_cfg)
        var_steps = {k: self.compiled(k, c) for k, c in self.variants.items()}
        torch_fns = {name: torch_t5.train_step(twins[k], self.batch) for name, k in
                     (("torch_dense", "dense"), ("torch_mta", "mta"), ("torch_mta_loop", "loop"))}
        for fn in torch_fns.values():  # PyTorch's first step allocates AdamW's state
            fn()
        pool = {"dense": dense, "mta": mta, **var_steps, **torch_fns}
        times = self.interleaved(pool, self.plan.rounds, self.later(2, 150))
        self.raw["pool_a"] = times
        shape = dataclasses.astuple(self.shape)
        flops = {k: F.train_flops(c, *shape)
                 for k, c in {"dense": self.dense_cfg, "mta": self.mta_cfg, **self.variants}.items()}
        for key, suffix in (("mta", ""), ("bottleneck", "_bottleneck"), ("all_layers", "_all_layers")):
            self._overhead(times, flops, key, suffix, pool)
        mem_d, mem_m = dense.memory(), mta.memory()
        self.add("mta_over_dense_peak_memory", mem_m["peak"] / mem_d["peak"], INFO,
                 dense=mem_d, mta=mem_m)
        self.add("mta_over_dense_temp_memory", mem_m["temp"] / mem_d["temp"], INFO)
        for name, jax_key, torch_key, target in (
                ("jax_speedup_vs_torch_dense_step", "dense", "torch_dense", Target(">=", 1.3)),
                ("jax_speedup_vs_torch_mta_step", "mta", "torch_mta", Target(">=", 1.3)),
                ("jax_speedup_vs_torch_mta_loop_step", "mta", "torch_mta_loop", INFO)):
            self._speedup(times, name, jax_key, torch_key, target, pool)
        return dense, mta

    def _overhead(self, times, flops, key, suffix, pool) -> None:
        from benchmarks import profile as P
        from benchmarks import timing

        t_ratio = timing.ratio(times, key, "dense")
        f_ratio = flops[key] / flops["dense"]
        self.add(f"mta_over_dense_step_time{suffix}", t_ratio, INFO)
        self.add(f"mta_over_dense_train_flops{suffix}", f_ratio, INFO, flops=flops[key],
                 dense_flops=flops["dense"])
        row = self.add(f"mta_overhead_over_flops{suffix}", t_ratio / f_ratio, Target("<=", 1.05))
        if not row["pass"] and key == "mta":
            base, ops = P.op_seconds(pool["dense"]), P.op_seconds(pool["mta"])
            row["profile"] = {"extra_seconds_by_op_kind": P.extra(ops, base, 6),
                              "dense_top": P.top(base, 6), "mta_top": P.top(ops, 6)}
            self.profiles["mta_over_dense"] = row["profile"]

    def _speedup(self, times, name, jax_key, torch_key, target, pool) -> None:
        from benchmarks import profile as P
        from benchmarks import timing, torch_t5

        row = self.add(name, timing.ratio(times, torch_key, jax_key), target)
        if row["pass"] is False:
            key = f"{jax_key}_vs_{torch_key}"
            if key not in self.profiles:
                self.profiles[key] = {"jax_top": P.top(P.op_seconds(pool[jax_key]), 6),
                                      "torch_top": torch_t5.top_ops(pool[torch_key], 6)}
            row["profile"] = self.profiles[key]

    def pool_b(self, stage_one) -> None:
        """Stage two (frozen backbone; top-k dense and gathered) against stage one."""
        from mta_jax import flops as F
        from benchmarks import timing
        from benchmarks import workloads as W
        from mta_jax.models import mta as mta_lib

        print(f"[{self.size}] pool B: stage two", flush=True)
        s2_plug = mta_lib.stage_two_config(W.stage_one_plug(), top_k=2, num_shared_adapters=1)
        s2_cfg = self.cfg(s2_plug)
        s2g_cfg = self.cfg(dataclasses.replace(s2_plug, topk_compute="gather"))
        s2 = self.compiled("stage2", s2_cfg, trainable="mta")
        s2g = self.compiled("stage2_gather", s2g_cfg, trainable="mta")
        times = self.interleaved({"stage1": stage_one, "stage2": s2, "stage2_gather": s2g},
                                 self.plan.rounds, self.later(0, 90))
        self.raw["pool_b"] = times
        self.add("stage2_over_stage1_step_time", timing.ratio(times, "stage2", "stage1"),
                 Target("<", 1.0))
        self.add("stage2_opt_state_bytes_over_2x_trainable_param_bytes",
                 s2.opt_state_bytes / (2 * s2.trainable_bytes), Target("~", 1.0, 0.01),
                 opt_state_bytes=s2.opt_state_bytes, trainable_bytes=s2.trainable_bytes,
                 param_bytes=s2.param_bytes)
        gather_ratio = timing.ratio(times, "stage2_gather", "stage2")
        self.add("stage2_topk_gather_over_dense_step_time", gather_ratio, INFO,
                 faster="gather" if gather_ratio < 1.0 else "dense")
        shape = dataclasses.astuple(self.shape)
        self.add("stage2_topk_gather_over_dense_forward_flops",
                 F.forward_flops(s2g_cfg, *shape) / F.forward_flops(s2_cfg, *shape), INFO)
        self.add("stage2_gather_over_stage1_step_time",
                 timing.ratio(times, "stage2_gather", "stage1"), INFO)

    def decoding(self, hf_decode) -> None:
        """The library's jitted greedy decoder against HF generate, same weights."""
        import numpy as np

        from benchmarks import profile as P
        from benchmarks import timing, torch_t5
        from benchmarks import workloads as W
        from mta_jax.models.t5 import T5

        print(f"[{self.size}] decoding", flush=True)
        plan, dense_model = self.plan, T5(self.dense_cfg)
        ours = W.greedy_decoder(dense_model, W.random_params(dense_model), self.batch, plan.target)
        theirs = torch_t5.greedy_generate(hf_decode, self.batch, plan.target)
        agree = float(np.mean(ours() == theirs()))  # also compiles and warms both
        times = self.interleaved({"jax_greedy": ours, "hf_generate": theirs}, plan.rounds + 2,
                                 self.later(0, 50))
        self.raw["decode"] = times
        tokens = plan.batch * plan.target
        row = self.add("decode_speedup_vs_hf_generate",
                       timing.ratio(times, "hf_generate", "jax_greedy"), Target(">=", 2.0),
                       label=f"{self.label}, {plan.target} new tokens",
                       jax_tokens_per_s=tokens / timing.median(times["jax_greedy"]),
                       hf_tokens_per_s=tokens / timing.median(times["hf_generate"]))
        if row["pass"] is False:
            row["profile"] = self.profiles["decode"] = {
                "jax_top": P.top(P.op_seconds(ours), 6), "torch_top": torch_t5.top_ops(theirs, 6)}
        self.add("decode_token_agreement", agree, INFO)

    def scaling(self, anchor) -> None:
        """Step time against adapters and source length (points skip when out of time)."""
        from benchmarks import timing
        from benchmarks import workloads as W

        print(f"[{self.size}] scaling", flush=True)
        plan, per_compile = self.plan, max(self.compile_s)
        step_s = timing.median(self.raw["pool_a"]["mta"])
        fns: dict[str, Callable] = {"anchor": anchor}  # adapters 5 at the plan's source length
        skipped = []
        points = [("adapters", e) for e in plan.adapters if e != 5] + \
                 [("source", n) for n in plan.sources if n != plan.source]
        for kind, n in points:
            # Compiling it, then running it every round, judged from what was seen so far.
            grow = n / 5 if kind == "adapters" else n / plan.source
            if not self.clock.fits(per_compile + plan.min_rounds * step_s * (1 + grow) + 30):
                skipped.append(f"{kind}_{n}")
            elif kind == "adapters":
                fns[f"{kind}_{n}"] = self.compiled(f"adapters_{n}",
                                                   self.cfg(W.stage_one_plug(num_adapters=n)))
            else:
                fns[f"{kind}_{n}"] = self.compiled(f"source_{n}", self.mta_cfg,
                                                   W.Shape(plan.batch, n, plan.target))
        if len(fns) > 1:
            times = self.interleaved(fns, plan.rounds, self.clock.rounds_while(20))
        else:  # nothing new to interleave: the anchor's pool-A times
            times = {"anchor": self.raw["pool_a"]["mta"]}
        times["adapters_5"] = times[f"source_{plan.source}"] = times.pop("anchor")
        self.raw["scaling"] = times
        for e in sorted(set(plan.adapters) | {5}):
            if f"adapters_{e}" in times:
                self.add(f"step_time_adapters_{e}", timing.median(times[f"adapters_{e}"]), INFO,
                         unit=" s", over_adapters_5=timing.ratio(times, f"adapters_{e}", "adapters_5"))
        for n in sorted(set(plan.sources) | {plan.source}):
            if f"source_{n}" in times:
                self.add(f"step_time_source_{n}", timing.median(times[f"source_{n}"]), INFO,
                         label=str(W.Shape(plan.batch, n, plan.target)), unit=" s",
                         over_source_anchor=timing.ratio(times, f"source_{n}", f"source_{plan.source}"))
        if skipped:
            print(f"  skipped for time: {skipped}", flush=True)
        self.raw["skipped"] = skipped


def run_size(size: str, plan: Plan, report: Report, clock: Clock, raw: dict,
             profiles: dict) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    run = SizeRun(size, plan, report, clock, raw, profiles)
    twins = run.torch_twins()
    dense, mta = run.pool_a(twins)
    del twins["dense"], twins["mta"], twins["loop"]
    gc.collect()
    run.pool_b(mta)
    gc.collect()
    run.decoding(twins.pop("decode"))
    gc.collect()
    run.scaling(mta)
    run.raw["compile_seconds"] = run.compile_s
    del dense, mta
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
