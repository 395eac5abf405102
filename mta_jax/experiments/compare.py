"""Compare the FFN variants under equal steps and batch, over seeds.

    python -m mta_jax.experiments.compare --config=configs/demo.py --seeds=3 --out=runs/compare \
        [--variants=dense,shared_adapter,switch_moe,task_moe,mta_stage1,mta] [--steps=N]

Every variant trains `--steps` optimizer steps in all (default: the config's stage1 + stage2
steps); MTA splits them between its two stages in the config's ratio, the others spend them in
stage one. Seeds 0..n-1 set config.seed. Run k of a variant lives in OUT/<variant>/seed<k>
(a full training workdir); a run whose summary.json exists is skipped, and an interrupted one
resumes from its checkpoints. Writes OUT/report.md, OUT/results.json, OUT/loss_curves.png and
OUT/routing_<variant>_seed<k>_<stage>.png. Config overrides (--config.a.b=v) apply to every run.
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Optional

import jax
from absl import flags, logging
from ml_collections import config_flags

from mta_jax import build, cli, storage
from mta_jax.errors import ConfigError, UserError
from mta_jax.experiments import summary as summary_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("out", None, "Study folder: one workdir per variant and seed, plus the report.")
flags.DEFINE_integer("seeds", 3, "Seeds per variant: config.seed = 0 .. seeds - 1.")
flags.DEFINE_list("variants", list(build.VARIANTS), "Variants to run, in report order.")
flags.DEFINE_integer("steps", 0, "Optimizer steps per run, all stages together "
                     "(0: the config's stage1 + stage2 steps).")
flags.DEFINE_string("compilation_cache", "", "Folder for compiled programs, so that seeds of one "
                    "variant (and later studies) reuse them: '' = OUT/.jax_cache, 'none' = off.")
flags.mark_flags_as_required(["config", "out"])


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{model}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}"


def configure(config, variant: str, total_steps: Optional[int] = None):
    """A copy of `config` set up for `variant` with `total_steps` optimizer steps in all.

    MTA splits the steps between its stages in the config's stage1 : stage2 ratio; the other
    variants spend them all in stage one. None: the config's stage1 + stage2 steps (MTA's total),
    so every variant sees the same number of batches.
    """
    if variant not in build.VARIANTS:
        raise ConfigError(f"variant must be one of {', '.join(build.VARIANTS)}; got {variant!r}")
    s1, s2 = config.stage1.num_train_steps, config.stage2.num_train_steps
    total = s1 + s2 if total_steps is None else int(total_steps)
    if total < (2 if variant == "mta" else 1):
        raise ConfigError(f"total steps must be >= 2 for 'mta' (one per stage), else >= 1; "
                          f"got {total}")
    out = config.copy_and_resolve_references()
    out.variant = variant
    out.stages = build.stages_for(variant)
    if variant == "mta":
        first = min(max(1, round(total * s1 / (s1 + s2))), total - 1)
        out.stage1.num_train_steps, out.stage2.num_train_steps = first, total - first
    else:
        out.stage1.num_train_steps = total
    return out


def run_one(config, workdir: str) -> None:
    """Trains one run unless its summary.json exists; records its wall time.

    The run is the training entry point itself (`train.train_and_evaluate`, as
    `python -m mta_jax.main` runs it): a study is a set of ordinary training runs."""
    from mta_jax import train
    if (storage.path(workdir) / "summary.json").exists():
        logging.info("%s: finished earlier, skipped", workdir)
        return
    t0 = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
        storage.write_json(storage.path(workdir) / "timing.json",
                           {"wall_seconds": time.perf_counter() - t0})


def run_study(base, out: str, variant_names, num_seeds: int, steps: int = 0,
              command: str = "") -> dict:
    """Runs (or finds) every variant x seed under `out`, then writes the report; returns results."""
    unknown = [v for v in variant_names if v not in build.VARIANTS]
    if unknown or not variant_names:
        raise UserError(f"--variants must be a non-empty list of {', '.join(build.VARIANTS)}; "
                        f"got {list(variant_names)}")
    if num_seeds < 1:
        raise UserError(f"--seeds must be >= 1; got {num_seeds}")
    out = storage.makedirs(out)
    batch = base.train.batch_size
    records: dict = {}
    total = len(variant_names) * num_seeds
    for i, (variant, seed) in enumerate((v, s) for v in variant_names for s in range(num_seeds)):
        config = configure(base, variant, steps or None)
        config.seed = seed
        workdir = out / variant / f"seed{seed}"
        t0 = time.perf_counter()
        run_one(config, workdir)
        record = summary_lib.run_record(workdir, batch)
        records.setdefault(variant, {})[seed] = record
        print(f"[{i + 1}/{total}] {variant} seed {seed}: overall "
              f"{record['scores'].get('overall', float('nan')):.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    summary = summary_lib.aggregate(records)
    stamp = lambda t: datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")
    when = stamp(time.time())
    trained = stamp(max((out / v / f"seed{s}" / "summary.json").stat().mtime
                        for v in variant_names for s in range(num_seeds)))
    header = (f"# Variant comparison\n\nLast run finished {trained}, report written {when}; "
              f"{machine()}\n\n"
              + (f"Command: `{command}`\n\n" if command else "")
              + f"Batch {batch}; {steps or 'config'} steps per run; seeds 0..{num_seeds - 1}.\n")
    results = {"date": when, "machine": machine(), "command": command, "batch_size": batch,
               **summary, "runs": {v: {str(s): r for s, r in by.items()} for v, by in records.items()}}
    if jax.process_index() == 0:  # the study's shared files have one writer
        routing = summary_lib.copy_routing(records, out)
        loss = summary_lib.loss_plot(records, out / "loss_curves.png")
        storage.write_text(out / "report.md", summary_lib.markdown(summary, header=header) + "\n"
                           + ("![loss curves](loss_curves.png)\n" if loss else "")
                           + "".join(f"![{os.path.basename(p)}]({os.path.basename(p)})\n"
                                     for p in routing))
        storage.write_json(out / "results.json", results, indent=2)
    return results


def main(argv):
    with cli.one_line_errors():
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_libraries()
    if FLAGS.compilation_cache != "none":
        jax.config.update("jax_compilation_cache_dir",
                          FLAGS.compilation_cache or os.path.join(FLAGS.out, ".jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    command = "python -m mta_jax.experiments.compare " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with cli.one_line_errors():
        run_study(FLAGS.config, FLAGS.out, FLAGS.variants, FLAGS.seeds, FLAGS.steps, command)
    return 0


if __name__ == "__main__":
    cli.run(main)
