"""The README's TPU table: every model size x stage x mesh x slice compiled by `mta_jax.compile`.

    python -m benchmarks.tpu_compile --dir tpu_cells                 # run the grid, then the table
    python -m benchmarks.tpu_compile --dir tpu_cells --slices v5e-8 --models small,base
    python -m benchmarks.tpu_compile --dir tpu_cells --slices v5e-32 --meshes data_fsdp
    python -m benchmarks.tpu_compile --dir tpu_cells --table_only    # the Markdown from the cells

Each cell (one stage of one model on one mesh of one slice) is one `python -m mta_jax.compile
... --nodecode --out <dir>/<cell>.json --hlo_dir <dir>/<cell>_hlo` process (the compiled
program's text is kept for a closer look), run one after another, so a compiler crash
loses one cell, and a rerun skips the cells already in `--dir` (delete a cell's files to
redo it). The meshes: data parallelism, fsdp across the slice, fsdp x tensor (2-way, 4-way
on 32 chips), and on request data x fsdp=8 (fsdp within groups of 8 chips). The batch fills
the slice: 8 sequences per chip at the authors' 512 / 64 tokens.
Every time in the table is a roofline lower bound from published chip figures, never a
measurement. A compile of T5-small takes about a minute on 2 cores, Flan-T5-XL several.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

GiB = 2**30
PER_CHIP_BATCH = 8

# name -> (config file, what the table calls it)
MODELS = {"small": ("configs/t5_small.py", "T5-small"), "base": ("configs/t5_base.py", "T5-base"),
          "large": ("configs/t5_large.py", "T5-large"),
          "xl": ("configs/flan_t5_xl.py", "T5-3B (Flan-T5-XL)")}
# name -> (topology, chips, tensor-parallel size of the fsdp x tensor mesh)
SLICES = {"v5e-8": ("v5e:2x4", 8, 2), "v4-8": ("v4:2x2x1", 4, 2), "v5e-32": ("v5e:4x8", 32, 4)}
MESHES = ("data", "fsdp", "fsdp_tensor", "data_fsdp")
GRID_MESHES = MESHES[:3]  # the default grid; data_fsdp on request, for slices over 8 chips
HYBRID_FSDP = 8  # data_fsdp: fsdp over groups of 8 chips, data parallelism across the groups
STAGES = ("stage1", "stage2")


def mesh_flags(mesh: str, tensor: int) -> list[str]:
    data, fsdp, tp = {"data": (-1, 1, 1), "fsdp": (1, -1, 1), "fsdp_tensor": (1, -1, tensor),
                      "data_fsdp": (-1, HYBRID_FSDP, 1)}[mesh]
    return [f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
            f"--config.mesh.tensor={tp}"]


def grid(slices, models, meshes, stages) -> list[tuple[str, str, str, str]]:
    """The cells to compile, in order; data_fsdp only on slices of over HYBRID_FSDP chips."""
    return [(s, m, mesh, st) for s in slices for m in models for mesh in meshes for st in stages
            if mesh != "data_fsdp" or SLICES[s][1] > HYBRID_FSDP]


def cell_name(slice_: str, model: str, mesh: str, stage: str) -> str:
    return f"{slice_}_{model}_{mesh}_{stage}"


def run_cell(directory: str, slice_: str, model: str, mesh: str, stage: str) -> dict:
    """Compiles one cell in its own process; returns what the cell's JSON holds. A process
    that dies (libtpu crashed, or the host ran out of memory) leaves {"crashed": <signal or
    exit code>, "log": <tail>}."""
    topology, chips, tensor = SLICES[slice_]
    name = cell_name(slice_, model, mesh, stage)
    out, log = os.path.join(directory, name + ".json"), os.path.join(directory, name + ".log")
    cmd = [sys.executable, "-m", "mta_jax.compile", f"--config={MODELS[model][0]}",
           f"--topology={topology}", f"--config.stages=('{stage}',)",
           f"--config.train.batch_size={PER_CHIP_BATCH * chips}", *mesh_flags(mesh, tensor),
           "--nodecode", f"--out={out}", f"--hlo_dir={os.path.join(directory, name + '_hlo')}"]
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    wall = time.perf_counter() - start
    if not os.path.exists(out):  # exit 1 with a written JSON is "does not fit": kept as is
        with open(log) as f:
            tail = f.read()[-2000:]
        crash = signal.Signals(-rc).name if rc < 0 else f"exit {rc}"
        if crash == "SIGKILL":  # what the kernel's OOM killer sends
            crash = "SIGKILL: out of host memory?"
        with open(out, "w") as f:
            json.dump({"crashed": crash, "log": tail, "wall_s": wall}, f, indent=1)
    with open(out) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- the table

def _cell_text(result: dict) -> str:
    """'3.26 GiB, 53.1 ms (HBM), 9%' | 'does not fit: 18.9 GiB' | 'libtpu crashed (SIGSEGV)'."""
    if result is None:
        return "-"
    if "crashed" in result:
        return f"compile died ({result['crashed']})"
    step = result["steps"][0]
    total = step["memory"]["total"] / GiB
    if not step["fits"]:
        how = "no compile" if "note" in step and "not compiled" in step["note"] else "compiled"
        hbm = result["hbm_bytes"] / GiB  # two decimals where one would read as fitting
        return f"**does not fit**: {total:.{2 if round(total, 1) <= hbm else 1}f} GiB ({how})"
    if "hbm_bytes" not in step["cost"]:  # compiled before the HBM traffic was told apart
        return f"{total:.2f} GiB, step not derived (compiled by an older mta_jax.compile)"
    r = step["roofline"]
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.0f}%"
    bound = {"compute": "FLOPs", "hbm": "HBM", "ici": "ICI"}[r["bound"]]
    time = f"{1e3 * r['step_s']:.3g} ms" if r["step_s"] < 1 else f"{r['step_s']:.3g} s"
    return f"{total:.2f} GiB, {time} ({bound}), {mfu}"


def _compile_seconds(results) -> str:
    """CPU seconds of each stage's compile (on a shared host less noisy than wall seconds)."""
    secs = [r["steps"][0].get("compile_cpu_s", 0) for r in results if r and "steps" in r]
    return " + ".join(f"{s:.0f}" for s in secs) + " s" if secs else "-"


def table(directory: str, slices=tuple(SLICES), models=tuple(MODELS)) -> str:
    """Markdown, one section per slice: a row per model and mesh, a column per stage."""
    def load(*key):
        path = os.path.join(directory, cell_name(*key) + ".json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    lines = []
    for slice_ in slices:
        topology, chips, tensor = SLICES[slice_]
        cells = {(m, mesh): [load(slice_, m, mesh, s) for s in STAGES]
                 for m in models for mesh in MESHES}
        if not any(r for pair in cells.values() for r in pair):
            continue
        lines += [f"**{slice_}** (`{topology}`, {chips} chips), batch {PER_CHIP_BATCH * chips}:",
                  "", "| model | mesh | stage one: memory/device, step >= (bound), MFU <= | "
                  "stage two | compile (CPU s) |", "| --- | --- | --- | --- | --- |"]
        for (model, mesh), pair in cells.items():
            if not any(pair):
                continue
            mesh_text = {"data": f"data={chips}", "fsdp": f"fsdp={chips}",
                         "fsdp_tensor": f"fsdp={chips // tensor} x tensor={tensor}",
                         "data_fsdp": f"data={chips // HYBRID_FSDP} x fsdp={HYBRID_FSDP}"}[mesh]
            lines.append(f"| {MODELS[model][1]} | {mesh_text} | {_cell_text(pair[0])} | "
                         f"{_cell_text(pair[1])} | {_compile_seconds(pair)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="one JSON and one log per cell")
    p.add_argument("--slices", default=",".join(SLICES))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--meshes", default=",".join(GRID_MESHES),
                   help=f"of {', '.join(MESHES)}; data_fsdp only where a slice has over "
                        f"{HYBRID_FSDP} chips")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--table_only", action="store_true")
    args = p.parse_args(argv)
    pick = lambda text, known: [x for x in text.split(",") if x] or list(known)
    slices, models = pick(args.slices, SLICES), pick(args.models, MODELS)
    meshes, stages = pick(args.meshes, MESHES), pick(args.stages, STAGES)
    for name, chosen, known in (("slices", slices, SLICES), ("models", models, MODELS),
                                ("meshes", meshes, MESHES), ("stages", stages, STAGES)):
        unknown = set(chosen) - set(known)
        if unknown:
            p.error(f"--{name}: unknown {', '.join(sorted(unknown))}; one of {', '.join(known)}")
    os.makedirs(args.dir, exist_ok=True)
    if not args.table_only:
        cells = grid(slices, models, meshes, stages)
        todo = [c for c in cells if not os.path.exists(
            os.path.join(args.dir, cell_name(*c) + ".json"))]
        print(f"{len(cells)} cells, {len(cells) - len(todo)} already in {args.dir}", flush=True)
        for i, cell in enumerate(todo, 1):
            start = time.perf_counter()
            result = run_cell(args.dir, *cell)
            print(f"[{i}/{len(todo)}] {cell_name(*cell)}: {_cell_text(result)} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    print(table(args.dir, slices, models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
